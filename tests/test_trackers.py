"""Experiment trackers (`trackers`): TensorBoard and W&B receive the same values as metrics.jsonl, the resolved config
and the git commit, reconstructions as images; a resumed run continues its W&B run; only rank 0 logs; a missing
package or an unknown tracker ends in one line. W&B runs offline only (WANDB_MODE=offline, everything in tmp_path):
no test here reaches the network."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from opensora_vae.config import TRACKERS, ConfigError, load_config
from opensora_vae.errors import UserError
from opensora_vae.registry import to_plain

from helpers import EXACT, ROOT, TINY, metrics, poison_loss, run_in_process

QUICK = {**EXACT, "trackers": ["tensorboard", "wandb"], "log_reconstructions_every": 2}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its files and settings in tmp_path, any server address unreachable; wandb's process-wide set-up
    is torn down before and after, so that it reads this environment."""
    wandb = pytest.importorskip("wandb")
    folder = tmp_path / "wandb_dir"
    folder.mkdir()
    for key in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # were anything to try a server: refused at once
    monkeypatch.setenv("WANDB_DIR", str(folder))
    for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / f"wandb_{name.lower()}"))
    wandb.teardown()
    yield folder
    wandb.teardown()


def wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb transaction log, as `wandb leet inspect --json` prints them (W&B's
    own reader of the log)."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def offline_runs(folder: Path) -> list:
    """(run id, records) of each offline run under `folder`, oldest first."""
    files = sorted(folder.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    return [(p.stem[len("run-"):], wandb_records(p)) for p in files]


def history(records: list) -> dict:
    return {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}


def scalar_view(item: dict) -> dict:
    """A W&B history row's logged scalars (W&B's own `_` keys and the image's fields aside)."""
    return {k: v for k, v in item.items() if not k.startswith("_") and not k.startswith("train/reconstruction")}


def git_head() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def test_trackers_log_the_same_values_and_a_resume_continues_the_wandb_run(tmp_path, clip_csv, offline_wandb,
                                                                           monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from opensora_vae.train import Trainer
    from opensora_vae.train.logging import TRACKERS_FILE, scalars
    from opensora_vae.train.trainer import NonFiniteLossError

    head = git_head()
    out = tmp_path / "out"
    cfg = load_config(TINY / "stage1.py", {**QUICK, "dataset.data_path": str(clip_csv), "outputs": str(out),
                                           "max_steps": 4, "ckpt_every": 2})

    def failing_run():  # a NaN loss at step 3 ends it, after the checkpoint of step 2
        job = Trainer(cfg, config_name="stage1", load="auto")
        poison_loss(job, lambda step: step == 2)
        try:
            job.train()
        finally:
            job.close()
        return job

    with pytest.raises(NonFiniteLossError):
        failing_run()
    step = Trainer.train_step

    def signalled_in_step_4(self, batch):  # the resumed run is preempted at its last step
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", signalled_in_step_4)
    run_dir, saved = run_in_process(TINY / "stage1.py", clip_csv, out, load="auto", **QUICK, max_steps=4,
                                    ckpt_every=2)
    assert saved.parent == run_dir and saved.name.endswith("global_step4")
    records = {r["step"]: r for r in metrics(run_dir)}
    assert sorted(records) == [1, 2, 3, 4]

    # W&B: two offline runs (one per start) of one run id, the one kept in the run folder; the second continues
    # where the checkpoint was; the first ended failed, the second preempted
    runs = offline_runs(offline_wandb)
    kept = json.loads((run_dir / TRACKERS_FILE).read_text())["wandb"]
    assert [run_id for run_id, _ in runs] == [kept, kept]
    (_, first), (_, second) = runs
    assert sorted(history(first)) == [1, 2] and sorted(history(second)) == [3, 4]
    assert [next(r["exit"]["exit_code"] for r in recs if r["type"] == "exit") for _, recs in runs] == [1, 0]
    assert [any(r["type"] == "preempting" for r in recs) for _, recs in runs] == [False, True]
    logged = {**history(first), **history(second)}
    for step, record in records.items():
        assert scalar_view(logged[step]) == pytest.approx(scalars(record)), step
    assert {"train/loss", "train/lr", "train/sec_per_step", "train/samples_per_sec"} <= set(logged[1])
    assert [s for s, item in sorted(logged.items()) if "train/reconstruction.path" in item] == [2, 4]
    for _, recs in runs:
        start = next(r["run"] for r in recs if r["type"] == "run")
        assert start["display_name"] == run_dir.name and start["project"] == "opensora-vae"
        config = next(r["config"]["update"] for r in recs if r["type"] == "config")
        assert config["lr"] == 1e-3 and config["dataset"]["data_path"] == str(clip_csv)
        assert config["model"] == json.loads(json.dumps(to_plain(load_config(run_dir / "config.py").model)))
        commit = config["provenance"]["opensora_vae_git"]
        assert commit == head or (commit and subprocess.run(  # a commit made while the test ran
            ["git", "merge-base", "--is-ancestor", head, commit], cwd=ROOT).returncode == 0)

    # TensorBoard: the same scalars at the same steps, the same image, the config with the commit
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == set(scalars(records[1]))
    for tag in tags["scalars"]:
        values = {e.step: e.value for e in events.Scalars(tag)}
        assert values == pytest.approx({s: scalars(r)[tag] for s, r in records.items()}), tag
    assert [e.step for e in events.Images("train/reconstruction")] == [2, 4]
    from PIL import Image
    import io

    tb_image = np.asarray(Image.open(io.BytesIO(events.Images("train/reconstruction")[0].encoded_image_string)))
    png = next((offline_wandb / "wandb").glob("offline-run-*/files/media/images/train/reconstruction_2_*.png"))
    wandb_image = np.asarray(Image.open(png).convert("RGB"))
    assert tb_image.shape == (2 * 16, 5 * 16, 3) and np.array_equal(tb_image, wandb_image)
    text = "".join(t.tensor_proto.string_val[0].decode() for t in events.Tensors("config/text_summary"))
    assert '"lr": 0.001' in text and (head is None or head[:12] in text or '"opensora_vae_git"' in text)


def test_only_rank_0_starts_a_tracker(tmp_path, clip_csv, offline_wandb, monkeypatch):
    """Rank 1 of 2 (no process group: its collectives are local, what rank 0 decides it gets as if broadcast)
    trains with both trackers on: no W&B run, no TensorBoard events, nothing in the run logger."""
    import wandb

    import opensora_vae.train.trainer as trainer
    from opensora_vae.distributed import DistInfo

    monkeypatch.setattr(trainer, "init_distributed", lambda *a, **k: DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(trainer.Trainer, "_on_rank0", lambda self, fn, *args: fn(*args))
    monkeypatch.setattr(trainer.Trainer, "save", lambda self: tmp_path / "not-saved")  # rank 0's part
    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("wandb.init on rank 1"))
    cfg = load_config(TINY / "stage1.py", {**QUICK, "dataset.data_path": str(clip_csv), "max_steps": 2,
                                           "outputs": str(tmp_path / "out"), "log_reconstructions_every": 1,
                                           "shard_optimizer": False})
    job = trainer.Trainer(cfg, config_name="stage1")
    try:
        job.train()
        assert job.run_logger.trackers == [] and job.global_step == 2
    finally:
        job.close()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["000-stage1"]  # made as rank 0 would make it
    assert not list(tmp_path.rglob("events.out.tfevents*")) and not list(offline_wandb.iterdir())


def test_missing_wandb_is_one_line_naming_the_extra(tmp_path, clip_csv, monkeypatch, capsys):
    import runpy

    from opensora_vae.errors import run_main

    from helpers import error_line

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    main = runpy.run_path(str(ROOT / "scripts" / "train_vae.py"), run_name="test")["main"]
    code = run_main(main, [str(TINY / "stage1.py"), "--data-path", str(clip_csv), "--outputs", str(tmp_path / "out"),
                           "--cfg-options", "trackers=['tensorboard', 'wandb']"])
    line = error_line(capsys)
    assert code == 2 and "pip install opensora-vae[wandb]" in line and "trackers=" in line, line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no run folder was made


def test_trackers_key_checked_when_the_config_loads(caplog):
    cfg = load_config(TINY / "stage1.py", job="train")
    assert cfg.trackers == ["tensorboard"] and set(TRACKERS) == {"tensorboard", "wandb"}
    with pytest.raises(ConfigError, match=r"^config key trackers=\['tensorboard', 'mlflow'\]: unknown tracker "
                                          r"'mlflow'; known: tensorboard, wandb$"):
        load_config(TINY / "stage1.py", {"trackers": ["tensorboard", "mlflow"]}, job="train")
    with pytest.raises(ConfigError, match="trackers='wandb' has the wrong type: expected list of"):
        load_config(TINY / "stage1.py", {"trackers": "wandb"}, job="train")
    with pytest.raises(ConfigError, match="names a tracker twice"):
        load_config(TINY / "stage1.py", {"trackers": ["wandb", "wandb"]}, job="train")
    with pytest.raises(UserError, match="wandb_project"):
        load_config(TINY / "stage1.py", {"wandb_project": 3}, job="train")


@pytest.mark.parametrize("old, trackers", [
    ({"tensorboard": False}, []),
    ({"tensorboard": True}, ["tensorboard"]),
    ({"wandb": True}, ["tensorboard", "wandb"]),  # the reference's key: kept, not dropped
    ({"wandb": False}, ["tensorboard"]),
    ({"tensorboard": False, "wandb": True}, ["wandb"]),
    ({"trackers": ["wandb"], "tensorboard": True}, ["wandb", "tensorboard"]),
])
def test_the_older_switches_are_read_as_trackers(old, trackers, tmp_path, caplog):
    import opensora_vae.config as config

    config._warned.clear()
    path = tmp_path / "old.py"
    path.write_text(f"_base_ = [{str(TINY / 'stage1.py')!r}]\n" + "".join(f"{k} = {v!r}\n" for k, v in old.items()))
    cfg = load_config(path, job="train")
    assert cfg.trackers == trackers and "tensorboard" not in cfg and "wandb" not in cfg
    said = [r.getMessage() for r in caplog.records if r.name == "opensora_vae.config"]
    assert len(said) == len(set(old) - {"trackers"}) and all(f"trackers={trackers!r}" in s for s in said), said
    assert load_config(path, job="train").trackers == trackers  # checked again (a saved config.py): the same


def test_reconstruction_grid_puts_the_clip_above_its_reconstruction():
    import torch

    from opensora_vae.train.logging import reconstruction_grid

    clip = torch.linspace(-1, 1, 3 * 20 * 4 * 6).reshape(3, 20, 4, 6)
    grid = reconstruction_grid(clip, -clip, max_frames=8)
    assert grid.shape == (8, 8 * 6, 3) and grid.dtype == np.uint8
    picks = [0, 3, 5, 8, 11, 14, 16, 19]  # 8 of 20 frames, evenly spaced, first and last included
    for i, t in enumerate(picks):
        expected = ((clip[:, t].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.array_equal(grid[:4, i * 6:(i + 1) * 6], expected)
        assert np.array_equal(grid[4:, i * 6:(i + 1) * 6], 255 - expected)
