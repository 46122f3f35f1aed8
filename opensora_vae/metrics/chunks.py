"""Chunked float64 work over frames or planes, shared by SSIM and PSNR.

On CPU the chunks are small (about one 256x256 plane) and run in a pool of `torch.get_num_threads()` Python
threads, each with one intra-op thread and its own scratch buffers, reused from chunk to chunk: every op then
works on cache-resident data, nothing is allocated per chunk, and no op waits on an OpenMP barrier. (Whole-batch
float64 ops with 2 OpenMP threads were slower than per-frame NumPy loops, and collapsed on a busy machine.) Torch
ops release the GIL, so the threads run in parallel. On other devices the chunks are large and run in order.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Sequence, TypeVar

import torch

__all__ = ["map_chunks", "scratch_buffer"]

T = TypeVar("T")
C = TypeVar("C")


def map_chunks(fn: Callable[[C, dict], T], chunks: Sequence[C], device: torch.device) -> List[T]:
    """[fn(chunk, scratch) for chunk in chunks], in order; `scratch` is a dict private to the running thread."""
    threads = min(torch.get_num_threads(), len(chunks)) if device.type == "cpu" else 1
    if threads <= 1:
        scratch: dict = {}
        return [fn(c, scratch) for c in chunks]
    local = threading.local()

    def run(c):
        if not hasattr(local, "scratch"):
            local.scratch = {}
        return fn(c, local.scratch)

    # torch.set_num_threads is per thread (OpenMP): the caller's setting is untouched
    with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(run, chunks))


def scratch_buffer(scratch: dict, name: str, shape: Sequence[int], device: torch.device,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A tensor of `shape` (uninitialised) from `scratch`, grown when too small, else reused."""
    numel = math.prod(shape)
    buf = scratch.get(name)
    if buf is None or buf.numel() < numel or buf.device != device or buf.dtype != dtype:
        buf = scratch[name] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(*shape)
