"""Builds LPIPS networks offline.

The `lpips` package ships only its linear-layer weights; its backbone would be fetched by torchvision from the
internet. Here the backbone is built randomly and then filled from a local torchvision checkpoint file instead.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import List, Optional, Union
from urllib.parse import urlparse

import lpips
import torch
from torchvision import models as tv_models

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# lpips net name -> the torchvision weights lpips would download (its `pretrained=True` means IMAGENET1K_V1).
_BACKBONE_WEIGHTS = {
    "vgg": tv_models.VGG16_Weights.IMAGENET1K_V1,
    "vgg16": tv_models.VGG16_Weights.IMAGENET1K_V1,
    "alex": tv_models.AlexNet_Weights.IMAGENET1K_V1,
    "squeeze": tv_models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
}


class MissingWeightsError(FileNotFoundError):
    """A pretrained weights file needed offline is not on disk."""

    def __init__(self, message: str, searched: Optional[List[str]] = None):
        super().__init__(message)
        self.searched = list(searched or [])


def backbone_filename(net: str) -> str:
    """File name torchvision gives the ImageNet backbone of lpips net `net` in its hub cache."""
    _check_net(net)
    return os.path.basename(urlparse(_BACKBONE_WEIGHTS[net].url).path)


def default_backbone_path(net: str) -> Path:
    """Where torchvision would cache the backbone: <torch.hub.get_dir()>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / backbone_filename(net)


def _check_net(net: str) -> None:
    if net not in _BACKBONE_WEIGHTS:
        raise ValueError(f"unknown LPIPS net {net!r}; expected one of {sorted(_BACKBONE_WEIGHTS)}")


def _missing_message(net: str, searched: List[str]) -> str:
    name = backbone_filename(net)
    places = "\n".join(f"  - {p}" for p in searched)
    return (
        f"LPIPS[{net}] needs torchvision's ImageNet backbone weights '{name}' "
        f"({_BACKBONE_WEIGHTS[net].url}), which cannot be downloaded here. Looked at:\n{places}\n"
        f"Copy the file to {default_backbone_path(net)} (torch.hub.get_dir()/checkpoints/, or set TORCH_HOME), "
        f"or pass its path explicitly (build_lpips(backbone_path=...) / config key 'lpips_backbone_path')."
    )


def _map_backbone_state(net_module: torch.nn.Module, tv_state: dict, source: str) -> dict:
    """Rename torchvision `features.<i>.*` keys to lpips's `slice<k>.<i>.*` keys.

    lpips's backbone classes move torchvision's `features[i]` into `slice<k>` under the child name str(i),
    so the layer index is kept and only the slice has to be found.
    """
    slice_of_index = {}
    for slice_name, child in net_module.named_children():
        if slice_name.startswith("slice"):
            for idx in child._modules:
                slice_of_index[idx] = slice_name
    expected = set(net_module.state_dict().keys())
    mapped = {}
    pattern = re.compile(r"^features\.(\d+)\.(.+)$")
    for key, value in tv_state.items():
        m = pattern.match(key)
        if m and m.group(1) in slice_of_index:
            new_key = f"{slice_of_index[m.group(1)]}.{m.group(1)}.{m.group(2)}"
            if new_key in expected:
                mapped[new_key] = value
    missing = sorted(expected - set(mapped))
    if missing:
        raise ValueError(
            f"{source} does not look like a torchvision state dict for this LPIPS backbone: "
            f"no weights for {missing[:6]}{' ...' if len(missing) > 6 else ''} "
            f"(expected torchvision keys like 'features.0.weight')"
        )
    for key, value in mapped.items():
        want = net_module.state_dict()[key].shape
        if value.shape != want:
            raise ValueError(f"{source}: weight {key} has shape {tuple(value.shape)}, LPIPS expects {tuple(want)}")
    return mapped


def build_lpips(
    net: str = "vgg",
    backbone_path: Optional[PathLike] = None,
    random_backbone: bool = False,
    device: Optional[Union[str, torch.device]] = None,
) -> lpips.LPIPS:
    """A frozen, eval-mode LPIPS model built without network access.

    Linear layers come from the `lpips` package; the backbone from `backbone_path` (a torchvision state dict)
    or, when None, from torchvision's hub cache file. `random_backbone=True` keeps a random backbone (tests only).
    """
    _check_net(net)
    path = Path(backbone_path).expanduser() if backbone_path is not None else default_backbone_path(net)
    if not random_backbone and not path.is_file():
        raise MissingWeightsError(_missing_message(net, [str(path)]), searched=[str(path)])

    # pnet_rand=True stops torchvision from downloading; verbose=False and the filter silence construction noise
    # (lpips prints, torchvision warns about the deprecated `pretrained` argument lpips still passes).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)

    if random_backbone:
        logger.warning("LPIPS[%s] uses a RANDOM backbone: its values are meaningless (tests only)", net)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, expected a torchvision state dict")
        model.net.load_state_dict(_map_backbone_state(model.net, state, str(path)), strict=True)

    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


def lpips_distance(model: lpips.LPIPS, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS distance: (N, 3, H, W) images in [-1, 1] -> (N,)."""
    if a.shape != b.shape:
        raise ValueError(f"LPIPS inputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"LPIPS expects (N, 3, H, W) images, got shape {tuple(a.shape)}")
    dtype = next(model.parameters()).dtype
    return model(a.to(dtype), b.to(dtype)).reshape(a.shape[0])
