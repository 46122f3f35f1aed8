"""Per-frame SSIM of two videos, batched on the tensors' device.

Definition (the one behind the Open-Sora / Open-Sora-Plan tables, which used OpenCV `filter2D` + a
`[5:-5, 5:-5]` crop): per channel, local statistics from an 11x11 Gaussian window (sigma 1.5) over the
valid region only (no padding: an HxW frame gives an (H-10)x(W-10) map), population (biased) variances,
C1 = (0.01 L)^2, C2 = (0.03 L)^2 with data range L = 1, mean of the SSIM map, then mean over channels.
Computed in float64.

Speed: the 2-D window is separable, so each of the five moment maps is filtered by two 1-D passes (22 taps
instead of 121), each pass a sum of shifted slices (float64 convolutions have no fast CPU kernel). Planes are
processed in chunks that stay small enough to be cache-friendly on CPU and bounded in memory on GPU.
"""
from __future__ import annotations

import torch

__all__ = ["ssim", "gaussian_window"]

WINDOW_SIZE = 11
SIGMA = 1.5
C1 = 0.01**2
C2 = 0.03**2
# float64 values of input planes per chunk (the five moment maps take 5x this, the filtered ones ~2x more)
_CHUNK_VALUES = {"cpu": 2**20, "cuda": 2**24}


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = SIGMA, dtype=torch.float64, device=None) -> torch.Tensor:
    """1-D normalised Gaussian taps (same as cv2.getGaussianKernel / scipy's gaussian_filter at radius 5)."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _check_videos(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 5:
        raise ValueError(f"expected (B, T, C, H, W) videos, got shape {tuple(a.shape)}")


def _valid_filter(s: torch.Tensor, taps, dim: int) -> torch.Tensor:
    """Valid-region correlation of `s` with 1-D `taps` along `dim` (-1 or -2), as a sum of shifted slices."""
    n = s.shape[dim] - len(taps) + 1
    out = s.narrow(dim, 0, n) * taps[0]
    for k in range(1, len(taps)):
        out.add_(s.narrow(dim, k, n), alpha=taps[k])
    return out


def _ssim_planes(x: torch.Tensor, y: torch.Tensor, taps) -> torch.Tensor:
    """Mean SSIM of each (H, W) plane of float64 x, y: (N, H, W) -> (N,)."""
    stats = torch.stack([x, y, x * x, y * y, x * y])
    stats = _valid_filter(_valid_filter(stats, taps, -1), taps, -2)
    mu_x, mu_y, xx, yy, xy = stats.unbind(0)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = xx - mu_xx, yy - mu_yy, xy - mu_xy
    ssim_map = ((2 * mu_xy + C1) * (2 * cov + C2)) / ((mu_xx + mu_yy + C1) * (var_x + var_y + C2))
    return ssim_map.mean(dim=(-2, -1))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of videos (B, T, C, H, W) in [0, 1] -> (B, T) float64, one value per frame."""
    _check_videos(a, b)
    bsz, t, c, h, w = a.shape
    if h < WINDOW_SIZE or w < WINDOW_SIZE:
        raise ValueError(f"SSIM needs frames of at least {WINDOW_SIZE}x{WINDOW_SIZE}, got {h}x{w}")
    taps = gaussian_window().tolist()  # Python floats are float64: exact scalar multipliers
    x, y = a.detach().reshape(-1, h, w), b.detach().reshape(-1, h, w)
    step = max(1, _CHUNK_VALUES.get(a.device.type, _CHUNK_VALUES["cuda"]) // (h * w))
    means = [
        _ssim_planes(x[i : i + step].to(torch.float64), y[i : i + step].to(torch.float64), taps)
        for i in range(0, x.shape[0], step)
    ]
    return torch.cat(means).reshape(bsz, t, c).mean(dim=-1)
