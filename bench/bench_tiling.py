"""Tiled vs untiled on a real clip: PSNR of the encoder latents and the decoded pixels, of the worst 8-pixel row
or column band (where seams would show), and time relative to untiled, side by side in one run.

Methods: diffusers' AutoencoderKL tiling (spatial VAE only, per-tile statistics); this package's exact tiling
(models/speed/executor.py), at each `--budgets` value too (time and peak memory beyond the call: the budget curve);
its low-memory path with `--exact-norms` values (0: per-tile GroupNorm statistics; 1000: whole-frame ones).
`--ranks 1 2`: the exact decode of one frame with its tiles split across gloo ranks of one thread each (torchrun
children), time per rank count and the speed-up.

python bench/bench_tiling.py                               # full-size SDXL spatial VAE, random weights
python bench/bench_tiling.py --size 1024 1536 --no-diffusers --budgets 8GiB 2GiB 512MiB
python bench/bench_tiling.py --ranks 1 2 --size 512 768    # spatial parallelism
python bench/bench_tiling.py --checkpoint DIR --frames 17  # a trained pipeline (both VAEs)
python bench/bench_tiling.py --checkpoint random --frames 5  # the published structure of both VAEs, random weights
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from common import FULL_RANDOM, provenance  # bench/ is the script's folder
from opensora_vae.models.speed import executor
from opensora_vae.data.samples import sample_clips
from opensora_vae.data.video import read_video


def psnr(ref: torch.Tensor, x: torch.Tensor, peak: float) -> float:
    return (10 * torch.log10(peak**2 / (ref - x).float().square().mean())).item()


def worst_band(ref: torch.Tensor, x: torch.Tensor, peak: float, band: int = 8) -> float:
    """PSNR of the worst `band`-wide run of rows or of columns."""
    err = (ref - x).float().square()
    worst = 0.0
    for dim in (-2, -1):
        other = [d for d in range(err.ndim) if d != err.ndim + dim]
        profile = err.mean(dim=other)
        worst = max(worst, F.avg_pool1d(profile[None, None], band, 1).max().item())
    return 10 * torch.log10(torch.tensor(peak**2 / worst)).item()


def clip(name: str, frames: int, h: int, w: int) -> torch.Tensor:
    """The clip's central h x w crop in [-1, 1]; a clip smaller than that: its largest central crop of that aspect,
    resized (bicubic) to h x w."""
    video, _ = read_video(sample_clips()[name])
    if video.shape[0] < frames:
        raise SystemExit(f"{name} is {tuple(video.shape)}; need {frames} frames")
    ch, cw = min(h, video.shape[2]), min(w, video.shape[3])
    if (ch, cw) != (h, w):
        scale = min(video.shape[2] / h, video.shape[3] / w)
        ch, cw = int(h * scale), int(w * scale)
        print(f"{name}: its central {ch}x{cw} resized to {h}x{w}")
    top, left = (video.shape[2] - ch) // 2, (video.shape[3] - cw) // 2
    x = video[:frames, :, top:top + ch, left:left + cw].float()
    if (ch, cw) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 255)
    return (x.permute(1, 0, 2, 3)[None] / 127.5 - 1).contiguous()


def timed(fn):
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    if out.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a trained pipeline (published folder or trainer checkpoint), or 'random': "
                                        "the published structure of both VAEs at random weights; default: the "
                                        "full-size SDXL spatial VAE with random weights")
    p.add_argument("--clip", default="bikes")
    p.add_argument("--frames", type=int, default=1)
    p.add_argument("--size", type=int, nargs=2, default=[256, 384])
    p.add_argument("--tile-size", type=int, default=128)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--temporal-tile-size", type=int)
    p.add_argument("--temporal-overlap", type=int)
    p.add_argument("--exact-norms", type=int, nargs="*", default=[],
                   help="the low-memory path with these enable_tiling(exact_norms=...) values (1000: all)")
    p.add_argument("--budgets", nargs="*", default=[], help="max_memory values for the exact path's budget curve")
    p.add_argument("--ranks", type=int, nargs="*", default=[], help="rank counts for the parallel decode")
    p.add_argument("--curve", action="store_true",
                   help="the budget curve of the decode instead: each --budgets value in a fresh process (time and "
                        "peak RSS beyond what the process held before the call; random latents)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--curve-worker", help=argparse.SUPPRESS)
    p.add_argument("--tile-mid-block", nargs="+", type=int, default=[0], choices=[0, 1],
                   help="values of enable_tiling(tile_mid_block=...) to compare, e.g. 0 1")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' tiling")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.worker:
        return ranks_worker(args)
    if args.curve_worker:
        return curve_worker(args)
    if args.curve:
        return curve(args)
    if args.ranks:
        return ranks(args)
    torch.set_num_threads(args.threads)
    provenance(args.device)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    x = clip(args.clip, args.frames, *args.size).to(args.device, dtype)

    if args.checkpoint:
        from opensora_vae import build_model
        from opensora_vae.models.pipeline import VideoAutoencoderPipeline

        if args.checkpoint == "random":
            model = build_model(FULL_RANDOM)
        else:
            model = VideoAutoencoderPipeline.from_pretrained(args.checkpoint)
        model = model.eval().to(args.device, dtype)
        spatial = model.spatial_vae
        name = f"pipeline {args.checkpoint} (both VAEs)"
    else:
        from opensora_vae.models.spatial import VideoAutoencoderKL

        model = spatial = VideoAutoencoderKL(config=None, micro_batch_size=1).eval().to(args.device, dtype)
        name = "full-size SDXL AutoencoderKL, random weights (spatial VAE)"
    frames = dict(num_frames=x.shape[2]) if args.checkpoint else {}
    encode = lambda: model.encode(x, sample_posterior=False)  # noqa: E731
    decode = lambda: model.decode(z, **frames)  # noqa: E731
    try:  # warm (first calls pay for kernel selection and calibration): the untiled times of a second run
        for _ in range(2):
            z, t_enc = timed(encode)
            y, t_dec = timed(decode)
    except torch.cuda.OutOfMemoryError:  # 4K on a small card: tiled rows in seconds, no PSNR
        z = y = t_enc = t_dec = None
        torch.cuda.empty_cache()
        model.enable_tiling(tile_size=args.tile_size)
        z, _ = timed(encode)
        model.disable_tiling()
    z_peak = (z.max() - z.min()).item()
    print(f"{name}; {args.dtype}; clip {args.clip} {tuple(x.shape)}; tiles {args.tile_size} px, overlap "
          f"{args.overlap} px")
    if y is None:
        print("untiled: out of memory; times in seconds, no PSNR (the decode's input: the exact tiled latents)")
    else:
        print(f"untiled: encode {t_enc:.1f} s, decode {t_dec:.1f} s; latent PSNR peak = latent range {z_peak:.2f}, "
              f"pixel peak 2")
    print(f"{'method':<28}{'enc PSNR':>9}{'enc band':>9}{'dec PSNR':>9}{'dec band':>9}{'enc time':>9}{'dec time':>9}")

    def report(label):
        """One row; returns its latents and pixels."""
        # Peak beyond what is held when the row starts (on CPU freed memory the allocator keeps counts as held).
        nonlocal base
        torch.cuda.reset_peak_memory_stats() if x.is_cuda else reset_peak()
        base = torch.cuda.memory_allocated() if x.is_cuda else rss()
        zt, te = timed(encode)
        yt, td = timed(decode)
        extra = f"  peak +{(peak() - base) / 2**20:.0f} MiB" if args.budgets else ""
        if y is None:
            print(f"{label:<28}{'-':>9}{'-':>9}{'-':>9}{'-':>9}{te:8.1f}s{td:8.1f}s{extra}", flush=True)
        else:
            print(f"{label:<28}{psnr(z, zt, z_peak):9.1f}{worst_band(z, zt, z_peak):9.1f}{psnr(y, yt, 2):9.1f}"
                  f"{worst_band(y, yt, 2):9.1f}{te / t_enc:8.2f}x{td / t_dec:8.2f}x{extra}", flush=True)
        return zt, yt

    module = spatial.module  # diffusers' own tiling, same tile size, its default 25% overlap
    if not args.no_diffusers:
        module.enable_tiling()
        module.tile_sample_min_size = args.tile_size
        module.tile_latent_min_size = args.tile_size // spatial.patch_size[1]
        report("diffusers tiling")
        module.disable_tiling()
    cuda = x.is_cuda
    base = torch.cuda.memory_allocated() if cuda else rss()

    def peak():
        return torch.cuda.max_memory_allocated() if cuda else peak_rss()

    for budget in [None] + args.budgets:
        model.enable_tiling(tile_size=args.tile_size, max_memory=budget, temporal_tile_size=args.temporal_tile_size)
        row = report("exact" + (f" max_memory={budget}" if budget else ""))
        plans = [f"{k[0][0]} {p.path}/{p.store} tile {p.tile} need {p.need / 2**20:.0f} MiB"
                 for m in model.modules() for k, p in getattr(m, "_tiling_plans", {}).items()]
        if budget:
            print(f"{'':<28}plans: {'; '.join(plans)}")
        if budget is None:
            exact = row
    for mid in args.tile_mid_block:
        for n in args.exact_norms:
            model.enable_tiling(tile_size=args.tile_size, overlap=args.overlap, exact_norms=n, tile_mid_block=bool(mid),
                                temporal_tile_size=args.temporal_tile_size, temporal_overlap=args.temporal_overlap)
            report(f"low-memory exact_norms={n}" + (" tile_mid_block" if mid else ""))
    model.disable_tiling()
    if dtype != torch.float32 and y is not None:  # tiling adds no error beyond the dtype's own
        model.float()
        with torch.inference_mode():
            z32, y32 = model.encode(x.float(), sample_posterior=False), model.decode(z.float(), **frames)
        print(f"against float32 untiled (same weights; decode of the same latents), enc / dec PSNR: untiled "
              f"{args.dtype} {psnr(z32, z.float(), z_peak):.1f} / {psnr(y32, y.float(), 2):.1f}, exact "
              f"{args.dtype} {psnr(z32, exact[0].float(), z_peak):.1f} / {psnr(y32, exact[1].float(), 2):.1f}")


def rss() -> int:
    return _status("VmRSS:")


def peak_rss() -> int:
    return _status("VmHWM:")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


def reset_peak() -> None:
    """Peak RSS (VmHWM) back to the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def ranks(args) -> None:
    """The worker under torchrun for each rank count, one thread per rank; times and the speed-up."""
    provenance(args.device, threads=1)
    times = {}
    for n in args.ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", "--size", *map(str, args.size), "--tile-size", str(args.tile_size), "--seed",
               str(args.seed)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        times[n] = float(out.strip().splitlines()[-1].split()[-1])
        print(f"{n} rank(s) x 1 thread: decode {times[n]:.2f} s ({times[args.ranks[0]] / times[n]:.2f}x)", flush=True)


