"""fp32 CPU Conv3d through oneDNN, forward and backward.

PyTorch's backend heuristic sends batch-1 clips with N*C*T*H <= 20480 (the temporal VAE on the latents of a 64x64
video: the demo, small benchmarks) to its native conv3d, and its backward to the native kernels even when the forward
ran in oneDNN. Measured on one core (32 channels, 19x16x16): native forward 56 ms / input gradient 104 ms; oneDNN
17 / 19 ms. Outputs agree to float rounding. `torch.backends.mkldnn.flags(enabled=False)` restores PyTorch's choice.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def applies(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not x.is_mkldnn
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


class _Conv3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, stride, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (padding, stride, dilation, groups, bias is not None)
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        padding, stride, dilation, groups, has_bias = ctx.conf
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = None
        plain_x = need_x and not (all(s == 1 for s in stride) and all(d == 1 for d in dilation) and groups == 1)
        if need_x and not plain_x:
            # Input gradient of a stride-1 convolution: the full correlation with the flipped, transposed kernel.
            flipped = weight.flip(2, 3, 4).transpose(0, 1).contiguous()
            pad = [k - 1 - p for k, p in zip(weight.shape[2:], padding)]
            grad_x = torch.ops.aten.mkldnn_convolution(grad, flipped, None, pad, [1, 1, 1], [1, 1, 1], 1)
        mask = [plain_x, need_w, need_b and has_bias]
        if any(mask):
            gx, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False,
                [0, 0, 0], groups, mask)
            grad_x = gx if plain_x else grad_x
        else:
            grad_w = grad_b = None
        return grad_x, grad_w, grad_b, None, None, None, None


def conv3d(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    bias: Optional[torch.Tensor] = conv.bias
    return _Conv3d.apply(x, conv.weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
