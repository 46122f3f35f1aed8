"""What the inference and encoding jobs share: the model (any `VideoAutoencoder`), the checks made before any folder
is, rows split across ranks, bad rows reported instead of substituted, and the error when nothing was produced."""
from __future__ import annotations

import logging
import re
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from . import distributed, storage
from .data import VideoReadError
from .errors import RunError, UserError
from .models.autoencoders import VideoAutoencoder
from .models.build import build_autoencoder
from .provenance import absolute_if_local

__all__ = ["RowReader", "absolute_if_local", "check_frame_counts", "check_frame_sizes", "check_output_folder",
           "job_model", "merge_skips", "report_skips"]

logger = logging.getLogger("opensora_vae.jobs")


def check_output_folder(path, what: str = "save_dir") -> None:
    """A clear error before any work when `path` cannot be created or written (nothing is created here); a URL's
    bucket must exist (storage.check_writable)."""
    storage.check_writable(path, what)


def check_frame_sizes(model: VideoAutoencoder, sizes: Iterable[Tuple[int, int]],
                      what: str = "dataset.image_size") -> None:
    """Frame sizes the model cannot take (not multiples of its spatial compression) refused up front, before any
    folder is made or clip read, in the terms of the setting that gave them."""
    factor = model.spatial_compression
    for h, w in sizes:
        try:
            model.check_size(h, w)  # the model's own rule; this adds the setting and the flag that fixes it
        except UserError:
            fit = f"{max(factor, h // factor * factor)} {max(factor, w // factor * factor)}"
            raise UserError(f"{what} {h}x{w}: height and width must be multiples of {factor} (the model's spatial "
                            f"compression); e.g. --image-size {fit}") from None


def check_frame_counts(model: VideoAutoencoder, counts: Iterable[int], what: str = "dataset.num_frames") -> None:
    """Clip lengths the model cannot take (its frame rule, e.g. 4k+1 for Wan) refused up front, in one line naming
    the setting that gave them."""
    for t in counts:
        try:
            model.check_frames(int(t))
        except UserError as err:
            raise UserError(f"{what} {t}: {err}") from None


def job_model(model_cfg, device: torch.device, dtype: torch.dtype, log: bool = True) -> VideoAutoencoder:
    """The model of a job as a `VideoAutoencoder` (`models.build.build_autoencoder`: an Open-Sora entry, a spec
    string, a diffusers entry, or a `from_pretrained` spec that replaces the entry), on `device` in `dtype`, in eval
    mode; `tiling` (--tiling, --tile-size, --tile-overlap) is the model's own. `log`: rank 0 (a replaced entry is
    warned about once)."""
    return build_autoencoder(model_cfg, device, dtype, log=log).eval()


class Split(NamedTuple):
    """How a job's ranks share its clips (`row_split`)."""

    rank: int  # to split the clips by (`distributed.rank_share`)
    world: int
    writes: bool  # this rank writes what it computes
    shared: bool  # every rank takes every clip (they must stop together)


def row_split(model: VideoAutoencoder, rank: int, world_size: int) -> Split:
    """Ranks split a job's clips; ranks that split each frame's tiles instead (tiling `parallel`) all take every
    clip, and rank 0 writes."""
    if world_size > 1 and any(getattr(getattr(m, "tiling", None), "parallel", False) for m in model.modules()):
        return Split(0, 1, rank == 0, True)
    return Split(rank, world_size, True, False)


def stopping(stop, split: Split, device: torch.device) -> bool:
    """Whether to stop before the next clip: this rank's signal, or any rank's where ranks share clips."""
    return distributed.any_rank(stop.received, device) if split.shared else stop.received


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


def merge_skips(parts: Iterable[Dict[str, str]]) -> Dict[str, str]:
    """Skipped rows of several ranks (name -> reason): a row that failed on two ranks (two buckets) is one row."""
    merged: Dict[str, str] = {}
    for part in parts:
        for name, reason in part.items():
            merged[name] = reason if name not in merged or reason in merged[name] else f"{merged[name]}; {reason}"
    return merged


def report_skips(skipped: Dict[str, str], is_main: bool, total: int, produced: Optional[bool] = None) -> Dict[str, str]:
    """Every rank's skipped rows (name -> reason), listed once by rank 0 as "skipped K of `total` row(s)". Names are
    one per row (the row number in them), so K counts rows however many times one failed. A job that produced
    nothing (`produced`; by default: every row skipped) fails on every rank with one line (RunError)."""
    if dist.is_available() and dist.is_initialized():
        parts: List[Dict[str, str]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, skipped)
        skipped = merge_skips(parts)
    if produced is None:
        produced = len(skipped) < total
    if not produced and skipped:
        first = min(skipped, key=_row_number)
        raise RunError(f"nothing produced: {len(skipped)} of {total} row(s) failed and none was done before (first: "
                       f"{first}: {skipped[first]}); the warnings above name each")
    if is_main and skipped:
        logger.warning("skipped %d of %d row(s):\n%s", len(skipped), total,
                       "\n".join(f"  {p}: {skipped[p]}" for p in sorted(skipped, key=_row_number)))
    return skipped


def _row_number(name: str) -> Tuple[int, str]:
    """'path [row N]' -> (N, name), to list rows in CSV order."""
    match = re.search(r"\[row (\d+)\]$", name)
    return (int(match.group(1)) if match else -1, name)
