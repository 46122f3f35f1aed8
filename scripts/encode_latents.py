"""Encode a CSV of videos/images to latent shards (posterior mean and std) for diffusion training.

torchrun --standalone --nproc_per_node=N scripts/encode_latents.py configs/vae/inference/latents.py \
    --ckpt-path CKPT --data-path CSV --save-dir DIR
Rerun the same command to resume: stored clips are skipped, with any number of ranks.
"""
import argparse
import os

from opensora_vae.cli import add_model_run_arguments, image_size, load_run_config
from opensora_vae.distributed import close_distributed
from opensora_vae.encode import encode_dataset
from opensora_vae.train.logging import setup_logging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --num-frames / --image-size replace those fields of every configured bucket.
    add_model_run_arguments(parser, "output folder (default: config save_dir)")
    args = parser.parse_args(argv)

    cfg = load_run_config(args)
    save_dir = args.save_dir or cfg.get("save_dir")
    if not save_dir:
        parser.error("no --save-dir and no save_dir in the config")
    setup_logging(int(os.environ.get("RANK", 0)))
    try:
        encode_dataset(cfg, args.ckpt_path, save_dir, num_frames=args.num_frames, image_size=image_size(args.image_size))
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
