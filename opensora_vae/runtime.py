"""One place for device and dtype choices."""
from __future__ import annotations

from typing import Optional, Union

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(name: Optional[str] = None) -> torch.device:
    """None/"auto": CUDA when available, else CPU. "cuda" without a GPU is an error, not a silent fallback."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available on this machine; use --device cpu")
    return device


def resolve_dtype(spec: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """"auto": bf16 on a GPU that supports it, fp32 elsewhere; or an explicit name / torch dtype."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise ValueError(f"unknown dtype {spec!r}; choose from auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[spec]
