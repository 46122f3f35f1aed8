"""PWC-Net optical flow (Sun et al., CVPR 2018) in plain PyTorch, as used by FloLPIPS.

Layer names and sizes follow sniklaus/pytorch-pwc (the network FloLPIPS and Open-Sora-Plan's eval use), so its
published `network-default.pytorch` loads with strict key matching after the usual 'module' -> 'net' rename.
The correlation (cost volume) layer, a CuPy kernel there, is written here with shifted products so that it runs
on any device.

Weights are never downloaded. They are looked up, in order, at the `weights` argument, the file named by
$OPENSORA_VAE_PWCNET_WEIGHTS, and torch's hub cache (<torch.hub.get_dir()>/checkpoints/network-default.pytorch,
where `torch.hub.load_state_dict_from_url` in the reference code leaves it).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from opensora_vae.perceptual import MissingWeightsError

__all__ = [
    "PWCNet",
    "correlation",
    "backwarp",
    "load_pwcnet",
    "resolve_pwcnet_weights",
    "WEIGHTS_ENV",
    "WEIGHTS_FILENAME",
    "WEIGHTS_URL",
]

WEIGHTS_ENV = "OPENSORA_VAE_PWCNET_WEIGHTS"
WEIGHTS_FILENAME = "network-default.pytorch"
WEIGHTS_URL = "http://content.sniklaus.com/github/pytorch-pwc/network-default.pytorch"
MAX_DISPLACEMENT = 4
_CORR_CHANNELS = (2 * MAX_DISPLACEMENT + 1) ** 2  # 81
_DENSE = (128, 128, 96, 64, 32)  # output widths of the densely connected decoder convs
_EXTRACTOR = (3, 16, 32, 64, 96, 128, 196)
_FLOW_SCALE = 20.0  # the network predicts flow / 20


def correlation(first: torch.Tensor, second: torch.Tensor, max_displacement: int = MAX_DISPLACEMENT) -> torch.Tensor:
    """Cost volume: out[n, (dy + d) * (2d + 1) + (dx + d), y, x]
    = mean_c first[n, c, y, x] * second[n, c, y + dy, x + dx].

    `second` is zero outside the frame; the channel order (dy outer, dx inner) matches the CUDA kernel.
    """
    if first.shape != second.shape:
        raise ValueError(f"correlation inputs differ in shape: {tuple(first.shape)} vs {tuple(second.shape)}")
    d = max_displacement
    _, c, h, w = first.shape
    padded = F.pad(second, (d, d, d, d))
    # one product per displacement keeps peak memory at one feature map (an unfold would need 81 of them)
    out = [
        (first * padded[:, :, dy : dy + h, dx : dx + w]).sum(dim=1)
        for dy in range(2 * d + 1)
        for dx in range(2 * d + 1)
    ]
    return torch.stack(out, dim=1) / c


def backwarp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample `x` at (pixel + flow), bilinear; pixels whose footprint leaves the frame are zeroed (reference mask).

    Kept exactly as the reference: flow is normalised by 2 / (W - 1) on an align_corners=False grid, so a flow
    of 1 moves W / (W - 1) pixels. The FloLPIPS code (and so the published FloLPIPS numbers) used this variant.
    """
    n, _, h, w = flow.shape
    gx = torch.linspace(-1.0 + 1.0 / w, 1.0 - 1.0 / w, w, device=flow.device, dtype=flow.dtype)
    gy = torch.linspace(-1.0 + 1.0 / h, 1.0 - 1.0 / h, h, device=flow.device, dtype=flow.dtype)
    grid = torch.stack([gx.view(1, w).expand(h, w), gy.view(h, 1).expand(h, w)], dim=0).unsqueeze(0)
    norm = torch.cat([flow[:, 0:1] * (2.0 / (x.shape[3] - 1.0)), flow[:, 1:2] * (2.0 / (x.shape[2] - 1.0))], dim=1)
    ones = x.new_ones(n, 1, x.shape[2], x.shape[3])
    out = F.grid_sample(
        torch.cat([x, ones], dim=1), (grid + norm).permute(0, 2, 3, 1),
        mode="bilinear", padding_mode="zeros", align_corners=False,
    )
    mask = (out[:, -1:] > 0.999).to(out.dtype)
    return out[:, :-1] * mask


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=dilation, dilation=dilation)


def _lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(negative_slope=0.1, inplace=False)


class _Extractor(nn.Module):
    """Six-level feature pyramid, each level halving the resolution."""

    def __init__(self):
        super().__init__()
        names = ("netOne", "netTwo", "netThr", "netFou", "netFiv", "netSix")
        for name, cin, cout in zip(names, _EXTRACTOR, _EXTRACTOR[1:]):
            self.add_module(name, nn.Sequential(
                _conv(cin, cout, stride=2), _lrelu(), _conv(cout, cout), _lrelu(), _conv(cout, cout), _lrelu(),
            ))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = []
        for level in (self.netOne, self.netTwo, self.netThr, self.netFou, self.netFiv, self.netSix):
            x = level(x)
            feats.append(x)
        return feats


def _decoder_in(level: int) -> int:
    """Input width of level `level`'s decoder: cost volume (+ features, upsampled flow and upsampled feature)."""
    if level == 6:
        return _CORR_CHANNELS
    return _CORR_CHANNELS + _EXTRACTOR[level] + 2 + 2


