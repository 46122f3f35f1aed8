"""One place for device and dtype choices."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(name: Union[str, torch.device, None] = None) -> torch.device:
    """None/"auto": CUDA when available, else CPU. CUDA that is not there is an error, not a silent fallback
    (a long job should not quietly run on the wrong device)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {str(name)!r} requested but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {str(name)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
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
        raise UserError(f"unknown dtype {spec!r}; choose from auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[spec]


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak here: CUDA's max allocated, else the process's peak resident memory (Linux VmHWM, reset by
    writing 5 to /proc/self/clear_refs). False when it cannot be reset (the peak then spans the process's life)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(device: torch.device) -> Optional[int]:
    """The peak since `reset_peak_memory`: CUDA max allocated, else the process's peak RSS (None where unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # elsewhere: the process's lifetime peak
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except (ImportError, OSError):
        return None
