"""The demo's stage chain: random start -> stage 0 (spatial VAE) -> stages 1, 2, 3 of the published recipe.

Each training stage is launched as the real recipe is (torchrun, gloo ranks, scripts/train_vae.py with its config
from configs/vae/demo/), loading the previous stage's checkpoint; then the train and held-out clips are
reconstructed with scripts/inference_vae.py and scored with eval/vae/eval_common_metric.py. Every finished piece
writes a small JSON file in its stage folder, so a re-run skips it; a failure names its stage and keeps the rest.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..config import load_config
from ..models.build import build_model
from ..train.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "vae" / "demo"
TRAIN_STAGES = ("stage0", "stage1", "stage2", "stage3")
STAGES = ("init",) + TRAIN_STAGES
SPLITS = ("train", "heldout")
EVAL_METRICS = ("ssim", "psnr", "lpips", "flolpips")
DESCRIPTIONS = {
    "init": "random start (nothing trained)",
    "stage0": "stage 0: fit the spatial VAE on frames and photos (pixel losses)",
    "stage1": "stage 1: temporal VAE on frozen spatial latents (z-rec + identity, 20% images)",
    "stage2": "stage 2: everything trains on the z-rec loss",
    "stage3": "stage 3: pixel reconstruction on clips of random length",
}


class StageFailed(RuntimeError):
    def __init__(self, stage: str, what: str, detail: str):
        self.stage = stage
        super().__init__(f"{stage} failed while {what}: {detail}")


@dataclass
class Settings:
    """Everything a run depends on besides the configs: a stage is redone when these change."""

    image_size: int
    num_frames: int
    steps: Dict[str, int]  # stage -> max_steps
    nproc: int = 2
    launcher: str = "torchrun"  # "inprocess": one process, no torchrun (tests, debugging)
    seed: int = 42


def default_settings(nproc: int = 2) -> Settings:
    common = load_config(CONFIGS / "common.py")
    steps = {s: load_config(CONFIGS / f"{s}.py", job="train").max_steps for s in TRAIN_STAGES}
    return Settings(image_size=int(common._demo_image_size[0]), num_frames=int(common._demo_num_frames), steps=steps,
                    nproc=nproc)


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _script(relative: str) -> Callable:
    """main() of a repository script (scripts/, eval/), run in this process."""
    return runpy.run_path(str(ROOT / relative), run_name="opensora_vae_demo")["main"]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


class StageRunner:
    """Runs and records the stages under OUT/stages/<stage>/: `trained.json` (checkpoint, timing) and
    `scores.json` (metrics per split); a stage whose record matches the current settings is skipped."""

    def __init__(self, out: Path, data, settings: Settings, force: bool = False):
        self.out, self.data, self.settings = out, data, settings
        self.force = force
        self.redo_rest = force  # once a stage is redone, every later one is too
        self.running: Optional[subprocess.Popen] = None  # a torchrun launch in flight (stopped if scoring fails)

    def folder(self, stage: str) -> Path:
        return self.out / "stages" / stage

    def checkpoint(self, record: dict) -> Path:
        return self.out / record["checkpoint"]

    def _relative(self, path: Optional[Path]) -> Optional[str]:
        return None if path is None else str(Path(path).relative_to(self.out))

    def _signature(self, stage: str) -> dict:
        s = self.settings
        return {"image_size": s.image_size, "num_frames": s.num_frames, "nproc": s.nproc, "seed": s.seed,
                "steps": s.steps.get(stage),
                "config": (CONFIGS / f"{stage}.py").read_text() if stage in TRAIN_STAGES else None}

    # ----- training ---------------------------------------------------------------------------------------
    def start(self, stage: str, previous: Optional[Path]) -> Callable[[], dict]:
        """Begin the stage unless already done; the returned function waits for it and gives its record
        {checkpoint, seconds, steps, sec_per_step, ...}. A torchrun launch returns at once, so the caller can score
        the previous stage while the launcher and ranks start up."""
        folder = self.folder(stage)
        record = _read_json(folder / "trained.json")
        signature = self._signature(stage)  # before training: the config may be edited meanwhile
        fresh = (record is not None and record.get("signature") == signature
                 and record.get("previous") == self._relative(previous)
                 and (self.out / record["checkpoint"]).is_dir())
        if fresh and not self.redo_rest:
            say(f"{stage}: already done ({record['steps']} steps, {record['seconds']:.0f} s), skipped "
                f"(--force redoes it)")
            return lambda: record
        self.redo_rest = True
        if folder.exists():
            shutil.rmtree(folder)  # a half-done earlier attempt
        folder.mkdir(parents=True)
        tick = time.perf_counter()
        if stage == "init":
            checkpoint, rows = self._init_model(folder), []
            finish = lambda: (checkpoint, rows)  # noqa: E731
        else:
            finish = self._train(stage, folder, previous)

        def done() -> dict:
            checkpoint, rows = finish()
            seconds = time.perf_counter() - tick
            per_step = [r["sec_per_step"] for r in rows if "sec_per_step" in r][1:]  # the first step warms up
            # Paths relative to the output folder: it may be moved or copied.
            record = {"stage": stage, "checkpoint": self._relative(checkpoint), "previous": self._relative(previous),
                      "seconds": seconds, "steps": len(rows),
                      "sec_per_step": statistics.median(per_step) if per_step else None,
                      "ranks": self.settings.nproc if stage != "init" else 0, "signature": signature}
            _write_json(folder / "trained.json", record)
            return record
        return done

    def _init_model(self, folder: Path) -> Path:
        """The random start: the demo model built as the trainer builds it (same seed), saved once, so stage 0
        starts from exactly the weights that `init` scores."""
        cfg = load_config(CONFIGS / "stage0.py")
        torch.manual_seed(self.settings.seed)
        model = build_model(cfg.model)
        model.save_pretrained(folder / "model")
        return folder / "model"

    def _options(self, stage: str, previous: Optional[Path]) -> List[str]:
        s = self.settings
        size = s.image_size
        options = [f"max_steps={s.steps[stage]}", f"seed={s.seed}", f"dataset.image_size=({size},{size})",
                   f"run_name={stage}"]
        if stage != "stage0":
            options.append(f"dataset.num_frames={2 * s.num_frames - 1 if stage == 'stage3' else s.num_frames}")
        if previous is not None:
            options.append(f"model.from_pretrained={previous}")
        return options

    def _train(self, stage: str, folder: Path, previous: Optional[Path]) -> Callable[[], tuple]:
        """Launch the stage's training; the returned function waits for it and gives (checkpoint, metric rows)."""
        csv = self.data.frames_csv if stage == "stage0" else self.data.clips_csv
        args = [str(CONFIGS / f"{stage}.py"), "--data-path", str(csv), "--outputs", str(folder / "run"),
                "--cfg-options", *self._options(stage, previous)]
        if self.settings.launcher == "inprocess":
            try:
                _script("scripts/train_vae.py")(args)
            except Exception as err:  # noqa: BLE001 - any failure of the stage is reported as the stage's
                raise StageFailed(stage, "training", f"{type(err).__name__}: {err}") from err
            wait = lambda: None  # noqa: E731
        else:
            wait = self._torchrun(stage, args, folder)

        def finish():
            wait()
            runs = sorted((folder / "run").glob(f"*-{stage}"))
            checkpoint = latest_checkpoint(runs[-1]) if runs else None
            if checkpoint is None:
                raise StageFailed(stage, "training", f"no checkpoint was written under {folder / 'run'}")
            rows = [json.loads(line) for line in (runs[-1] / "metrics.jsonl").read_text().splitlines()
                    if line.strip()]
            return checkpoint / "model", rows
        return finish

    def _torchrun(self, stage: str, args: Sequence[str], folder: Path) -> Callable[[], None]:
        nproc = self.settings.nproc
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "scripts" / "train_vae.py"), *args]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        # One rank per core: the ranks share the machine's cores instead of oversubscribing them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        (folder / "command.txt").write_text(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT))

        def wait() -> None:
            if proc.wait() != 0:
                raise StageFailed(stage, "training", f"torchrun exited with code {proc.returncode} (the log above "
                                  f"says why; command in {folder / 'command.txt'})")
        self.running = proc
        return wait

    def stop(self) -> None:
        """Stop a torchrun launch still in flight (the caller failed while it ran); nothing if none is."""
        if self.running is not None and self.running.poll() is None:
            self.running.terminate()
            self.running.wait()

    # ----- scoring ----------------------------------------------------------------------------------------
    def scores(self, stage: str, checkpoint: Path) -> dict:
        """{split: {"rec": eval result, "spatial": eval result}} of the stage's checkpoint, computed unless done."""
        path = self.folder(stage) / "scores.json"
        record = _read_json(path)
        if record is not None and record.get("checkpoint") == self._relative(checkpoint) and not self.force:
            return record["scores"]
        tick = time.perf_counter()
        scores = {}
        for split, csv in self.data.eval_csv.items():
            scores[split] = self.reconstruct_and_score(
                stage, self.out / "recon" / stage / split, csv, CONFIGS / "inference.py", checkpoint,
                self.settings.image_size, self.settings.num_frames)
        _write_json(path, {"checkpoint": self._relative(checkpoint), "seconds": time.perf_counter() - tick,
                           "scores": scores})
        return scores

    def reconstruct_and_score(self, stage: str, prefix: Path, csv: Path, config: Path, checkpoint,
                              size: int, num_frames: int, options: Sequence[str] = ()) -> dict:
        args = [str(config), "--ckpt-path", str(checkpoint), "--data-path", str(csv), "--save-dir", str(prefix),
                "--num-frames", str(num_frames), "--image-size", str(size), "--overwrite"]
        if options:
            args += ["--cfg-options", *options]
        try:
            _script("scripts/inference_vae.py")(args)
        except Exception as err:  # noqa: BLE001
            raise StageFailed(stage, f"reconstructing {csv.name}", f"{type(err).__name__}: {err}") from err
        result = {}
        for kind in ("rec", "spatial"):
            report = prefix.parent / f"{prefix.name}_{kind}_scores.json"
            argv = ["--real_video_dir", f"{prefix}_ori", "--generated_video_dir", f"{prefix}_{kind}",
                    "--device", "cpu", "--resolution", str(size), "--crop_size", str(size),
                    "--num_frames", str(num_frames), "--metric", *EVAL_METRICS, "--output", str(report)]
            log = io.StringIO()
            with contextlib.redirect_stdout(log):  # the table goes to the report, not the console
                code = _script("eval/vae/eval_common_metric.py")(argv)
            if code != 0 or not report.is_file():
                raise StageFailed(stage, f"scoring {prefix.name}_{kind}", f"eval_common_metric.py exited {code}")
            result[kind] = json.loads(report.read_text())
        return result