def curve(args) -> None:
    """One fresh process per budget ("none": no budget): the decode's time, peak and plan."""
    provenance(args.device)
    for budget in args.budgets:
        cmd = [sys.executable, __file__, "--curve-worker", budget, "--size", *map(str, args.size), "--tile-size",
               str(args.tile_size), "--threads", str(args.threads), "--seed", str(args.seed)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


def random_decode(args, threads: int, **tiling):
    """The full-size spatial VAE tiled with `tiling`, random latents for an args.size frame, warmed up."""
    from opensora_vae.models.spatial import VideoAutoencoderKL

    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    model = VideoAutoencoderKL(config=None, micro_batch_size=1).eval()
    f = model.patch_size[1]
    z = torch.randn(1, 4, 1, args.size[0] // f, args.size[1] // f)
    model.enable_tiling(tile_size=args.tile_size, **tiling)
    timed(lambda: model.decode(z[..., :16, :16]))  # warm-up
    return model, z


def curve_worker(args) -> None:
    budget = None if args.curve_worker == "none" else args.curve_worker
    model, z = random_decode(args, args.threads, max_memory=budget)
    out = torch.empty(1, 3, 1, *args.size)
    plan_start = time.perf_counter()
    with torch.inference_mode():  # the plan (fake tensors) before the measured call
        plan = model._plan(("decode", z[:, :, 0].shape, z.dtype, z.device), executor.autoencoderkl_decode,
                    args.size[1], model.module, z[:, :, 0], out=out[:, :, 0], divisor=model.scaling_factor)
    plan_s = time.perf_counter() - plan_start
    before = rss()
    reset_peak()
    _, t = timed(lambda: model.decode(z, out=out))
    print(f"max_memory {args.curve_worker}: plan {plan.path}/{plan.store} tile {plan.tile} need "
          f"{plan.need / 2**20:.0f} MiB; decode {t:.1f} s; peak +{(peak_rss() - before) / 2**20:.0f} MiB "
          f"(plan made in {plan_s:.1f} s)", flush=True)


def ranks_worker(args) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    model, z = random_decode(args, 1, parallel=dist.get_world_size() > 1)
    dist.barrier()
    _, t = timed(lambda: model.decode(z))
    if dist.get_rank() == 0:
        print(f"decode {t:.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
