"""Peak memory beyond the input/output tensors: tiled decode vs resolution (issue 9 target 3, CPU part) and encode
or decode vs number of frames (target 4), each measurement in a fresh subprocess after a one-frame warm-up (peak RSS
sampled every 0.5 ms with large blocks mmapped, so RSS follows the live tensors, and malloc's in-use bytes where
glibc reports them; on CUDA, max allocated).
Old vs new side by side: --legacy runs the spatial VAE's former frame loop (per-chunk outputs, then one
concatenated copy).

python bench/bench_memory.py resolution --sizes 256x256 512x512 1024x1024
python bench/bench_memory.py length --frames 17 65 257 --op encode --threads 1 --no-legacy --no-sampler
python bench/bench_memory.py time --frames 17 65 257 --op encode --threads 1   # time linear in length?

"peak" is above the RSS before the call (which already holds the input), so "beyond in+out" = peak - output.
--no-sampler: no sampling thread; the peak is getrusage's (the warm-up stays below it). Use it for lengths: with the
sampler running, malloc's in-use bytes of the decode itself, read between ops, grew by 3.6 MiB from 17 to 257
frames (a 25 s run), and stayed flat without it.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20

# A mid-size spatial VAE (the SDXL structure at a quarter of its widths) and the tiny temporal VAE: fast on CPU,
# with activations large enough that a full-frame copy shows.
MID_VAE_2D = dict(type="VideoAutoencoderKL", from_pretrained=None, micro_batch_size=4, config=dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64, 128, 128], layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32))
TINY_TEMPORAL = dict(type="VAE_Temporal", in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=16,
                     num_res_blocks=1, channel_multipliers=(1, 2, 2, 4), temporal_downsample=(False, True, True),
                     num_groups=4)


def _legacy_frames(self, x, fn, channels, ratio, out=None):
    """The former VideoAutoencoderKL._frames: every micro-batch's output kept, then concatenated (and copied into
    `out` when the streamed pipeline decode passes one)."""
    import torch
    from einops import rearrange

    b = x.shape[0]
    x = rearrange(x, "b c t h w -> (b t) c h w")
    step = self.micro_batch_size or x.shape[0]
    y = rearrange(torch.cat([fn(x[i:i + step], None) for i in range(0, x.shape[0], step)], dim=0),
                  "(b t) c h w -> b c t h w", b=b)
    return y if out is None else out.copy_(y)


def _rss_now() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def _heap_fn():
    """Bytes malloc has handed out and not had back (glibc >= 2.33), or None: live allocations only, unlike
    RSS, which also moves with pages the allocator keeps or touches late."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def now() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd
    return now


def _op_boundary_peak(heap_now):
    """A dispatch mode reading malloc's in-use bytes after every aten op into `.peak`: deterministic, unlike a
    sampler, whose catch of short peaks inside ops (convolution scratch) depends on the machine's load; misses
    those. Built here so that only the child process imports torch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpBoundaryPeak(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, heap_now())
            return out
    return OpBoundaryPeak()


class _PeakRSS(threading.Thread):
    """Samples the process's RSS and malloc's in-use bytes every 0.5 ms (getrusage's peak cannot be reset after
    the warm-up)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.heap_now = _heap_fn()
        self.peak, self.heap_peak, self.stop = 0, 0, False

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, _rss_now())
            if self.heap_now is not None:
                self.heap_peak = max(self.heap_peak, self.heap_now())
            time.sleep(0.0005)


def _model(args):
    import torch

    from opensora_vae import build_model
    from opensora_vae.models.spatial import VideoAutoencoderKL

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.legacy:
        VideoAutoencoderKL._frames = _legacy_frames
    if args.model == "full":
        from common import FULL_RANDOM as cfg
    else:
        cfg = dict(type="VideoAutoencoderPipeline", vae_2d=MID_VAE_2D, vae_temporal=TINY_TEMPORAL, micro_frame_size=17)
    model = build_model(cfg).eval().to(args.device, getattr(torch, args.dtype))
    if args.tiling:
        model.enable_tiling(tile_size=args.tile_size, overlap=args.overlap, exact_norms=args.exact_norms,
                            tile_mid_block=args.tile_mid_block)
    return model


def _input(model, args, frames: int):
    import torch

    h, w = args.size
    dtype = getattr(torch, args.dtype)
    if args.op == "encode":
        return torch.rand(1, 3, frames, h, w, device=args.device, dtype=dtype) * 2 - 1
    return torch.randn(1, 4, *model.get_latent_size([frames, h, w]), device=args.device, dtype=dtype)


