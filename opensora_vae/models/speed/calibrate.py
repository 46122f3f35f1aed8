"""Whether a convolution backend runs a call: timed on this machine, once per machine and shape, and remembered.

A backend's shape rule (`wins`, `applies`) says where it can win; whether it does depends on the CPU (Winograd's
512->512 at 8x8 gains on an AVX2 CPU and loses on an AVX-512 one). On the first call of a shape the backend and the
path it replaces are each timed (one warm-up, then the best of `REPEATS`; forward, plus backward when the call
needs gradients) on a copy of the module with detached weights, in a worker thread (no autograd hooks, checkpoint
or inference mode of the caller reach it), and the backend is kept only if at least `MARGIN` faster. Choices are
cached in memory and in `calibration.json` under $OPENSORA_VAE_CACHE_DIR (default ~/.cache/opensora_vae), keyed by
the machine (CPU model, vector extensions, torch threads, torch version) and the call (module and input shape).

$OPENSORA_VAE_CALIBRATION: `auto` (default) as above; `fast` uses each backend wherever its rule admits the call
(no timing: deterministic, the tests' setting); `plain` never. Outputs differ between choices by float rounding only.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn

MARGIN = 0.05  # the backend must take at most (1 - MARGIN) of the replaced path's time
REPEATS = 3
ENV_MODE, ENV_DIR = "OPENSORA_VAE_CALIBRATION", "OPENSORA_VAE_CACHE_DIR"
MODES = ("auto", "fast", "plain")
FILE = "calibration.json"

_lock = threading.RLock()
_choices: Dict[tuple, bool] = {}  # (cache folder, threads, backend, conv, input shape, train) -> use the backend
_machine: Optional[str] = None


def mode() -> str:
    value = os.environ.get(ENV_MODE, "auto") or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_MODE}={value!r}: use one of {', '.join(MODES)}")
    return value


def cache_file() -> Path:
    root = os.environ.get(ENV_DIR) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "opensora_vae"
    return Path(root) / FILE


def _cpu() -> str:
    """CPU model and its vector extensions (what decides which kernels are fast)."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(f for f in value.split()
                                        if f.startswith(("avx", "amx", "fma", "sve", "asimd"))))
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()} [{torch.backends.cpu.get_cpu_capability()}: {flags}]"


def machine() -> str:
    global _machine
    if _machine is None:
        _machine = f"{_cpu()} torch={torch.__version__}"
    return f"{_machine} threads={torch.get_num_threads()}"


def _signature(conv: nn.Module) -> tuple:
    return (type(conv).__name__, conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
            tuple(conv.padding), tuple(conv.dilation), conv.groups, conv.bias is not None)


def call_key(name: str, conv: nn.Module, x: torch.Tensor, train: bool) -> str:
    """The backend, the convolution's hyperparameters and the call's input shape (and whether it trains)."""
    kind, c_in, c_out, k, s, p, d, g, bias = _signature(conv)
    return (f"{name} {kind}({c_in}->{c_out}, k={k}, s={s}, p={p}, d={d}, g={g}, bias={bias}) "
            f"x={tuple(x.shape)}{' train' if train else ''}")


def needs_grad(conv: nn.Module, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in conv.parameters(False)))


def time_call(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Best of `repeats` wall times of fn after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(path: Path, machine_key: str, key: str, entry: dict) -> None:
    """Merge one entry into the file (re-read first: other processes may have added theirs); atomic replace."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load(path)
        data.setdefault(machine_key, {})[key] = entry
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only home: the choice still holds for this process
        pass


def _measure(conv: nn.Module, x: torch.Tensor, train: bool,
             fast: Callable[[nn.Module, torch.Tensor], torch.Tensor],
             plain: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Dict[str, float]:
    """Seconds per call of each path on a copy of conv (its own detached parameters), in a fresh thread."""
    result: Dict[str, object] = {}

    def work():
        try:
            shadow = copy.copy(conv)  # same class and buffers; parameters replaced below, the module untouched
            shadow._parameters = {k: None if p is None else
                                  nn.Parameter(p.detach(), requires_grad=train and p.requires_grad)
                                  for k, p in conv._parameters.items()}
            xd = x.detach().clone().requires_grad_(train and x.requires_grad)
            leaves = [t for t in (xd, *shadow._parameters.values()) if t is not None and t.requires_grad]

            def run(path):
                def once():
                    with torch.set_grad_enabled(train):
                        y = path(shadow, xd)
                        if train:
                            torch.autograd.grad(y, leaves, torch.ones_like(y))
                return once

            result.update(fast=time_call(run(fast)), plain=time_call(run(plain)))
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    worker = threading.Thread(target=work, name="opensora_vae-calibrate")
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result


def chooses(name: str, conv: nn.Module, x: torch.Tensor,
            fast: Callable[[nn.Module, torch.Tensor], torch.Tensor],
            plain: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> bool:
    """Whether backend `name` (`fast(conv, x)`) runs this call instead of `plain(conv, x)` (module docstring)."""
    m = mode()
    if m != "auto":
        return m == "fast"
    train = needs_grad(conv, x)
    mem = (os.environ.get(ENV_DIR), torch.get_num_threads(), name, _signature(conv), tuple(x.shape), train)
    use = _choices.get(mem)
    if use is not None:
        return use
    path, machine_key, key = cache_file(), machine(), call_key(name, conv, x, train)
    with _lock:  # not held while timing: the timed plain path may calibrate the next backend (in the worker)
        entry = _load(path).get(machine_key, {}).get(key)
    if not (isinstance(entry, dict) and isinstance(entry.get("use"), bool)):
        seconds = _measure(conv, x, train, fast, plain)
        entry = dict(use=seconds["fast"] <= (1 - MARGIN) * seconds["plain"],
                     seconds={name: seconds["fast"], "plain": seconds["plain"]})
        with _lock:
            _save(path, machine_key, key, entry)
    _choices[mem] = entry["use"]
    return entry["use"]


def forget() -> None:
    """Drop the in-memory choices (the file stays): the next call of each shape reads the file again."""
    with _lock:
        _choices.clear()
