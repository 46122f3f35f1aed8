"""Winograd F(4x4, 3x3) vs the plain convolution for each conv shape of the full-size model (fp32 CPU).

Spatial: the AutoencoderKL's 3x3 stride-1 Conv2d at a 64x64 clip, a micro-batch of frames (the pipeline's default
4). Temporal: the temporal VAE's (3, 3, 3) Conv3d on the 8x8 latent (time already causally padded). Each row times
both, interleaved (`common.compare`), and gives the max |diff| relative to the output's largest value.

python bench/bench_winograd.py --threads 2 [--frames 4] [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, provenance  # noqa: E402

from opensora_vae.models.speed import winograd  # noqa: E402

# (in, out, H=W) of the SDXL AutoencoderKL at a 64x64 clip (encoder and decoder), 3x3 stride 1.
SPATIAL = [(128, 128, 64), (256, 128, 64), (256, 256, 64), (128, 256, 32), (256, 256, 32), (512, 256, 32),
           (512, 512, 32), (256, 512, 16), (512, 512, 16), (512, 512, 8), (4, 512, 8), (128, 3, 64), (512, 8, 8)]
# (in, out, frames in incl. causal padding) of the temporal VAE at an 8x8 latent of 17 frames, kernel (3, 3, 3).
TEMPORAL = [(4, 128, 22), (128, 128, 22), (128, 256, 12), (256, 256, 12), (256, 256, 7), (256, 512, 7),
            (512, 512, 7), (512, 1024, 7), (512, 512, 12), (256, 256, 22), (256, 4, 22)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--frames", type=int, default=4, help="frames per AutoencoderKL call")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--latent", type=int, default=8, help="temporal VAE H=W")
    p.add_argument("--only", choices=["spatial", "temporal"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    provenance("cpu")
    torch.manual_seed(0)
    print(f"{'shape':34s} {'plain ms':>9s} {'winograd ms':>11s} {'ratio':>6s} {'rel diff':>9s}")
    cases = []
    if args.only != "temporal":
        cases += [("2d", c, k, args.frames, s) for c, k, s in SPATIAL]
    if args.only != "spatial":
        cases += [("3d", c, k, f, args.latent) for c, k, f in TEMPORAL]
    with torch.inference_mode():
        for kind, c, k, f, s in cases:
            if kind == "2d":
                x = torch.randn(f, c, s, s)
                w = torch.randn(k, c, 3, 3) / (9 * c) ** 0.5
                plain = lambda: F.conv2d(x, w, b, padding=1)  # noqa: E731
                fast = lambda: winograd.conv2d(x, u, b)  # noqa: E731
                name = f"Conv2d {c}->{k} {f}x{s}x{s}"
            else:
                x = torch.randn(1, c, f, s, s)
                w = torch.randn(k, c, 3, 3, 3) / (27 * c) ** 0.5
                plain = lambda: F.conv3d(x, w, b, padding=(0, 1, 1))  # noqa: E731
                fast = lambda: winograd.conv3d(x, u, b)  # noqa: E731
                name = f"Conv3d {c}->{k} T{f} {s}x{s}"
            b = torch.randn(k)
            u = winograd.transform_weight(w)
            res = compare({"plain": plain, "winograd": fast}, torch.device("cpu"), args.repeat)
            ref, got = res["plain"]["out"], res["winograd"]["out"]
            rel = ((ref - got).abs().max() / ref.abs().max()).item()
            t0, t1 = res["plain"]["seconds"], res["winograd"]["seconds"]
            print(f"{name:34s} {t0 * 1e3:9.1f} {t1 * 1e3:11.1f} {t0 / t1:6.2f} {rel:9.1e}", flush=True)


if __name__ == "__main__":
    main()