class _Decoder(nn.Module):
    """Flow estimator of one pyramid level: densely connected convs on the (warped) cost volume."""

    def __init__(self, level: int):
        super().__init__()
        cin = _decoder_in(level)
        if level < 6:
            prev_out = _decoder_in(level + 1) + sum(_DENSE)
            self.netUpflow = nn.ConvTranspose2d(2, 2, kernel_size=4, stride=2, padding=1)
            self.netUpfeat = nn.ConvTranspose2d(prev_out, 2, kernel_size=4, stride=2, padding=1)
            # flow is in units of 1/20 full-res pixel; this level is 2^level times smaller
            self.backwarp_scale = _FLOW_SCALE / 2**level
        width = cin
        for name, cout in zip(("netOne", "netTwo", "netThr", "netFou", "netFiv"), _DENSE):
            self.add_module(name, nn.Sequential(_conv(width, cout), _lrelu()))
            width += cout
        self.netSix = nn.Sequential(_conv(width, 2))

    def forward(self, first: torch.Tensor, second: torch.Tensor, previous: Optional[dict]) -> dict:
        if previous is None:
            feat = F.leaky_relu(correlation(first, second), 0.1)
        else:
            flow = self.netUpflow(previous["flow"])
            up = self.netUpfeat(previous["feat"])
            volume = F.leaky_relu(correlation(first, backwarp(second, flow * self.backwarp_scale)), 0.1)
            feat = torch.cat([volume, first, flow, up], dim=1)
        for layer in (self.netOne, self.netTwo, self.netThr, self.netFou, self.netFiv):
            feat = torch.cat([layer(feat), feat], dim=1)
        return {"flow": self.netSix(feat), "feat": feat}


class _Refiner(nn.Module):
    """Context network: dilated convs adding a residual to the level-2 flow."""

    def __init__(self):
        super().__init__()
        cin = _decoder_in(2) + sum(_DENSE)
        widths = (cin, 128, 128, 128, 96, 64, 32)
        dilations = (1, 2, 4, 8, 16, 1)
        layers: List[nn.Module] = []
        for a, b, dil in zip(widths, widths[1:], dilations):
            layers += [_conv(a, b, dilation=dil), _lrelu()]
        layers.append(_conv(32, 2))
        self.netMain = nn.Sequential(*layers)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.netMain(feat)


class PWCNet(nn.Module):
    """flow = PWCNet()(first, second): (N, 3, H, W) images in [0, 1] -> (N, 2, H, W) flow in pixels (x, y).

    The flow is defined on `first`'s grid and points to where each pixel moves in `second`. As in the
    reference wrapper, inputs are resized (bilinear) to multiples of 64 and the flow resized back.
    """

    def __init__(self):
        super().__init__()
        self.netExtractor = _Extractor()
        self.netTwo, self.netThr, self.netFou, self.netFiv, self.netSix = (_Decoder(lv) for lv in (2, 3, 4, 5, 6))
        self.netRefiner = _Refiner()

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        if first.shape != second.shape or first.ndim != 4 or first.shape[1] != 3:
            raise ValueError(f"PWCNet expects two (N, 3, H, W) images, got {tuple(first.shape)} and "
                             f"{tuple(second.shape)}")
        n, _, h, w = first.shape
        ph, pw = 64 * math.ceil(h / 64), 64 * math.ceil(w / 64)
        both = torch.cat([first, second], dim=0)
        both = F.interpolate(both, size=(ph, pw), mode="bilinear", align_corners=False)
        pyramid = self.netExtractor(both)
        est = None
        for decoder, feats in zip((self.netSix, self.netFiv, self.netFou, self.netThr, self.netTwo), pyramid[:0:-1]):
            est = decoder(feats[:n], feats[n:], est)
        flow = est["flow"] + self.netRefiner(est["feat"])
        flow = _FLOW_SCALE * F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
        scale = torch.tensor([w / pw, h / ph], dtype=flow.dtype, device=flow.device).view(1, 2, 1, 1)
        return flow * scale


def resolve_pwcnet_weights(weights: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The first existing weights file among the argument, $OPENSORA_VAE_PWCNET_WEIGHTS and the hub cache."""
    candidates = []
    if weights is not None:
        candidates.append(Path(weights).expanduser())
    else:
        env = os.environ.get(WEIGHTS_ENV)
        if env:
            candidates.append(Path(env).expanduser())
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME)
    for path in candidates:
        if path.is_file():
            return path
    places = "\n".join(f"  - {p}" for p in candidates)
    raise MissingWeightsError(
        f"PWC-Net (FloLPIPS) needs the weights file '{WEIGHTS_FILENAME}' ({WEIGHTS_URL}), which cannot be "
        f"downloaded here. Looked at:\n{places}\n"
        f"Put it at {Path(torch.hub.get_dir()) / 'checkpoints' / WEIGHTS_FILENAME}, "
        f"set ${WEIGHTS_ENV} to its path, or pass it explicitly (--pwcnet-weights / load_pwcnet(weights=...)).",
        searched=[str(p) for p in candidates],
    )


def load_pwcnet(
    weights: Optional[Union[str, os.PathLike]] = None,
    device: Optional[Union[str, torch.device]] = None,
    random_init: bool = False,
) -> PWCNet:
    """A frozen, eval-mode PWCNet with the published weights (or random weights with random_init=True, tests only)."""
    net = PWCNet()
    if not random_init:
        path = resolve_pwcnet_weights(weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, expected a PWC-Net state dict")
        # the published file predates sniklaus's 'module' -> 'net' attribute rename
        state = {k.replace("module", "net"): v for k, v in state.items()}
        net.load_state_dict(state, strict=True)
    net.eval().requires_grad_(False)
    if device is not None:
        net.to(device)
    return net
