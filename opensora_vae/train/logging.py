"""Run logging on rank 0: tqdm progress, metrics.jsonl (one line per logged step) and the experiment trackers
(`trackers`: TensorBoard events in the run folder, Weights & Biases), which all receive the same values through
`RunLogger.log`."""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import secrets
import string
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..errors import RunError, UserError

logger = logging.getLogger("opensora_vae.train")

# Each tracker of config.TRACKERS: its package, and how to install it (the error when it is missing).
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
                    "wandb": ("wandb", "pip install opensora-vae[wandb]")}
TRACKERS_FILE = "trackers.json"  # in the run folder: each tracker's run id, so that a resume continues that run
WANDB_PROJECT = "opensora-vae"  # when neither wandb_project nor WANDB_PROJECT names one


# Loggers whose warnings are about the whole job (the config, the loss's LPIPS weights, the checkpoint's model):
# every rank meets them alike, so only rank 0 prints them.
JOB_WIDE = ("opensora_vae.config", "opensora_vae.losses", "opensora_vae.perceptual", "opensora_vae.provenance")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s")
    for name in JOB_WIDE:
        logging.getLogger(name).setLevel(logging.NOTSET if rank == 0 else logging.ERROR)


def check_trackers(names: Sequence[str]) -> None:
    """Each tracker's package imports, or one line naming how to install it (before a run folder is made)."""
    for name in names:
        module, install = TRACKER_PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"trackers={list(names)!r}: the {name} package is not installed; {install}") from None


def superseded(path: Path, step: int) -> None:
    """Resuming at `step`: records after it belong to the history that was lost (written after the checkpoint,
    before a stop). They move to `metrics.superseded.jsonl`, so `metrics.jsonl` holds one line per step."""
    if not path.is_file():
        return
    keep, moved = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            later = int(json.loads(line)["step"]) > step
        except (ValueError, KeyError, TypeError):  # a line cut by a kill: not a record
            later = True
        (moved if later else keep).append(line)
    if moved:
        with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in moved)
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
        logger.info("moved %d record(s) after step %d to %s", len(moved), step,
                    path.with_name("metrics.superseded.jsonl"))


