"""Per-frame SSIM of two videos, batched on the tensors' device.

Definition (the one behind the Open-Sora / Open-Sora-Plan tables, which used OpenCV `filter2D` + a
`[5:-5, 5:-5]` crop): per channel, local statistics from an 11x11 Gaussian window (sigma 1.5) over the
valid region only (no padding: an HxW frame gives an (H-10)x(W-10) map), population (biased) variances,
C1 = (0.01 L)^2, C2 = (0.03 L)^2 with data range L = 1, mean of the SSIM map, then mean over channels.
Computed in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ssim", "gaussian_window"]

WINDOW_SIZE = 11
SIGMA = 1.5
C1 = 0.01**2
C2 = 0.03**2


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


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of videos (B, T, C, H, W) in [0, 1] -> (B, T) float64, one value per frame."""
    _check_videos(a, b)
    bsz, t, c, h, w = a.shape
    if h < WINDOW_SIZE or w < WINDOW_SIZE:
        raise ValueError(f"SSIM needs frames of at least {WINDOW_SIZE}x{WINDOW_SIZE}, got {h}x{w}")
    x = a.detach().to(torch.float64).reshape(bsz * t * c, 1, h, w)
    y = b.detach().to(torch.float64).reshape(bsz * t * c, 1, h, w)
    # the five moments as channels of one tensor, so a grouped separable conv filters all of them at once
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    g = gaussian_window(device=a.device)
    stats = F.conv2d(stats, g.view(1, 1, 1, -1).expand(5, 1, 1, WINDOW_SIZE), groups=5)
    stats = F.conv2d(stats, g.view(1, 1, -1, 1).expand(5, 1, WINDOW_SIZE, 1), groups=5)
    mu_x, mu_y, xx, yy, xy = stats.unbind(dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = xx - mu_xx, yy - mu_yy, xy - mu_xy
    ssim_map = ((2 * mu_xy + C1) * (2 * cov + C2)) / ((mu_xx + mu_yy + C1) * (var_x + var_y + C2))
    return ssim_map.mean(dim=(-2, -1)).reshape(bsz, t, c).mean(dim=-1)
