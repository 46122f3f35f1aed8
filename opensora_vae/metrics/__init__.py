"""Reconstruction metrics for video VAEs: SSIM, PSNR, LPIPS and FloLPIPS, each (B, T, C, H, W) in [0, 1] -> (B, T).

Note: the functions `ssim`, `psnr`, `lpips`, `flolpips` shadow their submodules as package attributes; import
other names from the submodules with `from opensora_vae.metrics.lpips import get_lpips_model`.
"""
from .evaluate import METRICS, evaluate, format_table, resolve_device
from .flolpips import flolpips
from .lpips import lpips
from .pairs import ClipTooShortError, PairingError, iter_batches, load_clip, pair_videos, sample_indices
from .psnr import psnr
from .pwcnet import PWCNet, correlation, load_pwcnet
from .ssim import ssim

__all__ = [
    "METRICS",
    "ClipTooShortError",
    "PWCNet",
    "PairingError",
    "correlation",
    "evaluate",
    "flolpips",
    "format_table",
    "iter_batches",
    "load_clip",
    "load_pwcnet",
    "lpips",
    "pair_videos",
    "psnr",
    "resolve_device",
    "sample_indices",
    "ssim",
]
