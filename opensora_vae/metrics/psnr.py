"""Per-frame PSNR of two videos, batched on the tensors' device.

Definition (Open-Sora-Plan's `cal_psnr`): per frame, mse over C, H, W of values in [0, 1];
PSNR = 20 log10(1 / sqrt(mse)), and exactly 100 when mse < 1e-10. Computed in float64.
"""
from __future__ import annotations

import torch

from .ssim import _check_videos

__all__ = ["psnr", "MAX_PSNR"]

MAX_PSNR = 100.0
_MSE_FLOOR = 1e-10
# float64 values per chunk of frames: L2-sized on CPU (the float64 copies are memory-bound), large on GPU
_CHUNK_VALUES = {"cpu": 2**17, "cuda": 2**24}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR of videos (B, T, C, H, W) in [0, 1] -> (B, T) float64, one value per frame."""
    _check_videos(a, b)
    x, y = a.detach().flatten(0, 1), b.detach().flatten(0, 1)
    # frames in chunks: the float64 copies stay small (cache-sized on CPU) instead of doubling the whole batch
    step = max(1, _CHUNK_VALUES.get(a.device.type, _CHUNK_VALUES["cuda"]) // x[0].numel())
    mse = torch.cat([
        (x[i : i + step].to(torch.float64) - y[i : i + step].to(torch.float64)).pow(2).mean(dim=(1, 2, 3))
        for i in range(0, x.shape[0], step)
    ]).reshape(a.shape[:2])
    # clamp only keeps log10 finite on the masked entries; they are replaced by MAX_PSNR below
    value = 20 * torch.log10(1.0 / torch.sqrt(mse.clamp_min(_MSE_FLOOR)))
    return torch.where(mse < _MSE_FLOOR, torch.full_like(value, MAX_PSNR), value)