def time_lengths(args) -> None:
    """Time per frame of each length, interleaved in one process (best of --repeats): on a loaded machine,
    lengths measured side by side share the same conditions, which separate processes do not."""
    import torch

    model = _model(args)
    best = {f: float("inf") for f in args.frames}
    with torch.inference_mode():
        for rep in range(args.repeats + 1):  # the first round warms up
            for f in args.frames:
                z = _input(model, args, f)
                start = time.thread_time()
                model.encode(z, sample_posterior=False) if args.op == "encode" else model.decode(z, num_frames=f)
                if rep:
                    best[f] = min(best[f], (time.thread_time() - start) / f)
    a = args.frames[0]
    print(f"{args.op} at {args.size[0]}x{args.size[1]}, {args.model} model, {args.dtype}, {args.threads} thread(s), "
          f"thread CPU time per frame, best of {args.repeats} interleaved rounds")
    for f in args.frames:
        print(f"{f:4d} frames: {best[f] * 1000:7.1f} ms/frame  ({best[f] / best[a]:.2f}x of {a} frames)")


def child(args) -> None:
    import torch

    model = _model(args)
    z = _input(model, args, args.frames)
    cuda = args.device.startswith("cuda")
    with torch.inference_mode():  # warm-up on one frame of the same size (kernels, primitive caches)
        if args.op == "encode":
            model.encode(z[:, :, :1], sample_posterior=False)
        else:
            model.decode(z[:, :, :1], num_frames=1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sampler = _PeakRSS()
    if cuda:
        base = torch.cuda.memory_allocated()
    before = _rss_now()
    heap_before = sampler.heap_now() if sampler.heap_now is not None else None
    if not args.no_sampler:
        sampler.start()
    start, start_cpu = time.perf_counter(), time.thread_time()
    op_peak = _op_boundary_peak(sampler.heap_now) if args.heap_per_op and sampler.heap_now is not None else None
    with torch.inference_mode(), op_peak or contextlib.nullcontext():
        y = model.encode(z, sample_posterior=False) if args.op == "encode" else model.decode(z, num_frames=args.frames)
    if cuda:
        torch.cuda.synchronize()
    # CPU time of this thread (it does the work with --threads 1): far less sensitive to a loaded machine.
    seconds, cpu_seconds = time.perf_counter() - start, time.thread_time() - start_cpu
    sampler.stop = True
    if sampler.is_alive():
        sampler.join()
    # getrusage's lifetime peak catches short peaks the sampler misses (e.g. a final concatenation); the one-frame
    # warm-up before it stays below the measured run.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = torch.cuda.max_memory_allocated() - base if cuda else max(sampler.peak, maxrss) - before
    # The input was allocated before `before`/`base`: only the output counts against the peak.
    out = y.numel() * y.element_size()
    heap_extra = None if cuda or heap_before is None or args.no_sampler else sampler.heap_peak - heap_before - out
    op_extra = None if op_peak is None else op_peak.peak - heap_before - out
    print(json.dumps(dict(peak=peak, input=z.numel() * z.element_size(), output=out, extra=peak - out,
                          heap_extra=heap_extra, op_extra=op_extra, seconds=seconds, cpu_seconds=cpu_seconds)))


def measure(**kw) -> dict:
    cmd = [sys.executable, __file__, "child", "--size", *map(str, kw.pop("size")), "--frames", str(kw.pop("frames"))]
    for k, v in kw.items():
        if isinstance(v, bool):
            cmd += [f"--{k.replace('_', '-')}"] if v else []
        else:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    # Large blocks always mmapped: freed memory leaves RSS at once, so RSS follows the live tensors.
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(label: str, r: dict) -> str:
    heap = [f"{name} {r[key] / MiB:6.1f}"
            for name, key in (("malloc in use", "heap_extra"), ("between ops", "op_extra")) if r.get(key) is not None]
    heap = f" ({', '.join(heap)})" if heap else ""
    return (f"{label:<34} peak {r['peak'] / MiB:8.1f} MiB  in {r['input'] / MiB:7.1f} MiB  "
            f"out {r['output'] / MiB:7.1f} MiB  beyond in+out {r['extra'] / MiB:7.1f} MiB{heap}  {r['seconds']:7.2f} s "
            f"(thread CPU {r['cpu_seconds']:7.2f} s)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["resolution", "length", "time", "child"])
    p.add_argument("--sizes", nargs="+", default=["256x256", "512x512", "1024x1024"], help="HxW (resolution)")
    p.add_argument("--size", type=int, nargs=2, default=[64, 64], help="H W (length; child)")
    p.add_argument("--frames", type=int, nargs="+", default=[17, 257])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16")
    p.add_argument("--model", choices=["mid", "full"], default="mid")
    p.add_argument("--op", choices=["decode", "encode"], default="decode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--exact-norms", type=int, default=1000, help="enable_tiling(exact_norms=...); 1000: all")
    p.add_argument("--tiling", action="store_true")
    p.add_argument("--tile-mid-block", action="store_true", help="enable_tiling(tile_mid_block=True)")
    p.add_argument("--legacy", action="store_true")
    p.add_argument("--no-legacy", action="store_true", help="length: skip the former frame loop's rows")
    p.add_argument("--repeats", type=int, default=2, help="time: interleaved rounds after a warm-up round")
    p.add_argument("--tiled-only", action="store_true", help="resolution: skip the untiled runs")
    p.add_argument("--no-sampler", action="store_true",
                   help="CPU: no 0.5 ms sampling thread; peak RSS from getrusage only (see above)")
    p.add_argument("--heap-per-op", action="store_true",
                   help="CPU: also read malloc's in-use bytes after every aten op (deterministic; slower)")
    args = p.parse_args(argv)
    if args.mode == "child":
        args.frames = args.frames[0]
        return child(args)
    from common import provenance  # here: the timed child processes skip it

    provenance(args.device, threads=args.threads)
    if args.mode == "time":
        return time_lengths(args)
    common = dict(device=args.device, threads=args.threads, tile_size=args.tile_size, overlap=args.overlap,
                  exact_norms=args.exact_norms, dtype=args.dtype, model=args.model, op=args.op,
                  tile_mid_block=args.tile_mid_block, heap_per_op=args.heap_per_op, no_sampler=args.no_sampler)
    if args.mode == "resolution":
        frames = args.frames[0]
        print(f"{args.op} of {frames} frames, {args.model} model, {args.dtype}, tiles {args.tile_size}/{args.overlap}, "
              f"exact_norms {args.exact_norms}, {args.device}")
        tiled, plain = {}, {}
        for s in args.sizes:
            size = [int(v) for v in s.split("x")]
            tiled[s] = measure(size=size, frames=frames, tiling=True, **common)
            print(row(f"{s} tiled", tiled[s]), flush=True)
            if not args.tiled_only:
                plain[s] = measure(size=size, frames=frames, **common)
                print(row(f"{s} untiled", plain[s]), flush=True)
                print(f"{s}: tiled / untiled time {tiled[s]['seconds'] / plain[s]['seconds']:.2f}x", flush=True)
        lo, hi = args.sizes[0], args.sizes[-1]
        print(f"tiled: beyond in+out at {hi} / at {lo}: {tiled[hi]['extra'] / max(tiled[lo]['extra'], 1):.2f}x")
        if tiled[hi].get("heap_extra") is not None:
            print(f"tiled: malloc in use beyond in+out at {hi} / at {lo}: "
                  f"{tiled[hi]['heap_extra'] / max(tiled[lo]['heap_extra'], 1):.2f}x")
    else:
        print(f"{args.op} at {args.size[0]}x{args.size[1]}, {args.model} model, {args.dtype}, {args.device}")
        res = {}
        variants = (False,) if args.no_legacy else (True, False)
        for legacy in variants:
            for f in args.frames:
                res[legacy, f] = r = measure(size=args.size, frames=f, legacy=legacy, tiling=args.tiling, **common)
                print(row(f"{'old' if legacy else 'new'} {f} frames", r) +
                      f"  {r['seconds'] / f * 1000:6.0f} ms/frame (CPU {r['cpu_seconds'] / f * 1000:6.0f})", flush=True)
        a = args.frames[0]
        for legacy in variants:
            r0 = res[legacy, a]
            for b in args.frames[1:]:
                r1 = res[legacy, b]
                print(f"{'old' if legacy else 'new'}: {b} / {a} frames: "
                      f"beyond in+out {r1['extra'] / r0['extra']:.2f}x, peak {r1['peak'] / r0['peak']:.2f}x, "
                      f"time per frame {r1['seconds'] / b / (r0['seconds'] / a):.2f}x "
                      f"(CPU {r1['cpu_seconds'] / b / (r0['cpu_seconds'] / a):.2f}x)")

if __name__ == "__main__":
    main()
