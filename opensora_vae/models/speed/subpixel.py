"""Nearest 2x upsampling then a 3x3 convolution, computed as 2x2 convolutions on the low-resolution input.

In the upsampled map every 3x3 window covers only 2x2 distinct input pixels, so for each output phase (row and
column parity) the 3x3 kernel folds into a 2x2 kernel whose taps are the sums of the taps that read the same pixel.
All four phases are one 2x2 convolution with 4x the output channels, interleaved back by one strided copy: 4/9 of
the multiplies, and no upsampled copy of the input; each output sums fewer rounded products, so it sits as close
to float64 as the plain path or closer. On by default for the spatial decoder's `Upsample2D` modules (diffusers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D as _Upsample2D
from torch import nn

from . import derived

CACHE = "_subpixel_cache"

# Per phase (0: even output rows, 1: odd), which 3x3 kernel rows feed each of the 2 input rows it reads: even
# rows read input rows (i-1, i) with kernel rows (0 | 1+2), odd rows (i, i+1) with (0+1 | 2).
_FOLD = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=torch.float64)


def fold_weight(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) -> (4K, C, 2, 2), phases (row parity, column parity) major; the taps summed in float64 where
    the device has it (one rounding, at the final cast), outside autocast; differentiable."""
    k, c = weight.shape[:2]
    acc = torch.float32 if weight.device.type == "mps" else torch.float64  # MPS has no float64
    fold = _FOLD.to(weight.device, acc)
    with torch.autocast(weight.device.type, enabled=False):
        folded = torch.einsum("aip,bjq,kcpq->abkcij", fold, fold, weight.to(acc))
    return folded.reshape(4 * k, c, 2, 2).to(weight.dtype)


def upsample_conv(x: torch.Tensor, folded: torch.Tensor, bias: torch.Tensor = None) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1) for
    `folded = fold_weight(weight)`; x is (N, C, H, W)."""
    n, _, h, w = x.shape
    k = folded.shape[0] // 4
    # Output (i, j) of the 2x2 convolution with zero padding 1 reads input rows (i-1, i) and columns (j-1, j):
    # (H+1, W+1) outputs, of which phase a takes rows a..a+H-1.
    y = F.conv2d(x, folded, None if bias is None else bias.repeat(4), padding=1)
    s_n, s_c, s_h, s_w = y.stride()
    # out[n, k, i, a, j, b] = y[n, (2a + b) K + k, i + a, j + b]: one uniform stride per axis.
    view = y.as_strided((n, k, h, 2, w, 2), (s_n, s_c, s_h, 2 * k * s_c + s_h, s_w, k * s_c + s_w))
    return y.new_empty(view.shape).copy_(view).view(n, k, 2 * h, 2 * w)


def _folds(conv) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _folded_weight(conv: nn.Conv2d) -> torch.Tensor:
    """Cached when no gradient can flow to the weight (inference, frozen weights); differentiable otherwise."""
    if (torch.is_grad_enabled() and conv.weight.requires_grad) or torch.compiler.is_compiling():
        return fold_weight(conv.weight)
    return derived.cached(conv, CACHE, fold_weight)


class Upsample2D(_Upsample2D):
    """diffusers' Upsample2D with the nearest-2x + 3x3 conv case through `upsample_conv`; other configurations
    (transposed conv, norm, explicit output size) run the parent's forward. `use_subpixel` swaps it in place."""

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        conv = getattr(self, "conv", None)
        if (args or kwargs or output_size is not None or not self.interpolate or not self.use_conv
                or self.use_conv_transpose or self.norm is not None or self.name != "conv"
                or hidden_states.ndim != 4 or not _folds(conv)):
            return super().forward(hidden_states, output_size, *args, **kwargs)
        return upsample_conv(hidden_states, _folded_weight(conv), conv.bias)


def use_subpixel(module: nn.Module, enable: bool = True) -> int:
    """Make each diffusers Upsample2D of `module` an `Upsample2D` (only the class changes), or with `enable=False`
    back, dropping the cached folded weights. Returns how many were swapped."""
    n = 0
    for m in module.modules():
        if enable and type(m) is _Upsample2D:
            m.__class__ = Upsample2D
            n += 1
        elif not enable and type(m) is Upsample2D:
            m.__class__ = _Upsample2D
            conv = getattr(m, "conv", None)
            if conv is not None:
                derived.drop(conv, CACHE)
            n += 1
    return n
