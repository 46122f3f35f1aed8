"""Chunked float64 work over frames or planes, shared by SSIM and PSNR.

On CPU the chunks are small (about one 256x256 plane or one frame) and `torch.get_num_threads()` threads (the
caller and helpers) take them in turn, each with one intra-op thread and its own scratch buffers, reused from chunk
to chunk: every op works on cache-sized data, nothing is allocated per chunk, and no op waits on an OpenMP
barrier. (Whole-batch float64 ops with 2 OpenMP threads were slower than per-frame NumPy loops and collapsed on a
busy machine; a ThreadPoolExecutor's per-task hand-offs cost more than they gave there.) Torch ops release the
GIL, so the threads run in parallel. On other devices the chunks are large and run in order.
"""
from __future__ import annotations

import math
import threading
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
    results: list = [None] * len(chunks)
    errors: list = []
    lock, taken = threading.Lock(), [0]

    def work():
        scratch: dict = {}
        try:
            while not errors:
                with lock:
                    i = taken[0]
                    taken[0] += 1
                if i >= len(chunks):
                    return
                results[i] = fn(chunks[i], scratch)
        except BaseException as e:  # re-raised in the caller
            errors.append(e)

    def helper():
        torch.set_num_threads(1)
        work()

    caller_threads = torch.get_num_threads()
    helpers = [threading.Thread(target=helper, daemon=True) for _ in range(threads - 1)]
    torch.set_num_threads(1)  # per thread for OpenMP; restored after the helpers finish (it also sizes a global pool)
    try:
        for t in helpers:
            t.start()
        work()
    finally:
        for t in helpers:
            t.join()
        torch.set_num_threads(caller_threads)
    if errors:
        raise errors[0]
    return results


def scratch_buffer(scratch: dict, name: str, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """A float64 tensor of `shape` (uninitialised) from `scratch`: the same one on every call with the same
    arguments (few Python-level calls per chunk keep the threads from queueing on the GIL)."""
    key = (name, tuple(shape), device)
    view = scratch.get(key)
    if view is None:
        numel = math.prod(shape)
        base = scratch.get(name)
        if base is None or base.numel() < numel or base.device != device:
            base = scratch[name] = torch.empty(numel, dtype=torch.float64, device=device)
        view = scratch[key] = base[:numel].view(*shape)
    return view
