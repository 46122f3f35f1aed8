"""Winograd F(4x4, 3x3) convolution for fp32 CPU inference: a backend of `speed.Conv2d` / `speed.Conv3d`.

A 3x3 stride-1 convolution over 4x4 output tiles needs 36 multiplies per tile and channel pair instead of 144
(Lavin & Gray, 2015). Per cache-sized chunk of tiles, each transform is one batched matmul with a Kronecker matrix
and the channel mixing one batched GEMM over the 36 tile elements; a (kt, 3, 3) Conv3d accumulates its time taps in
the GEMM. Used where it measured faster (`wins`), for fp32 CPU inference (`applies`); opt-in for its memory (the
transformed weights, 4x each convolution's, stay cached on it). Outputs move by float rounding, not bitwise.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import derived

M = 4  # output tile side
R = 3  # kernel side
A = M + R - 1  # input tile side

# Interpolation points 0, -1, 1, 1/2, -2 and infinity: in fp32 as accurate as the direct convolution (max error
# 2.8e-6 of the output's scale on 512 channels, direct 2.7e-6), where the common 0, +-1, +-2 gives 8e-6
# (Barabasz et al., "Error analysis and improving the accuracy of Winograd convolution", 2020).
_BT = [[1, -1.5, -2, 1.5, 1, 0],
       [0, 1, -2.5, 0.5, 1, 0],
       [0, -1, 0.5, 2.5, 1, 0],
       [0, -2, -1, 2, 1, 0],
       [0, 0.5, -1, -0.5, 1, 0],
       [0, 1, -1.5, -2, 1.5, 1]]
_G = [[1, 0, 0],
      [-1 / 3, 1 / 3, -1 / 3],
      [1 / 3, 1 / 3, 1 / 3],
      [-16 / 15, -8 / 15, -4 / 15],
      [1 / 15, -2 / 15, 4 / 15],
      [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0],
       [0, -1, 1, 0.5, -2, 0],
       [0, 1, 1, 0.25, 4, 0],
       [0, -1, 1, 0.125, -8, 1]]
# Column 2 of A^T (the point 1) is all ones: a bias added to tile element (2, 2) reaches every output once.
_BIAS_ELEMENT = 2 * A + 2

# Shape rule (`wins`), from `bench/bench_winograd.py` on an AVX2 CPU.
MIN_CHANNELS = 128
MIN_REDUCTION = 2 ** 15  # kt * C_in * C_out
# Calls with fewer 4x4 tiles (batch x tiles per frame) stay plain: 16 tiles (4 frames of 8x8) gained only 1.2x while
# streaming 36 MiB of transformed weights per 512-channel call, and skipping them keeps those weights uncached.
MIN_TILES = 64

CACHE = "_winograd_cache"  # the transformed weights' key in a conv's __dict__

_MATS: dict = {}


def _mats(device: torch.device):
    if device not in _MATS:
        bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (_BT, _G, _AT))
        _MATS[device] = (torch.kron(bt, bt).float().to(device), torch.kron(g, g),  # G stays float64 (weights)
                         torch.kron(at, at).float().to(device))
    return _MATS[device]


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, [kt,] 3, 3) -> (kt, 36, K, C): G g G^T per time tap (one matmul with kron(G, G))."""
    w = weight.detach()
    k, c = w.shape[:2]
    w = w.reshape(k, c, -1, R * R).permute(2, 3, 0, 1).reshape(-1, R * R, k * c)  # (kt, 9, K*C)
    g = _mats(w.device)[1].to(w.dtype)
    return torch.matmul(g, w).view(-1, A * A, k, c)


