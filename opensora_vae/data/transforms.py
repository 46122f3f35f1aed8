"""Batched clip transforms on (T, C, H, W) tensors (uint8 or float), pure torch.

uint8 inputs are resized in float32 and rounded back to uint8, so the output dtype matches the input.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["center_crop", "random_crop", "resize", "resize_crop", "resize_short_side", "to_model_range"]


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


def _check(frames: torch.Tensor) -> None:
    if frames.ndim != 4:
        raise ValueError(f"expected (T, C, H, W), got shape {tuple(frames.shape)}")


def resize(frames: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of (T, C, H, W) to exactly (h, w)."""
    _check(frames)
    h, w = size
    if (frames.shape[-2], frames.shape[-1]) == (h, w):
        return frames
    x = frames.float() if not frames.is_floating_point() else frames
    # antialias only matters (and is only supported) when shrinking
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=antialias)
    if frames.dtype == torch.uint8:
        return x.round_().clamp_(0, 255).to(torch.uint8)
    return x.to(frames.dtype)


def resize_short_side(frames: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """Scale so the shorter side equals `size`, keeping the aspect ratio (long side rounded)."""
    _check(frames)
    H, W = frames.shape[-2:]
    if H <= W:
        h, w = size, max(size, round(W * size / H))
    else:
        h, w = max(size, round(H * size / W)), size
    return resize(frames, (h, w), antialias=antialias)


def _crop_dims(frames: torch.Tensor, size: int | Sequence[int]) -> tuple[int, int, int, int]:
    _check(frames)
    h, w = _size2(size)
    H, W = frames.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"crop {(h, w)} larger than frame {(H, W)}")
    return h, w, H, W


def center_crop(frames: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    h, w, H, W = _crop_dims(frames, size)
    top, left = (H - h) // 2, (W - w) // 2
    return frames[..., top : top + h, left : left + w]


def random_crop(
    frames: torch.Tensor, size: int | Sequence[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """The same random window for every frame of the clip (offsets drawn from `generator`)."""
    h, w, H, W = _crop_dims(frames, size)
    top = int(torch.randint(0, H - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, W - w + 1, (1,), generator=generator))
    return frames[..., top : top + h, left : left + w]


def resize_crop(
    frames: torch.Tensor,
    size: int | Sequence[int],
    crop: str = "center",
    generator: torch.Generator | None = None,
    antialias: bool = True,
) -> torch.Tensor:
    """Scale by max(h/H, w/W) so both sides cover the target, then crop to (h, w)."""
    _check(frames)
    h, w = _size2(size)
    H, W = frames.shape[-2:]
    scale = max(h / H, w / W)
    # max() guards against rounding leaving a side one pixel short
    frames = resize(frames, (max(h, round(H * scale)), max(w, round(W * scale))), antialias=antialias)
    if crop == "center":
        return center_crop(frames, (h, w))
    if crop == "random":
        return random_crop(frames, (h, w), generator)
    raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")


def to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (T, C, H, W) -> float32 (C, T, H, W) in [-1, 1]."""
    _check(frames)
    if frames.dtype != torch.uint8:
        raise ValueError(f"to_model_range expects uint8 frames, got {frames.dtype}")
    return (frames.permute(1, 0, 2, 3).float() / 127.5 - 1.0).contiguous()