def scalars(record: Dict[str, Any]) -> Dict[str, float]:
    """A metrics.jsonl record's numbers as the trackers show them: `train/<key>` (step and epoch are the axes)."""
    return {f"train/{k}": v for k, v in record.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def reconstruction_grid(video: torch.Tensor, rec: torch.Tensor, max_frames: int = 8) -> np.ndarray:
    """One clip (C, T, H, W in [-1, 1]) above its reconstruction, up to `max_frames` frames evenly spaced left to
    right: an H x W x 3 uint8 image."""
    t = video.shape[1]
    picks = torch.linspace(0, t - 1, min(t, max_frames)).round().long()

    def row(x: torch.Tensor) -> torch.Tensor:  # (C, T, H, W) -> (H, T' * W, C)
        frames = x.detach().float().cpu()[:, picks].clamp(-1, 1)
        return torch.cat(list(frames.permute(1, 2, 3, 0)), dim=1)

    grid = torch.cat([row(video), row(rec)], dim=0)
    if grid.shape[-1] == 1:
        grid = grid.expand(-1, -1, 3)
    return ((grid + 1) * 127.5).round().to(torch.uint8).numpy()


def new_run_id() -> str:
    """8 characters of [a-z0-9], as W&B makes its own run ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _read_ids(run_dir: Path) -> Dict[str, str]:
    try:
        return dict(json.loads((run_dir / TRACKERS_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _write_ids(run_dir: Path, ids: Dict[str, str]) -> None:
    tmp = run_dir / f".{TRACKERS_FILE}.tmp"
    tmp.write_text(json.dumps(ids, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, run_dir / TRACKERS_FILE)


class TensorBoardTracker:
    def __init__(self, run_dir: Path, initial_step: int, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter

        # On a resume, the events after the checkpoint's step are hidden (as metrics.jsonl moves them).
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=initial_step + 1 if resumed else None)

    def start(self, config: Dict[str, Any], step: int) -> None:
        text = json.dumps(config, indent=1, sort_keys=True, default=str)
        self.writer.add_text("config", "```\n" + text + "\n```", step)

    def log(self, step: int, values: Dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_images(self, step: int, images: Dict[str, np.ndarray]) -> None:
        for key, image in images.items():
            self.writer.add_image(key, image, step, dataformats="HWC")

    def close(self, how: str = "done") -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run named after the run folder; its id is kept in the folder's trackers.json, so that a resumed run
    continues it (`resume="allow"`). Project, entity, mode and directory: `wandb_project`, `wandb_entity`, then
    W&B's own variables (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, WANDB_DIR; default directory: the run folder)."""

    def __init__(self, run_dir: Path, project: Optional[str], entity: Optional[str]):
        import wandb

        self.wandb = wandb
        ids = _read_ids(run_dir)
        run_id = ids.get("wandb") or new_run_id()
        if ids.get("wandb") != run_id:  # kept before the run starts: a kill after init still resumes this id
            _write_ids(run_dir, {**ids, "wandb": run_id})
        try:
            self.run = wandb.init(id=run_id, resume="allow", name=run_dir.name,
                                  project=project or os.environ.get("WANDB_PROJECT") or WANDB_PROJECT, entity=entity,
                                  dir=None if os.environ.get("WANDB_DIR") else str(run_dir))
        except wandb.Error as err:
            raise RunError(f"trackers: wandb.init failed ({' '.join(str(err).split())}); log in with `wandb login`, "
                           f"or set WANDB_MODE=offline and upload later with `wandb sync`") from None
        logger.info("wandb run %s (project %s, %s)", self.run.id, self.run.project,
                    "offline: upload with `wandb sync`" if self.run.offline else self.run.url)

    def start(self, config: Dict[str, Any], step: int) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, step: int, values: Dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_images(self, step: int, images: Dict[str, np.ndarray]) -> None:
        self.run.log({k: self.wandb.Image(v) for k, v in images.items()}, step=step)

    def close(self, how: str = "done") -> None:
        """`how`: "done", "failed" (W&B shows the run failed) or "preempted" (stopped by a signal, to be resumed)."""
        if how == "preempted":
            self.run.mark_preempting()
        self.run.finish(exit_code=1 if how == "failed" else 0)


class RunLogger:
    """Does nothing on ranks other than 0, so callers need no rank checks. `log` writes a record to metrics.jsonl
    and its numbers to every tracker."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: Optional[int], initial_step: int = 0,
                 trackers: Sequence[str] = ("tensorboard",), resumed: bool = False,
                 wandb_project: Optional[str] = None, wandb_entity: Optional[str] = None):
        self.enabled = enabled
        self.bar = self.jsonl = None
        self.trackers: List[Any] = []
        if not enabled:
            return
        run_dir = Path(run_dir)
        path = run_dir / "metrics.jsonl"
        if resumed:
            superseded(path, initial_step)
        self.jsonl = open(path, "a")
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)
        self.initial_step = initial_step
        for name in trackers:
            if name == "tensorboard":
                self.trackers.append(TensorBoardTracker(run_dir, initial_step, resumed))
            elif name == "wandb":
                self.trackers.append(WandbTracker(run_dir, wandb_project, wandb_entity))

    def start(self, config: Dict[str, Any]) -> None:
        """The resolved config and what ran it (package versions, git commit), once per (resumed) run."""
        for tracker in self.trackers:
            tracker.start(config, self.initial_step)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        self.jsonl.write(json.dumps(clean) + "\n")
        self.jsonl.flush()
        step, values = int(record["step"]), scalars(record)
        for tracker in self.trackers:
            tracker.log(step, values)
        self.bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)

    def log_images(self, step: int, images: Dict[str, np.ndarray]) -> None:
        for tracker in self.trackers if self.enabled else ():
            tracker.log_images(step, images)

    def close(self, how: str = "done") -> None:
        for h in (self.bar, self.jsonl):
            if h is not None:
                h.close()
        for tracker in self.trackers:
            tracker.close(how)
