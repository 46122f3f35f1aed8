"""Encode a CSV of videos/images with any video VAE to latent shards (posterior mean and std before normalisation;
the model's own normalisation in meta.json, applied by LatentDataset) for diffusion training.

torchrun --standalone --nproc_per_node=N scripts/encode_latents.py configs/vae/inference/latents.py \
    --ckpt-path CKPT --data-path CSV --save-dir DIR
CKPT: an Open-Sora checkpoint or a spec string such as diffusers:AutoencoderKLWan=PATH_OR_ID,subfolder=vae.
Rerun the same command to resume: stored clips are skipped, with any number of ranks. SIGTERM/SIGUSR1/Ctrl-C:
each rank writes what it encoded and exits 75.
"""
import argparse
import os
import sys

from opensora_vae.cli import ArgumentParser, add_clip_arguments, add_job_arguments, clip_options, image_size, job_config
from opensora_vae.distributed import close_distributed
from opensora_vae.encode import encode_dataset
from opensora_vae.errors import run_main
from opensora_vae.signals import EXIT_PREEMPTED
from opensora_vae.train.logging import setup_logging


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser, "encode")
    # --num-frames / --image-size replace those fields of every configured bucket.
    add_clip_arguments(parser, "output folder (sets save_dir)")
    args = parser.parse_args(argv)
    cfg = job_config(args, "encode", clip_options(args))
    setup_logging(int(os.environ.get("RANK", 0)))
    try:
        report = encode_dataset(cfg, num_frames=args.num_frames, image_size=image_size(args.image_size))
    finally:
        close_distributed()
    return EXIT_PREEMPTED if report.preempted else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
