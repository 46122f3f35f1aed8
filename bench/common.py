"""Shared benchmark helpers: the provenance header, interleaved side-by-side timing, peak memory, FLOPs and the
device's peak."""
from __future__ import annotations

import atexit
import datetime
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from opensora_vae.models.speed.calibrate import machine
from opensora_vae.runtime import peak_memory_bytes, reset_peak_memory

ROOT = Path(__file__).resolve().parents[1]

# The published structure (SDXL spatial VAE + VAE_Temporal_SD) at random weights, one frame per spatial call.
FULL_RANDOM = dict(type="OpenSoraVAE_V1_2", vae_2d=dict(from_pretrained=None, config=None, micro_batch_size=1))

# Dense peak throughput in TFLOP/s (vendor datasheets, no sparsity): (bf16 tensor core, fp32 non-tensor).
DEVICE_PEAK_TFLOPS = {
    "H100 PCIe": {torch.bfloat16: 756.0, torch.float32: 51.2},
    "H100": {torch.bfloat16: 989.4, torch.float32: 66.9},  # SXM / HBM3
    "H200": {torch.bfloat16: 989.4, torch.float32: 66.9},
}


def _git_commit() -> str:
    """Short commit of the tree the bench runs from, "+dirty" when tracked files differ from it; $BENCH_COMMIT
    where there is no git (a lent machine gets a copy of the tree without .git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        head = None
    if head is None or head.returncode:
        return os.environ.get("BENCH_COMMIT", "unknown")
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _gpu(device: torch.device) -> str:
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "unknown"
    return f"{torch.cuda.get_device_name(device)}, driver {driver}, CUDA {torch.version.cuda}"


def _load() -> float:
    return os.getloadavg()[0]


def provenance(device: Union[str, torch.device, None] = None, threads: Optional[int] = None) -> dict:
    """Print (and return, for JSON output) where and when the figures below it were measured: UTC date, commit,
    machine (CPU model and vector extensions as the calibration keys them; on CUDA the GPU, driver and CUDA),
    torch threads (`threads`: those of the timed child processes where they differ from this one's), torch
    version, 1-minute load average; the load at the end comes from `provenance_end`. Every
    bench/*.py calls it first. A load above the cores the threads leave free slows multi-threaded steps many times
    over (OpenMP threads wait for descheduled peers): such figures are not comparable, and the header says so."""
    device = torch.device(device or "cpu")
    threads = threads or torch.get_num_threads()
    cores = os.cpu_count() or 1
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=_git_commit(), cpu=machine().rsplit(" torch=", 1)[0],  # the calibration's key less torch/threads
                cores=cores, threads=threads,
                gpu=_gpu(device) if device.type == "cuda" else None, torch=torch.__version__,
                load_start=round(_load(), 2), start_unix=time.time())
    where = f"GPU {info['gpu']}; host " if info["gpu"] else ""
    print(f"provenance: {info['date']}, commit {info['commit']}, {where}CPU {info['cpu']}, {cores} cores, "
          f"{threads} torch threads, torch {info['torch']}, load {info['load_start']:.1f} at start", flush=True)
    if device.type == "cpu" and info["load_start"] + threads > cores + 0.5:
        print(f"provenance: warning: load {info['load_start']:.1f} with {threads} threads on {cores} cores: times "
              "are not comparable with an idle machine's", flush=True)
    atexit.register(provenance_end, info)
    return info


def provenance_end(info: dict) -> dict:
    """Add the end load and the wall time to `info` and print them, once: at exit, or before (call it before
    writing `info` out)."""
    if "load_end" not in info:
        info.update(load_end=round(_load(), 2), wall_s=round(time.time() - info["start_unix"], 1))
        print(f"provenance: load {info['load_end']:.1f} at the end, {info['wall_s']:.0f} s", flush=True)
    return info


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
        what = f"CPU, {torch.get_num_threads()} threads" + (
            f", nominal fp32 peak {peak * 1e3:.0f} GFLOP/s" if peak else "")
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
