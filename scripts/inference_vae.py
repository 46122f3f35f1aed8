"""Reconstruct a CSV of videos with any video VAE: writes SAVE_DIR_ori, SAVE_DIR_rec (the model's reconstruction)
and, for a model with a spatial-only path (the Open-Sora pipeline), SAVE_DIR_spatial (its 2D VAE alone).

torchrun --standalone --nproc_per_node=1 scripts/inference_vae.py configs/vae/inference/video.py \
    --ckpt-path CKPT --data-path CSV --save-dir DIR
CKPT: an Open-Sora checkpoint (folder, file, trainer checkpoint, hub id) or a spec string such as
diffusers:AutoencoderKLWan=Wan-AI/Wan2.1-T2V-1.3B-Diffusers,subfolder=vae (docs/inference.md#any-video-vae).
"""
import argparse
import sys

from opensora_vae.cli import ArgumentParser, add_clip_arguments, add_job_arguments, clip_options, job_config
from opensora_vae.distributed import close_distributed
from opensora_vae.errors import run_main
from opensora_vae.signals import EXIT_PREEMPTED
from opensora_vae.inference import reconstruct_dataset
from opensora_vae.train.logging import setup_logging


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser, "inference")
    add_clip_arguments(parser, "output prefix: DIR_ori, DIR_rec, DIR_spatial (a spatial-only path) (sets save_dir)")
    parser.add_argument("--fps", type=float, help="fps of the written videos (sets fps; default: the source's)")
    parser.add_argument("--crf", type=int, help="H.264 quality of the written videos (sets crf)")
    parser.add_argument("--num-samples", type=int, help="reconstruct only the first N rows of the CSV")
    parser.add_argument("--sample-posterior", action=argparse.BooleanOptionalAction, default=None,
                        help="sample the posteriors (the published protocol) instead of taking their means")
    parser.add_argument("--cal-stats", action="store_true", default=None,
                        help="also write per-channel latent mean/std JSON")
    parser.add_argument("--stats-path", help="where --cal-stats writes (default: DIR_latent_stats.json)")
    parser.add_argument("--overwrite", action="store_true", help="redo clips whose outputs already exist")
    args = parser.parse_args(argv)
    options = clip_options(args)
    options.update({key: getattr(args, key) for key in ("fps", "crf", "num_samples", "sample_posterior", "cal_stats")
                    if getattr(args, key) is not None})
    cfg = job_config(args, "inference", options)
    setup_logging(0)
    try:
        report = reconstruct_dataset(cfg, overwrite=args.overwrite, stats_path=args.stats_path)
    finally:
        close_distributed()
    return EXIT_PREEMPTED if report.preempted else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
