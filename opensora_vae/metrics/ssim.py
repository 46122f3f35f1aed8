"""Per-frame SSIM of two videos, batched on the tensors' device.

Definition (the one behind the Open-Sora / Open-Sora-Plan tables, which used OpenCV `filter2D` + a
`[5:-5, 5:-5]` crop): per channel, local statistics from an 11x11 Gaussian window (sigma 1.5) over the
valid region only (no padding: an HxW frame gives an (H-10)x(W-10) map), population (biased) variances,
C1 = (0.01 L)^2, C2 = (0.03 L)^2 with data range L = 1, mean of the SSIM map, then mean over channels.
Computed in float64.

Speed: the 2-D window is separable, so each moment map is filtered by two 1-D passes (22 taps instead of 121),
each pass a sum of shifted slices into a reused buffer (float64 convolutions have no fast CPU kernel). SSIM
needs only var_x + var_y, so four maps are filtered (x, y, x^2 + y^2, xy) instead of five. Planes are processed
in chunks (chunks.py): one plane per chunk in a thread pool on CPU, large chunks on GPU.
"""
from __future__ import annotations

import torch

from .chunks import map_chunks, scratch_buffer

__all__ = ["ssim", "gaussian_window"]

WINDOW_SIZE = 11
SIGMA = 1.5
C1 = 0.01**2
C2 = 0.03**2
# input values per chunk of planes: one 256x256 plane on CPU (the float64 buffers stay cache-sized), large on GPU
_CHUNK_VALUES = {"cpu": 2**16, "cuda": 2**24}


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


def _valid_filter(s: torch.Tensor, taps, dim: int, out: torch.Tensor) -> torch.Tensor:
    """Valid-region correlation of `s` with 1-D `taps` along `dim`, written into `out`, as a sum of shifted slices."""
    n = out.shape[dim]
    torch.mul(s.narrow(dim, 0, n), taps[0], out=out)
    for k in range(1, len(taps)):
        out.add_(s.narrow(dim, k, n), alpha=taps[k])
    return out


def _ssim_planes(x: torch.Tensor, y: torch.Tensor, taps, scratch: dict) -> torch.Tensor:
    """Mean SSIM map of each (H, W) plane of x, y (any real dtype, computed in float64): (N, H, W) -> (N,)."""
    n, h, w = x.shape
    k = len(taps) - 1
    dev = x.device
    s = scratch_buffer(scratch, "moments", (4, n, h, w), dev)
    hs = scratch_buffer(scratch, "rows", (4, n, h, w - k), dev)
    v = scratch_buffer(scratch, "window", (4, n, h - k, w - k), dev)
    num = scratch_buffer(scratch, "num", (n, h - k, w - k), dev)
    s[0].copy_(x)
    s[1].copy_(y)
    torch.mul(s[0], s[0], out=s[2]).addcmul_(s[1], s[1])
    torch.mul(s[0], s[1], out=s[3])
    _valid_filter(_valid_filter(s, taps, -1, hs), taps, -2, v)
    mu_x, mu_y, sq, xy = v.unbind(0)  # window means of x, y, x^2 + y^2, xy
    torch.mul(mu_x, mu_y, out=num)
    xy.sub_(num).mul_(2).add_(C2)  # 2 cov + C2
    num.mul_(2).add_(C1).mul_(xy)  # (2 mu_x mu_y + C1)(2 cov + C2)
    mu_x.square_().addcmul_(mu_y, mu_y)  # mu_x^2 + mu_y^2
    sq.sub_(mu_x).add_(C2)  # var_x + var_y + C2
    mu_x.add_(C1).mul_(sq)
    return num.div_(mu_x).mean(dim=(-2, -1))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of videos (B, T, C, H, W) in [0, 1] -> (B, T) float64, one value per frame."""
    _check_videos(a, b)
    bsz, t, c, h, w = a.shape
    if h < WINDOW_SIZE or w < WINDOW_SIZE:
        raise ValueError(f"SSIM needs frames of at least {WINDOW_SIZE}x{WINDOW_SIZE}, got {h}x{w}")
    taps = gaussian_window().tolist()  # Python floats are float64: exact scalar multipliers
    x, y = a.detach().reshape(-1, h, w), b.detach().reshape(-1, h, w)
    step = max(1, _CHUNK_VALUES.get(a.device.type, _CHUNK_VALUES["cuda"]) // (h * w))
    chunks = [slice(i, i + step) for i in range(0, x.shape[0], step)]
    means = map_chunks(lambda sl, scratch: _ssim_planes(x[sl], y[sl], taps, scratch), chunks, a.device)
    return torch.cat(means).reshape(bsz, t, c).mean(dim=-1)
