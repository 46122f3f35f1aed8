"""What the inference and encoding jobs share: the model, the output folder check, rows split across ranks, bad
rows reported instead of substituted."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from .data import VideoReadError
from .errors import UserError
from .registry import build_model

logger = logging.getLogger("opensora_vae.jobs")


def check_output_folder(path: Path, what: str = "save_dir") -> None:
    """A clear error before any work when `path` cannot be created or written (nothing is created here)."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise UserError(f"{what} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {existing} is not writable; choose another folder")


def job_model(model_cfg, device: torch.device, dtype: torch.dtype):
    """The model of a job (weights from model.from_pretrained, runtime options applied), in eval mode."""
    return build_model(model_cfg).to(device=device, dtype=dtype).eval()


def rank_share(items: Sequence[Any], rank: int, world_size: int) -> List[Any]:
    """This rank's part of `items`: every world_size-th one, from its rank."""
    return list(items[rank::world_size])


class RowReader(Dataset):
    """Items `load(key)` for each key, bad ones reported instead of substituted (each row must give its own
    outputs): {"row": key, "item": ...} or {"row": key, "error": reason}."""

    def __init__(self, load: Callable[[Any], Dict[str, Any]], keys: Sequence[Any]):
        self.load, self.keys = load, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        key = self.keys[i]
        try:
            return {"row": key, "item": self.load(key)}
        except VideoReadError as err:
            return {"row": key, "error": err.reason or str(err)}


def report_skips(skipped: Dict[str, str], is_main: bool, unit: str = "row(s)") -> Dict[str, str]:
    """Every rank's skipped rows (name -> reason), listed once by rank 0. Names are one per row (the row number in
    them), so that rows of one file count one each."""
    if dist.is_available() and dist.is_initialized():
        parts: List[Dict[str, str]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, skipped)
        skipped = {k: v for p in parts for k, v in p.items()}
    if is_main and skipped:
        logger.warning("skipped %d %s:\n%s", len(skipped), unit,
                       "\n".join(f"  {p}: {r}" for p, r in sorted(skipped.items())))
    return skipped
