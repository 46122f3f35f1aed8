"""Run folders: `OUTPUTS/NNN-name`, created atomically, and which checkpoint `--load` resumes."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt

logger = logging.getLogger("opensora_vae.train")

_RUN_DIR = re.compile(r"^(\d+)-(.+)$")


def _runs(outputs: Path):
    return [(int(m.group(1)), m.group(2), p) for p in (outputs.iterdir() if outputs.is_dir() else [])
            if (m := _RUN_DIR.match(p.name)) and p.is_dir()]


def new_run_dir(outputs: Path, name: str) -> Path:
    """`OUTPUTS/NNN-name`, NNN one above the highest in use, created atomically: two jobs starting together, or a
    folder deleted before, never make two runs share a folder."""
    outputs.mkdir(parents=True, exist_ok=True)
    index = 1 + max((i for i, _, _ in _runs(outputs)), default=-1)
    while True:
        path = outputs / f"{index:03d}-{name}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            index += 1


def find_resume(outputs: Path, name: str, load: Optional[str]):
    """(run folder, checkpoint) to continue from `--load`, or (None, None) for a new run.

    `--load auto`: the newest complete checkpoint of the newest run folder of this name, or a new run when it has
    none (so the identical command can be requeued). `--load RUN_DIR`: that folder's newest complete checkpoint.
    `--load CHECKPOINT`: that checkpoint."""
    if load is None:
        return None, None
    if load == "auto":
        runs = [(i, p) for i, n, p in _runs(outputs) if n == name]
        newest = max(runs)[1] if runs else None
        found = ckpt.latest_checkpoint(newest) if newest is not None else None
        if found is None:
            logger.info("--load auto: no checkpoint of a run named %r in %s: starting a new run", name, outputs)
            return None, None
        return newest, found
    path = Path(load)
    if (path / ckpt.RUNNING_STATES).is_file():
        return path.resolve().parent, path
    if path.is_dir():
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"--load {path}: not a training checkpoint (no {ckpt.RUNNING_STATES}) and no "
                                    f"complete checkpoint in it; to start from weights only, use --ckpt-path")
        return path.resolve(), found
    hint = " (--load auto resumes the newest run of this config)" if load in ("latest", "last") else ""
    raise FileNotFoundError(f"--load {path}: no such folder{hint}; to start from weights only, use --ckpt-path")
