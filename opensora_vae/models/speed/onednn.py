"""fp32 CPU Conv3d through oneDNN, forward and backward: a backend of `speed.Conv3d`, on by default.

PyTorch's heuristic sends small batch-1 clips (N*C*T*H <= 20480) to its slower native conv3d, and the backward to the
native kernels even after a oneDNN forward; the weight gradient runs as a oneDNN convolution too (batch and channels
swapped). Outputs agree to float rounding; `torch.backends.mkldnn.flags(enabled=False)` restores PyTorch's choice.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def wins(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv3d)


def applies(x: torch.Tensor) -> bool:
    # is_compiling first: under torch.compile the rest is not traced (the mkldnn checks would break the graph)
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
            and not x.is_mkldnn and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu"))


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
        grad_x = grad_w = grad_b = None
        if all(d == 1 for d in dilation) and groups == 1:
            ones, kernel = [1, 1, 1], weight.shape[2:]
            if need_x:
                # The input gradient: the output gradient, spread out by the stride (zeros between) to the padded
                # input's extent less the kernel's, correlated with the flipped, transposed kernel.
                spread = grad
                if any(s > 1 for s in stride):
                    spread = grad.new_zeros(*grad.shape[:2], *(i + 2 * p - k + 1 for i, p, k in
                                                               zip(x.shape[2:], padding, kernel)))
                    spread[(..., *(slice(None, s * (n - 1) + 1, s) for s, n in zip(stride, grad.shape[2:])))] = grad
                flipped = weight.flip(2, 3, 4).transpose(0, 1).contiguous()
                pad = [k - 1 - p for k, p in zip(kernel, padding)]
                grad_x = torch.ops.aten.mkldnn_convolution(spread, flipped, None, pad, ones, ones, 1)
            if need_w:
                # The weight gradient: the input correlated with the output gradient (dilated by the stride), batch
                # and channels swapped so the batch is summed (faster than ATen's path for these shapes).
                grad_w = torch.ops.aten.mkldnn_convolution(
                    x.transpose(0, 1), grad.transpose(0, 1), None, padding, ones, list(stride), 1)
                grad_w = grad_w[..., :kernel[0], :kernel[1], :kernel[2]].transpose(0, 1)
            if need_b and has_bias:
                grad_b = grad.sum((0, 2, 3, 4))
        else:
            mask = [need_x, need_w, need_b and has_bias]
            if any(mask):
                grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                    grad, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False,
                    [0, 0, 0], groups, mask)
        return grad_x, grad_w, grad_b, None, None, None, None


def forward(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    bias: Optional[torch.Tensor] = conv.bias
    return _Conv3d.apply(x, conv.weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
