"""Per-frame PSNR of two videos, batched on the tensors' device.

Definition (Open-Sora-Plan's `cal_psnr`): per frame, mse over C, H, W of values in [0, 1];
PSNR = 20 log10(1 / sqrt(mse)), and exactly 100 when mse < 1e-10.

Precision: squares and sums are float64. Two float32 inputs are subtracted in float32 (torch computes in the
inputs' dtype and writes the result widened into the float64 buffer; other dtypes are converted to float64
first). The float32 difference is correctly rounded, off by at most 2^-24 relative, and its square is exact in
float64, so each squared term and hence the mse are off by at most 2^-23 relative, and PSNR by at most
10 log10(1 + 2^-23) = 5.2e-7 dB (reached only by contrived frames, see the tests). One pass instead of converting
both inputs first: PSNR on CPU is limited by memory traffic.

Speed: frames are cut into chunks (chunks.py): on CPU one frame of up to 2^18 values (larger frames in pieces),
differenced into a reused buffer and reduced by a BLAS dot product, on all torch threads; on GPU many frames per
chunk.
"""
from __future__ import annotations

import torch

from .chunks import map_chunks, scratch_buffer
from .ssim import _check_videos

__all__ = ["psnr", "MAX_PSNR"]

MAX_PSNR = 100.0
_MSE_FLOOR = 1e-10
# input values per chunk: one 3x256x256 frame on CPU (fewer, larger ops beat smaller cache-sized ones), large on GPU
_CHUNK_VALUES = {"cpu": 2**18, "cuda": 2**24}


def _sse(x: torch.Tensor, y: torch.Tensor, scratch: dict) -> torch.Tensor:
    """Sum of squared differences of each row of x, y: (N, V) -> (N,) float64 (see the module docstring)."""
    d = scratch_buffer(scratch, "d", x.shape, x.device)
    if x.dtype == y.dtype and x.dtype in (torch.float32, torch.float64):
        torch.sub(x, y, out=d)  # computed in the inputs' dtype, written widened to float64: one pass
    else:  # uint8 would wrap around, half precision would round: both to float64 first (exact)
        d.copy_(x).sub_(scratch_buffer(scratch, "e", y.shape, y.device).copy_(y))
    # squares summed in float64: one row is a BLAS dot (CPU chunks of large frames); several rows (small frames, GPU)
    # a vecdot (a batched matmul of several rows is slow on CPU)
    return torch.dot(d[0], d[0]).view(1) if d.shape[0] == 1 else torch.linalg.vecdot(d, d)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR of videos (B, T, C, H, W) in [0, 1] -> (B, T) float64, one value per frame."""
    _check_videos(a, b)
    x, y = a.detach().flatten(0, 1).flatten(1), b.detach().flatten(0, 1).flatten(1)
    frames, values = x.shape
    limit = _CHUNK_VALUES.get(a.device.type, _CHUNK_VALUES["cuda"])
    # chunks of whole frames, or of pieces of one frame when a frame is larger than the chunk
    step, piece = max(1, limit // values), min(values, limit)
    chunks = [(slice(f, f + step), slice(v, v + piece))
              for f in range(0, frames, step) for v in range(0, values, piece)]
    parts = map_chunks(lambda c, scratch: _sse(x[c], y[c], scratch), chunks, a.device)
    mse = (torch.cat(parts).view(frames, -1).sum(dim=1) / values).reshape(a.shape[:2])
    # clamp only keeps log10 finite on the masked entries; they are replaced by MAX_PSNR below
    value = 20 * torch.log10(1.0 / torch.sqrt(mse.clamp_min(_MSE_FLOOR)))
    return torch.where(mse < _MSE_FLOOR, torch.full_like(value, MAX_PSNR), value)
