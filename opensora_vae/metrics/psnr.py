"""Per-frame PSNR of two videos, batched on the tensors' device.

Definition (Open-Sora-Plan's `cal_psnr`): per frame, mse over C, H, W of values in [0, 1];
PSNR = 20 log10(1 / sqrt(mse)), and exactly 100 when mse < 1e-10. Computed in float64 (the differences of
float32 inputs are exact in float64).

Speed: frames are cut into chunks (chunks.py): on CPU at most 2^17 values, converted into reused float64 buffers
and reduced by a BLAS dot product in a thread pool; on GPU many frames per chunk.
"""
from __future__ import annotations

import torch

from .chunks import map_chunks, scratch_buffer
from .ssim import _check_videos

__all__ = ["psnr", "MAX_PSNR"]

MAX_PSNR = 100.0
_MSE_FLOOR = 1e-10
# input values per chunk: L2-sized on CPU (the float64 copies are memory-bound), large on GPU
_CHUNK_VALUES = {"cpu": 2**17, "cuda": 2**24}


def _sse(x: torch.Tensor, y: torch.Tensor, scratch: dict) -> torch.Tensor:
    """Sum of squared differences of each row of x, y (any real dtype) in float64: (N, V) -> (N,)."""
    d = scratch_buffer(scratch, "x", x.shape, x.device)
    e = scratch_buffer(scratch, "y", y.shape, y.device)
    d.copy_(x)
    e.copy_(y)  # two same-dtype copies and a float64 sub: faster than one mixed-dtype sub
    d.sub_(e)
    return torch.matmul(d.unsqueeze(-2), d.unsqueeze(-1)).flatten()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR of videos (B, T, C, H, W) in [0, 1] -> (B, T) float64, one value per frame."""
    _check_videos(a, b)
    x, y = a.detach().flatten(0, 1).flatten(1), b.detach().flatten(0, 1).flatten(1)
    frames, values = x.shape
    limit = _CHUNK_VALUES.get(a.device.type, _CHUNK_VALUES["cuda"])
    # chunks of whole frames, or of pieces of one frame when a frame is larger than the chunk
    step, piece = max(1, limit // values), min(values, limit)
    chunks = [(slice(f, f + step), slice(v, v + piece)) for f in range(0, frames, step) for v in range(0, values, piece)]
    parts = map_chunks(lambda c, scratch: _sse(x[c], y[c], scratch), chunks, a.device)
    mse = (torch.cat(parts).view(frames, -1).sum(dim=1) / values).reshape(a.shape[:2])
    # clamp only keeps log10 finite on the masked entries; they are replaced by MAX_PSNR below
    value = 20 * torch.log10(1.0 / torch.sqrt(mse.clamp_min(_MSE_FLOOR)))
    return torch.where(mse < _MSE_FLOOR, torch.full_like(value, MAX_PSNR), value)
