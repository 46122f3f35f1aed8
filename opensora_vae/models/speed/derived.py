"""Weights derived from a module's weight (Winograd-transformed, sub-pixel folded), cached on the module."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def cached(module: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`fn(module.weight.detach())`, kept in `module.__dict__[name]` (outside the state dict) and recomputed when
    the weight changes in place (its version counter) or is replaced, moved or cast."""
    w = module.weight
    key = (w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape))
    entry = module.__dict__.get(name)
    if entry is None or entry[0] != key:
        entry = (key, fn(w.detach()))
        module.__dict__[name] = entry
    return entry[1]


def drop(module: nn.Module, name: str) -> None:
    module.__dict__.pop(name, None)
