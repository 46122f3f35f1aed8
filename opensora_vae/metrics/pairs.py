"""Aligned batches of real / generated clips read from two folders.

Pairing: the video files (by extension, hidden files skipped) of both folders are matched by file stem, so
`real/a.mp4` pairs with `generated/a.mkv`; an unmatched or duplicated stem is an error listing the names.
Pairs are sorted by stem; `subset_size` keeps the first N (the reference's `Subset(range(N))`). A folder may be a
URL (`s3://bucket/recon_rec`, storage.py): its videos are read by byte ranges.

Frame sampling follows Open-Sora-Plan / Open-Sora's `eval_common_metric.py`:
  span = num_frames * sample_rate, indices = np.linspace(0, span - 1, num_frames).astype(int)
i.e. `num_frames` frames spread evenly (truncated) over the first `span` frames, starting at frame 0
(sample_rate=1 takes frames 0..num_frames-1). A clip shorter than `span` is an error here (the reference
silently took fewer frames, which breaks batching). `sample_fps` is accepted for CLI compatibility but,
as in the reference, does not change which frames are read: clips are compared at their native frame rate.

Preprocessing, as the reference: frames / 255, short side bilinearly resized to `resolution` (no antialias,
long side floored, like pytorchvideo's ShortSideScale), then a centre crop of `crop_size` with offsets
round(margin / 2) (like torchvision's CenterCropVideo).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from opensora_vae import storage
from opensora_vae.data.transforms import center_crop, resize_short_side
from opensora_vae.data.video import VideoReadError, probe_video, read_frames
from opensora_vae.distributed import rank_share

__all__ = [
    "VIDEO_EXTENSIONS",
    "ClipBatch",
    "ClipTooShortError",
    "PairingError",
    "VideoPair",
    "iter_batches",
    "list_videos",
    "load_clip",
    "pair_videos",
    "sample_indices",
]

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".wmv", ".mpg", ".mpeg", ".ts",
                              ".gif"})
PathLike = Union[str, os.PathLike]


class PairingError(ValueError):
    """The two folders do not hold the same set of video names."""


class ClipTooShortError(VideoReadError):
    """A video has fewer frames than num_frames * sample_rate."""


@dataclass(frozen=True)
class VideoPair:
    name: str
    real: Union[Path, str]  # a local Path, or a URL
    generated: Union[Path, str]


@dataclass
class ClipBatch:
    names: List[str]
    real: torch.Tensor  # (B, T, C, H, W) float32 in [0, 1]
    generated: torch.Tensor


def _name(path: Union[Path, str]) -> str:
    return storage.basename(path)


def list_videos(folder: PathLike) -> dict:
    """stem -> path of the video files in `folder` (not recursive; a local Path, or a URL); duplicate stems are an
    error."""
    if not storage.isdir(folder):
        raise FileNotFoundError(f"video folder {storage.redact(folder)} does not exist")
    out, dups = {}, []
    for name in storage.listdir(folder):
        stem, suffix = os.path.splitext(name)
        if name.startswith(".") or suffix.lower() not in VIDEO_EXTENSIONS:
            continue
        path = storage.location(storage.join(folder, name))
        if isinstance(path, Path) and not path.is_file():
            continue
        if stem in out:
            dups.append(f"{_name(out[stem])} / {name}")
        out[stem] = path
    if dups:
        raise PairingError(f"{storage.redact(folder)}: several videos share a name: {', '.join(dups)}")
    return out


def pair_videos(real_dir: PathLike, generated_dir: PathLike, subset_size: Optional[int] = None) -> List[VideoPair]:
    real, gen = list_videos(real_dir), list_videos(generated_dir)
    only_real, only_gen = sorted(set(real) - set(gen)), sorted(set(gen) - set(real))
    if only_real or only_gen:
        lines = []
        if only_real:
            lines.append(f"only in {storage.redact(real_dir)}: {', '.join(_name(real[s]) for s in only_real)}")
        if only_gen:
            lines.append(f"only in {storage.redact(generated_dir)}: {', '.join(_name(gen[s]) for s in only_gen)}")
        raise PairingError("real and generated videos do not match by name:\n  " + "\n  ".join(lines))
    if not real:
        raise PairingError(f"no videos ({', '.join(sorted(VIDEO_EXTENSIONS))}) in {storage.redact(real_dir)} / "
                           f"{storage.redact(generated_dir)}")
    pairs = [VideoPair(s, real[s], gen[s]) for s in sorted(real)]
    if subset_size is not None:
        if subset_size < 1:
            raise ValueError(f"subset_size must be positive, got {subset_size}")
        pairs = pairs[:subset_size]
    return pairs


def sample_indices(total_frames: int, num_frames: int, sample_rate: int = 1) -> List[int]:
    """Frame indices of the reference sampler (module docstring); ValueError on bad arguments or a short clip."""
    if num_frames < 1 or sample_rate < 1:
        raise ValueError(f"num_frames and sample_rate must be >= 1, got {num_frames}, {sample_rate}")
    span = num_frames * sample_rate
    if total_frames < span:
        raise ValueError(f"needs {span} frames (num_frames {num_frames} x sample_rate {sample_rate}), has "
                         f"{total_frames}")
    return np.linspace(0, span - 1, num_frames).astype(int).tolist()


def load_clip(
    path: PathLike, num_frames: int, sample_rate: int = 1, resolution: Optional[int] = None,
    crop_size: Optional[int] = None,
) -> torch.Tensor:
    """One preprocessed clip: float32 (T, C, H, W) in [0, 1]."""
    info = probe_video(path)
    try:
        idx = sample_indices(info.num_frames, num_frames, sample_rate)
    except ValueError as e:
        raise ClipTooShortError(path, f"clip too short: {e}") from e
    x = read_frames(path, idx).float() / 255.0
    if resolution:
        x = resize_short_side(x, resolution, antialias=False)
    if crop_size:
        x = center_crop(x, (crop_size, crop_size))
    return x


def _load_pair(pair: VideoPair, kw: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    real, gen = load_clip(pair.real, **kw), load_clip(pair.generated, **kw)
    if real.shape != gen.shape:
        raise ValueError(
            f"{pair.name}: real clip {tuple(real.shape)} and generated clip {tuple(gen.shape)} differ in shape "
            "after preprocessing (set --crop_size so both are cropped to the same size)"
        )
    return real, gen


def iter_batches(
    pairs: Sequence[VideoPair],
    batch_size: int,
    num_frames: int,
    sample_rate: int = 1,
    resolution: Optional[int] = None,
    crop_size: Optional[int] = None,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[ClipBatch]:
    """ClipBatch of up to `batch_size` pairs at a time, in order; `num_workers` threads decode in parallel.
    Several ranks take every `world_size`-th batch from their `rank`: the batches are those of one rank, so every
    video's scores are the same bits."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kw = dict(num_frames=num_frames, sample_rate=sample_rate, resolution=resolution, crop_size=crop_size)
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        for start in rank_share(range(0, len(pairs), batch_size), rank, world_size):
            chunk = list(pairs[start : start + batch_size])
            loaded = list(pool.map(lambda p: _load_pair(p, kw), chunk)) if pool else [_load_pair(p, kw) for p in chunk]
            shapes = {r.shape for r, _ in loaded}
            if len(shapes) > 1:
                raise ValueError(f"clips in one batch differ in shape {sorted(map(tuple, shapes))}: set --crop_size")
            yield ClipBatch(
                names=[p.name for p in chunk],
                real=torch.stack([r for r, _ in loaded]),
                generated=torch.stack([g for _, g in loaded]),
            )
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
