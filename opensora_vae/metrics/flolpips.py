"""FloLPIPS (Danier, Zhang & Bull, arXiv 2207.08119): LPIPS weighted by optical-flow disagreement.

Formulation (from the authors' `flolpips.py`, as vendored by Open-Sora-Plan's `cal_flolpips`): for frame t of
the real clip R and generated clip G, with PWC-Net flows F_R = flow(R_t -> R_t+1), F_G = flow(G_t -> G_t+1):

    D = F_R - F_G;   for each AlexNet LPIPS layer l with spatial size h_l x w_l:
    M_l = | bilinear_resize(D, (h_l, w_l)) |_2            (per-pixel magnitude of the flow difference)
    W_l = M_l / sum_{x,y} M_l                               (normalised per frame pair)
    FloLPIPS_t = sum_l sum_{x,y} W_l(x, y) * lin_l(||phi_l(R_t) - phi_l(G_t)||^2)(x, y)

i.e. LPIPS v0.1 (AlexNet, inputs scaled to [-1, 1]) with each layer's spatial mean replaced by the
flow-difference-weighted mean. Flow is computed on the [0, 1] RGB frames, as the reference does.

Frames and shape: the reference attaches pair (t, t+1) to frame t (LPIPS map of frame t, flow on frame t's grid)
for t = 0..T-2; the last frame has no successor. To keep the (B, T) layout shared by all metrics, the result is
(B, T) with frame T-1 set to NaN; average with nanmean (`evaluate` does), which reproduces the reference's mean
over the T-1 pairs.

One deviation: where the flow difference is zero everywhere (e.g. identical clips) the reference divides 0/0
and yields NaN; here such a pair falls back to uniform weights, i.e. plain LPIPS (0 for identical frames).
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Union

import lpips as lpips_pkg
import torch
import torch.nn.functional as F

from .lpips import get_lpips_model
from .pwcnet import load_pwcnet
from .ssim import _check_videos

__all__ = ["flolpips", "flolpips_pairs", "get_flow_model"]

FlowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_FLOW_MODELS = {}


def get_flow_model(
    weights: Optional[Union[str, os.PathLike]] = None,
    device: Optional[Union[str, torch.device]] = None,
    random_init: bool = False,
) -> torch.nn.Module:
    """load_pwcnet, memoised per (weights, device)."""
    key = (None if weights is None else os.fspath(weights), random_init, str(torch.device(device or "cpu")))
    if key not in _FLOW_MODELS:
        _FLOW_MODELS[key] = load_pwcnet(weights, device=device or "cpu", random_init=random_init)
    return _FLOW_MODELS[key]


def _flow_weights(flow_diff: torch.Tensor, size) -> torch.Tensor:
    """Normalised magnitude map (N, 1, h, w) of the flow difference at a layer's resolution."""
    d = F.interpolate(flow_diff, size=size, mode="bilinear", align_corners=False)
    mag = torch.sqrt(d[:, 0:1] ** 2 + d[:, 1:2] ** 2)
    total = mag.sum(dim=(1, 2, 3), keepdim=True)
    uniform = torch.full_like(mag, 1.0 / (size[0] * size[1]))
    return torch.where(total > 0, mag / total.clamp_min(torch.finfo(mag.dtype).tiny), uniform)


def flolpips_pairs(
    real0: torch.Tensor, real1: torch.Tensor, gen0: torch.Tensor, gen1: torch.Tensor,
    lpips_model: torch.nn.Module, flow_model: FlowFn,
) -> torch.Tensor:
    """FloLPIPS of N frame pairs, each (N, 3, H, W) in [0, 1]: frame 0 of each pair is scored -> (N,)."""
    n = real0.shape[0]
    flows = flow_model(torch.cat([real0, gen0]), torch.cat([real1, gen1]))
    flow_diff = flows[:n] - flows[n:]
    x0, x1 = real0 * 2 - 1, gen0 * 2 - 1
    if lpips_model.version == "0.1":
        x0, x1 = lpips_model.scaling_layer(x0), lpips_model.scaling_layer(x1)
    feats0, feats1 = lpips_model.net(x0), lpips_model.net(x1)
    total = real0.new_zeros(n)
    for kk in range(lpips_model.L):
        diff = (lpips_pkg.normalize_tensor(feats0[kk]) - lpips_pkg.normalize_tensor(feats1[kk])) ** 2
        dist = lpips_model.lins[kk](diff)  # (N, 1, h, w) per-pixel layer distance
        weights = _flow_weights(flow_diff, dist.shape[-2:])
        total = total + (dist * weights).sum(dim=(1, 2, 3))
    return total


@torch.no_grad()
def flolpips(
    a: torch.Tensor,
    b: torch.Tensor,
    lpips_model: Optional[torch.nn.Module] = None,
    flow_model: Optional[FlowFn] = None,
    backbone_path: Optional[Union[str, os.PathLike]] = None,
    pwcnet_weights: Optional[Union[str, os.PathLike]] = None,
    random_weights: bool = False,
    chunk_size: int = 32,
) -> torch.Tensor:
    """FloLPIPS of real `a` and generated `b`, (B, T, 3, H, W) in [0, 1] -> (B, T) float32.

    Entry t < T-1 scores frame t using the flows t -> t+1; entry T-1 is NaN (see module docstring).
    Models default to AlexNet LPIPS (`backbone_path`) and PWC-Net (`pwcnet_weights`); `random_weights=True`
    uses random trunks for both (tests only). Pairs are processed `chunk_size` at a time.
    """
    _check_videos(a, b)
    bsz, t = a.shape[:2]
    if t < 2:
        raise ValueError(f"FloLPIPS needs at least 2 frames per clip, got {t}")
    if lpips_model is None:
        lpips_model = get_lpips_model("alex", backbone_path, random_weights, a.device)
    if getattr(lpips_model, "lins", None) is None:
        raise ValueError("FloLPIPS needs an LPIPS model with its linear layers (lpips=True)")
    if flow_model is None:
        flow_model = get_flow_model(pwcnet_weights, a.device, random_init=random_weights)
    dtype = next(lpips_model.parameters()).dtype
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    r0, r1 = a[:, :-1].flatten(0, 1), a[:, 1:].flatten(0, 1)
    g0, g1 = b[:, :-1].flatten(0, 1), b[:, 1:].flatten(0, 1)
    vals = [
        flolpips_pairs(r0[i : i + chunk_size], r1[i : i + chunk_size], g0[i : i + chunk_size], g1[i : i + chunk_size],
                       lpips_model, flow_model)
        for i in range(0, r0.shape[0], chunk_size)
    ]
    out = torch.full((bsz, t), float("nan"), dtype=dtype, device=a.device)
    out[:, :-1] = torch.cat(vals).reshape(bsz, t - 1)
    return out