def _chunks(f: int, th: int, tw: int, cols: int):
    """(frame start, frame count, tile-row start, tile-row count): about `cols` tiles per chunk, so that each chunk's
    gathered tiles, transforms and products stay in cache. Row ranges split a frame only when it alone exceeds
    `cols` (then one frame per chunk)."""
    p = th * tw
    if p >= cols:
        rows = max(1, cols // tw)
        for t in range(f):
            for y in range(0, th, rows):
                yield t, 1, y, min(rows, th - y)
    else:
        per = max(1, cols // p)
        for t in range(0, f, per):
            yield t, min(per, f - t), 0, th


def conv3d(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor] = None,
           cols: int = 256, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """conv3d(x, weight, bias, padding=(0, 1, 1)) with time stride 1 for a (kt, 3, 3) kernel given as
    `transform_weight(weight)`; x is (N, C, F, H, W). Per chunk of tiles: gather the 6x6 input tiles (C, 36, q),
    transform them (B^T d B as one batched matmul with the Kronecker matrix), multiply by the transformed weights
    per tile element (kt accumulated GEMMs over time-shifted column ranges), transform back and write the 4x4
    output tiles."""
    n, c, f, h, w = x.shape
    kt, _, k, _ = weight_t.shape
    fo = f - kt + 1
    if weight_t.shape[3] != c or fo < 1:
        raise ValueError(f"input {tuple(x.shape)} does not fit the transformed weight {tuple(weight_t.shape)}")
    th, tw = -(-h // M), -(-w // M)
    xp = F.pad(x, (1, M * tw + 1 - w, 1, M * th + 1 - h)).contiguous()  # the tile view below assumes W stride 1
    s_n, s_c, s_f, s_h, _ = xp.stride()
    bk, _, at = _mats(x.device)
    if out is None:
        out = x.new_empty(n, k, fo, M * th, M * tw)
    for b in range(n):
        for t0, fc, y0, r in _chunks(fo, th, tw, cols):
            q1 = r * tw  # tiles per frame in this chunk
            d = xp[b, :, t0, M * y0:].as_strided((c, A, A, fc + kt - 1, r, tw), (s_c, s_h, 1, s_f, M * s_h, M))
            v = torch.matmul(bk, d.reshape(c, A * A, -1)).transpose(0, 1)  # (36, C, frames * q1), strided
            y = torch.bmm(weight_t[0], v[:, :, :fc * q1])
            for j in range(1, kt):
                y.baddbmm_(weight_t[j], v[:, :, j * q1:(j + fc) * q1])
            if bias is not None:
                y[_BIAS_ELEMENT].add_(bias.view(-1, 1))
            o = torch.matmul(at, y.transpose(0, 1))  # (K, 16, fc * q1)
            dest = out[b, :, t0:t0 + fc, M * y0:M * (y0 + r)].view(k, fc, r, M, tw, M)
            dest.copy_(o.view(k, M, M, fc, r, tw).permute(0, 3, 4, 1, 5, 2))
    return out if M * th == h and M * tw == w else out[..., :h, :w].contiguous()


def conv2d(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor] = None,
           cols: int = 256) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) for a 3x3 kernel given as `transform_weight(weight)`: the batch runs as
    the frames of one conv3d with a single time tap."""
    n, _, h, w = x.shape
    out = x.new_empty(n, weight_t.shape[2], -(-h // M) * M, -(-w // M) * M)
    conv3d(x.transpose(0, 1).unsqueeze(0), weight_t, bias, cols, out=out.transpose(0, 1).unsqueeze(0))
    return out if out.shape[-2:] == (h, w) else out[..., :h, :w].contiguous()


def applies(x: torch.Tensor) -> bool:
    """Inference only (training keeps the plain convolutions), fp32 CPU, eager; a Conv2d call with `MIN_TILES` output
    tiles or more (a Conv3d's transformed time taps serve every output frame: no minimum)."""
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
            and not x.requires_grad and not torch.is_grad_enabled() and not x.is_mkldnn
            and not torch.is_autocast_enabled("cpu") and (x.ndim == 5 or _tiles(x) >= MIN_TILES))


def _tiles(x: torch.Tensor) -> int:
    """Output tiles of a Conv2d call: batch x tiles per frame; x is (N, C, H, W)."""
    return x.shape[0] * -(-x.shape[-2] // M) * -(-x.shape[-1] // M)


def wins(conv: nn.Module) -> bool:
    """Where it measured faster than PyTorch's convolution (`bench/bench_winograd.py`): 3x3 (x kt) stride-1 kernels,
    padding 1 on H/W, `MIN_CHANNELS` in and out, kt * C_in * C_out >= `MIN_REDUCTION` (else transforms cost more)."""
    if not isinstance(conv, (nn.Conv2d, nn.Conv3d)) or conv.groups != 1 or conv.padding_mode != "zeros":
        return False
    ks, stride, pad, dil = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    kt = 1 if isinstance(conv, nn.Conv2d) else ks[0]
    return (tuple(ks[-2:]) == (R, R) and all(v == 1 for v in stride) and all(v == 1 for v in dil)
            and tuple(pad[-2:]) == (1, 1) and (isinstance(conv, nn.Conv2d) or pad[0] == 0)
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
            and kt * conv.in_channels * conv.out_channels >= MIN_REDUCTION)


def forward(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` through Winograd (`applies(x)` must hold), the transformed weights kept on the module (recomputed
    when the weight changes in place or is replaced)."""
    fn = conv2d if isinstance(conv, nn.Conv2d) else conv3d
    return fn(x, derived.cached(conv, CACHE, transform_weight), conv.bias)
