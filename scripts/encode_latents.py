"""Encode a CSV of videos/images to latent shards (posterior mean and std) for diffusion training.

torchrun --standalone --nproc_per_node=N scripts/encode_latents.py configs/vae/inference/latents.py \
    --ckpt-path CKPT --data-path CSV --save-dir DIR
Rerun the same command to resume: stored clips are skipped, with any number of ranks.
"""
import argparse
import os

from opensora_vae.config import load_config, parse_cfg_options
from opensora_vae.distributed import close_distributed
from opensora_vae.encode import encode_dataset
from opensora_vae.train.logging import setup_logging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="e.g. configs/vae/inference/latents.py")
    parser.add_argument("--ckpt-path", help="published folder or hub id, model.safetensors, or trainer checkpoint")
    parser.add_argument("--data-path", required=True, help="CSV with a 'path' column ('text', 'fps' kept)")
    parser.add_argument("--save-dir", help="output folder (default: config save_dir)")
    parser.add_argument("--num-frames", type=int, help="frames per clip in every bucket (overrides the config)")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="H [W]", help="size of every bucket")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    options = parse_cfg_options(args.cfg_options)
    options["dataset.data_path"] = args.data_path
    cfg = load_config(args.config, options)
    save_dir = args.save_dir or cfg.get("save_dir")
    if not save_dir:
        parser.error("no --save-dir and no save_dir in the config")
    size = None
    if args.image_size:
        size = args.image_size * 2 if len(args.image_size) == 1 else args.image_size[:2]
    setup_logging(int(os.environ.get("RANK", 0)))
    try:
        encode_dataset(cfg, args.ckpt_path, save_dir, num_frames=args.num_frames, image_size=size)
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
