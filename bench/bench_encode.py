"""Throughput of the encode job (opensora_vae.encode, scripts/encode_latents.py), side by side in one process:

  job   encode_dataset over a CSV of real clips: read + resize + encode (mean and std) + write shards and index
  bare  model.encode_posterior on the same clips already in memory (the floor the job can reach)

Random weights (tiny: configs/vae/tiny; full: the published architecture), one process, batch 1. Prints clips/s of
each and the job's fraction of the bare rate.

python bench/bench_encode.py --model tiny --rows 16 --frames 17 --size 64
python bench/bench_encode.py --model full --rows 4 --frames 17 --size 64
"""
from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
from pathlib import Path

import torch

from common import provenance  # bench/ is the script's folder
from opensora_vae.config import load_config
from opensora_vae.data import VideoTextDataset
from opensora_vae.data.samples import INSTALL_HINT, sample_clips
from opensora_vae.encode import encode_dataset
from opensora_vae.jobs import job_model
from opensora_vae.runtime import resolve_device, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": ROOT / "configs/vae/tiny/latents.py", "full": ROOT / "configs/vae/inference/latents.py"}
FULL_OPTIONS = {"model.from_pretrained": None, "model.vae_2d": dict(from_pretrained=None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    clips = sample_clips()
    if not clips:
        raise SystemExit(f"needs the sample clips: {INSTALL_HINT}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    provenance(device)
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "rows.csv"
        paths = list(itertools.islice(itertools.cycle(sorted(clips.values())), args.rows))
        csv.write_text("path,text\n" + "".join(f"{p},clip {i}\n" for i, p in enumerate(paths)))
        options = dict(FULL_OPTIONS if args.model == "full" else {}, **{
            "dataset.data_path": str(csv), "device": str(device), "dtype": args.dtype,
            "num_workers": args.num_workers, "shard_size_mb": 256, "save_dir": str(Path(tmp) / "latents")})
        cfg = load_config(CONFIGS[args.model], options, job="encode")

        torch.manual_seed(0)
        report = encode_dataset(cfg, num_frames=args.frames, image_size=(args.size, args.size))
        job_rate = report.encoded / report.loop_seconds

        model = job_model(cfg.model, device, dtype)
        data = VideoTextDataset(csv, num_frames=args.frames, image_size=(args.size, args.size))
        xs = [data.load_row(i)["video"][None].to(device=device, dtype=dtype) for i in range(len(data))]
        with torch.inference_mode():
            model.encode_posterior(xs[0])  # warm-up (the job's first clip pays it too)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for x in xs:
                model.encode_posterior(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            bare_rate = len(xs) / (time.perf_counter() - start)
    print(f"\n{args.model} model, {args.rows} rows of {args.frames}x{args.size}x{args.size}, {device}, "
          f"{str(dtype).replace('torch.', '')}, {torch.get_num_threads()} threads, num_workers={args.num_workers}")
    print(f"job:  {job_rate:.3g} clips/s, {1 / job_rate:.2f} s/clip ({report.encoded} clips, "
          f"{report.bytes_written / 1e6:.2f} MB written)")
    print(f"bare: {bare_rate:.3g} clips/s, {1 / bare_rate:.2f} s/clip (encode_posterior on preloaded clips)")
    print(f"job / bare: {job_rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()
