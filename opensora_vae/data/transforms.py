"""Clip transforms on (T, C, H, W) tensors, as the reference's "center" transforms.

Videos: frames in float, scaled by one `scale_factor` (bilinear, no antialias by default), then cropped; the
result stays float (no rounding back to 8 bits). Images: the ADM centre crop (PIL box halving, then bicubic),
which is what the reference applies to image rows.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["center_crop", "center_crop_image", "random_crop", "resize", "resize_crop", "resize_short_side",
           "to_model_range"]


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


def _check(frames: torch.Tensor) -> None:
    if frames.ndim != 4:
        raise ValueError(f"expected (T, C, H, W), got shape {tuple(frames.shape)}")


def _as_dtype(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dtype == torch.uint8:
        return x.round_().clamp_(0, 255).to(torch.uint8)
    return x.to(like.dtype)


def resize(frames: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of (T, C, H, W) to exactly (h, w) (uint8 in, uint8 out, rounded)."""
    _check(frames)
    h, w = size
    if (frames.shape[-2], frames.shape[-1]) == (h, w):
        return frames
    x = frames.float() if not frames.is_floating_point() else frames
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=antialias)
    return _as_dtype(x, frames)


def resize_short_side(frames: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """Shorter side to `size`, long side floor(long * size / short), as pytorchvideo's ShortSideScale."""
    _check(frames)
    H, W = frames.shape[-2:]
    if H <= W:
        h, w = size, max(size, math.floor(W / H * size))
    else:
        h, w = max(size, math.floor(H / W * size)), size
    return resize(frames, (h, w), antialias=antialias)


def _crop_dims(frames: torch.Tensor, size: int | Sequence[int]) -> tuple[int, int, int, int]:
    _check(frames)
    h, w = _size2(size)
    H, W = frames.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"crop {(h, w)} larger than frame {(H, W)}")
    return h, w, H, W


def center_crop(frames: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Offsets round((H - h) / 2) (half to even), as torchvision's and the reference's centre crops."""
    h, w, H, W = _crop_dims(frames, size)
    top, left = int(round((H - h) / 2.0)), int(round((W - w) / 2.0))
    return frames[..., top : top + h, left : left + w]


def random_crop(
    frames: torch.Tensor, size: int | Sequence[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """The same random window for every frame of the clip (offsets drawn from `generator`)."""
    h, w, H, W = _crop_dims(frames, size)
    top = int(torch.randint(0, H - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, W - w + 1, (1,), generator=generator))
    return frames[..., top : top + h, left : left + w]


def _scale(x: torch.Tensor, scale: float, min_size: tuple[int, int], antialias: bool) -> torch.Tensor:
    """Bilinear resize by `scale` (pixel centres mapped with the factor itself, as F.interpolate(scale_factor=)).

    The output is floor(side * scale) as there, but never below `min_size`: in floating point
    floor(short * size / short) can come out one short (e.g. 98 -> 16 gives 15), which the reference
    cannot crop; the extra row repeats the edge sample.
    """
    H, W = x.shape[-2:]
    out = [max(min_size[0], math.floor(H * scale)), max(min_size[1], math.floor(W * scale))]
    op = torch.ops.aten._upsample_bilinear2d_aa if antialias else torch.ops.aten.upsample_bilinear2d
    return op(x, out, False, scale, scale)


def resize_crop(
    frames: torch.Tensor,
    size: int | Sequence[int],
    crop: str = "center",
    generator: torch.Generator | None = None,
    antialias: bool = False,
) -> torch.Tensor:
    """Scale by max(h/H, w/W) (for a square `size`: size / short side), then crop to (h, w); float32 out.

    With a square size and crop="center" this is the reference's "center" video transform
    (UCFCenterCropVideo): `F.interpolate(scale_factor=size / short_side, mode="bilinear",
    align_corners=False)` in float, then a centre crop. uint8 input is converted to float first and the
    result is not rounded. `antialias=True` low-pass filters when shrinking (not the reference's behaviour).
    """
    _check(frames)
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    h, w = _size2(size)
    H, W = frames.shape[-2:]
    x = frames.float()
    scale = max(h / H, w / W)
    if scale != 1.0:
        x = _scale(x, scale, (h, w), antialias)
    return center_crop(x, (h, w)) if crop == "center" else random_crop(x, (h, w), generator)


def center_crop_image(frames: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """The ADM centre crop the reference applies to images: uint8 (T, C, H, W) -> uint8 (T, C, h, w).

    While both sides are at least twice the target, halve with a box filter; then scale with bicubic so both
    sides cover the target (the size rounded), and crop the centre (offsets floored).
    """
    _check(frames)
    if frames.dtype != torch.uint8:
        raise ValueError(f"center_crop_image expects uint8 frames, got {frames.dtype}")
    h, w = _size2(size)
    out = []
    for frame in frames:
        img = Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy().squeeze(-1) if frame.shape[0] == 1
                              else frame.permute(1, 2, 0).contiguous().numpy())
        while img.width >= 2 * w and img.height >= 2 * h:
            img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
        scale = max(h / img.height, w / img.width)
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                         resample=Image.BICUBIC)
        arr = np.asarray(img)
        top, left = (arr.shape[0] - h) // 2, (arr.shape[1] - w) // 2
        arr = arr[top : top + h, left : left + w]
        out.append(torch.from_numpy(arr.copy()).reshape(h, w, -1).permute(2, 0, 1))
    return torch.stack(out)


def to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """(T, C, H, W) -> float32 (C, T, H, W) in [-1, 1]; uint8 is taken as 0..255, float as [0, 1]."""
    _check(frames)
    x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    return ((x - 0.5) / 0.5).permute(1, 0, 2, 3).contiguous()
