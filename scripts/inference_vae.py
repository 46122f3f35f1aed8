"""Reconstruct a CSV of videos: writes SAVE_DIR_ori, SAVE_DIR_rec (full pipeline) and SAVE_DIR_spatial (2D VAE).

torchrun --standalone --nproc_per_node=1 scripts/inference_vae.py configs/vae/inference/video.py \
    --ckpt-path CKPT --data-path CSV --save-dir DIR
"""
import argparse

from opensora_vae.cli import add_model_run_arguments, image_size, load_run_config
from opensora_vae.distributed import close_distributed
from opensora_vae.inference import reconstruct_dataset
from opensora_vae.train.logging import setup_logging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_run_arguments(parser, "output prefix: DIR_ori, DIR_rec, DIR_spatial (default: config save_dir)")
    parser.add_argument("--fps", type=float, help="fps of the written videos (default: the config's, else the source's)")
    parser.add_argument("--crf", type=int, help="H.264 quality of the written videos (config default 18; x264's own 23)")
    parser.add_argument("--num-samples", type=int, help="reconstruct only the first N rows of the CSV")
    parser.add_argument("--sample-posterior", action=argparse.BooleanOptionalAction, default=None,
                        help="sample the posteriors (the published protocol) instead of taking their means")
    parser.add_argument("--cal-stats", action="store_true", help="also write per-channel latent mean/std JSON")
    parser.add_argument("--stats-path", help="where --cal-stats writes (default: DIR_latent_stats.json)")
    parser.add_argument("--overwrite", action="store_true", help="redo clips whose outputs already exist")
    args = parser.parse_args(argv)

    options = {}
    if args.num_frames:
        options["dataset.num_frames"] = args.num_frames
    if args.image_size:
        options["dataset.image_size"] = image_size(args.image_size)
    if args.fps:
        options["fps"] = args.fps
    for key in ("crf", "num_samples", "sample_posterior"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    cfg = load_run_config(args, options)
    save_dir = args.save_dir or cfg.get("save_dir")
    if not save_dir:
        parser.error("no --save-dir and no save_dir in the config")
    setup_logging(0)
    try:
        reconstruct_dataset(cfg, args.ckpt_path, save_dir, overwrite=args.overwrite,
                            cal_stats=args.cal_stats or cfg.get("cal_stats", False), stats_path=args.stats_path)
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
