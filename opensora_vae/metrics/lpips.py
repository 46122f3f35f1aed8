"""Per-frame LPIPS of two videos with the `lpips` package's metric (v0.1, AlexNet or VGG trunk).

Frames in [0, 1] are scaled to [-1, 1] (what `lpips.LPIPS(..., normalize=True)` does) and all B*T frames are
run through the network in chunks on the tensors' device. Networks come from
`opensora_vae.perceptual.build_lpips`, which never downloads and raises MissingWeightsError when the torchvision
backbone file is absent.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple, Union

import torch

from opensora_vae.perceptual import build_lpips, lpips_distance

from .ssim import _check_videos

__all__ = ["lpips", "get_lpips_model"]

_MODELS: Dict[Tuple, torch.nn.Module] = {}


def get_lpips_model(
    net: str = "alex",
    backbone_path: Optional[Union[str, os.PathLike]] = None,
    random_backbone: bool = False,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.nn.Module:
    """build_lpips, memoised per (net, backbone, device) so repeated batches reuse one network."""
    key = (net, None if backbone_path is None else os.fspath(backbone_path), random_backbone,
           str(torch.device(device or "cpu")))
    if key not in _MODELS:
        _MODELS[key] = build_lpips(net=net, backbone_path=backbone_path, random_backbone=random_backbone,
                                   device=device or "cpu")
    return _MODELS[key]


@torch.no_grad()
def lpips(
    a: torch.Tensor,
    b: torch.Tensor,
    net: str = "alex",
    model: Optional[torch.nn.Module] = None,
    backbone_path: Optional[Union[str, os.PathLike]] = None,
    random_backbone: bool = False,
    chunk_size: int = 64,
) -> torch.Tensor:
    """LPIPS of videos (B, T, 3, H, W) in [0, 1] -> (B, T) float32, one distance per frame.

    `model` (an lpips.LPIPS) overrides `net` / `backbone_path` / `random_backbone`.
    """
    _check_videos(a, b)
    bsz, t = a.shape[:2]
    if model is None:
        model = get_lpips_model(net, backbone_path, random_backbone, a.device)
    x = a.detach().flatten(0, 1) * 2 - 1
    y = b.detach().flatten(0, 1) * 2 - 1
    out = [lpips_distance(model, x[i : i + chunk_size], y[i : i + chunk_size])
           for i in range(0, x.shape[0], chunk_size)]
    return torch.cat(out).reshape(bsz, t)
