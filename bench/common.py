"""Shared benchmark helpers: interleaved side-by-side timing, peak memory, FLOPs and the device's peak."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from opensora_vae.runtime import peak_memory_bytes, reset_peak_memory

# Dense peak throughput in TFLOP/s (vendor datasheets, no sparsity): (bf16 tensor core, fp32 non-tensor).
DEVICE_PEAK_TFLOPS = {
    "H100 PCIe": {torch.bfloat16: 756.0, torch.float32: 51.2},
    "H100": {torch.bfloat16: 989.4, torch.float32: 66.9},  # SXM / HBM3
    "H200": {torch.bfloat16: 989.4, torch.float32: 66.9},
}


def cpu_peak_tflops(dtype: torch.dtype) -> Optional[float]:
    """Nominal fp32 peak of the torch threads in use (one per core): threads x clock (`cpu MHz` in /proc/cpuinfo)
    x FLOPs per cycle (two FMA units: 64 with AVX-512, 32 with AVX2 + FMA). Turbo clocks can beat it; None where
    unknown (other dtypes, no /proc/cpuinfo)."""
    if dtype != torch.float32:
        return None
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return None
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= set(flags) else None
    if not mhz or per_cycle is None:
        return None
    return torch.get_num_threads() * max(mhz) * 1e6 * per_cycle / 1e12


def device_peak_tflops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """Peak TFLOP/s of a known GPU for `dtype`, or the CPU's nominal fp32 peak; None for unknown cards (the
    tables then say n/a)."""
    if device.type == "cpu":
        return cpu_peak_tflops(dtype)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(DEVICE_PEAK_TFLOPS, key=len, reverse=True):  # most specific name first
        if key in name:
            return DEVICE_PEAK_TFLOPS[key].get(dtype)
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    reset_peak_memory(device)


def _peak_gib(device: torch.device) -> float:
    peak = peak_memory_bytes(device)
    return float("nan") if peak is None else peak / 2**30


def compare(fns: Dict[str, Callable[[], object]], device: torch.device, repeat: int = 3, warmup: int = 1):
    """Run every variant `warmup` times, then `repeat` rounds interleaving the variants (so a loaded machine slows
    all of them alike). Returns name -> dict(seconds=median, peak_gib=max peak, out=last output)."""
    res = {k: {"times": [], "peak_gib": 0.0, "out": None} for k in fns}
    for k, fn in fns.items():
        for _ in range(warmup):
            res[k]["out"] = fn()
        sync(device)
    for _ in range(repeat):
        for k, fn in fns.items():
            _reset_peak(device)
            t = time.perf_counter()
            res[k]["out"] = fn()
            sync(device)
            res[k]["times"].append(time.perf_counter() - t)
            res[k]["peak_gib"] = max(res[k]["peak_gib"], _peak_gib(device))
    for r in res.values():
        r["seconds"] = statistics.median(r.pop("times"))
    return res


def _mkldnn_conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call as torch.utils.flop_counter counts them (matmuls, convolutions, attention), plus the
    oneDNN convolutions the temporal VAE calls directly on CPU (`aten.mkldnn_convolution`, which it has no
    formula for)."""
    mapping = {torch.ops.aten.mkldnn_convolution: _mkldnn_conv_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def max_diff(a, b) -> float:
    """Largest absolute difference between two tensors (or equal-length tuples of tensors)."""
    if isinstance(a, (tuple, list)):
        return max(max_diff(x, y) for x, y in zip(a, b))
    return (a.double() - b.double()).abs().max().item()


def header(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        peak = cpu_peak_tflops(torch.float32)
        what = f"CPU, {torch.get_num_threads()} threads" + (f", nominal fp32 peak {peak * 1e3:.0f} GFLOP/s" if peak else "")
    return f"device {device} ({what}), torch {torch.__version__}"


def table(rows, device: torch.device, dtype: torch.dtype, frames_per_item: Optional[int] = None):
    """Print rows (dicts: name, seconds, peak_gib, flops, ratio, diff, optional diff_f64) as a Markdown table."""
    peak = device_peak_tflops(device, dtype)
    mem = "peak CUDA alloc GiB" if device.type == "cuda" else "peak RSS GiB"
    f64 = any("diff_f64" in r for r in rows)
    cols = (["variant", "ms / item"] + (["frames/s"] if frames_per_item else [])
            + [mem, "GFLOP", "% of peak", "ratio to plain", "max |diff|"] + (["max |diff| vs float64"] if f64 else []))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        flops = r.get("flops")
        gflop = f"{flops / 1e9:.1f}" if flops else "n/a"
        frac = f"{100 * flops / r['seconds'] / (peak * 1e12):.1f}%" if (flops and peak) else "n/a"
        cells = [r["name"], f"{r['seconds'] * 1e3:.1f}"]
        if frames_per_item:
            cells.append(f"{frames_per_item / r['seconds']:.1f}")
        diff = r.get("diff")
        cells += [f"{r['peak_gib']:.2f}", gflop, frac, f"{r['ratio']:.2f}x" if r.get("ratio") else "-",
                  "-" if diff is None else f"{diff:.1e}"]
        if f64:
            cells.append(f"{r['diff_f64']:.1e}" if "diff_f64" in r else "-")
        print("| " + " | ".join(cells) + " |", flush=True)
