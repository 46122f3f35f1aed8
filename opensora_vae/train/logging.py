"""Run logging on rank 0: tqdm progress, TensorBoard events and metrics.jsonl (one line per logged step)."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, Optional

from tqdm import tqdm

logger = logging.getLogger("opensora_vae.train")


# Loggers whose warnings are about the whole job (the config, the loss's LPIPS weights, the checkpoint's model):
# every rank meets them alike, so only rank 0 prints them.
JOB_WIDE = ("opensora_vae.config", "opensora_vae.losses", "opensora_vae.perceptual", "opensora_vae.provenance")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s")
    for name in JOB_WIDE:
        logging.getLogger(name).setLevel(logging.NOTSET if rank == 0 else logging.ERROR)


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


class RunLogger:
    """Does nothing on ranks other than 0, so callers need no rank checks."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: Optional[int], initial_step: int = 0,
                 tensorboard: bool = True, resumed: bool = False):
        self.enabled = enabled
        self.bar = self.writer = self.jsonl = None
        if not enabled:
            return
        path = Path(run_dir) / "metrics.jsonl"
        if resumed:
            superseded(path, initial_step)
        self.jsonl = open(path, "a")
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                logger.warning("tensorboard is not installed: no event files will be written")
            else:
                # On a resume, the events after the checkpoint's step are hidden (as metrics.jsonl moves them).
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                            purge_step=initial_step + 1 if resumed else None)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: Dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        self.jsonl.write(json.dumps(clean) + "\n")
        self.jsonl.flush()
        step = int(record["step"])
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)
        self.bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)

    def close(self) -> None:
        for h in (self.bar, self.writer, self.jsonl):
            if h is not None:
                h.close()
