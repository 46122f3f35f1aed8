"""Reconstruct a CSV of videos: writes SAVE_DIR_ori, SAVE_DIR_rec (full pipeline) and SAVE_DIR_spatial (2D VAE).

torchrun --standalone --nproc_per_node=1 scripts/inference_vae.py configs/vae/inference/video.py \
    --ckpt-path CKPT --data-path CSV --save-dir DIR
"""
import argparse

from opensora_vae.config import load_config, parse_cfg_options
from opensora_vae.inference import reconstruct_dataset
from opensora_vae.distributed import close_distributed
from opensora_vae.train.logging import setup_logging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="e.g. configs/vae/inference/video.py")
    parser.add_argument("--ckpt-path", help="published folder or hub id, model.safetensors, or trainer checkpoint")
    parser.add_argument("--data-path", required=True, help="CSV with a 'path' column")
    parser.add_argument("--save-dir", help="output prefix: DIR_ori, DIR_rec, DIR_spatial (default: config save_dir)")
    parser.add_argument("--num-frames", type=int, help="frames per clip (overrides the config)")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="H [W]", help="output size (overrides)")
    parser.add_argument("--fps", type=float, help="fps of the written videos (default: the config's, else the source's)")
    parser.add_argument("--crf", type=int, help="H.264 quality of the written videos (config default 18; x264's own 23)")
    parser.add_argument("--num-samples", type=int, help="reconstruct only the first N rows of the CSV")
    parser.add_argument("--sample-posterior", action=argparse.BooleanOptionalAction, default=None,
                        help="sample the posteriors (the published protocol) instead of taking their means")
    parser.add_argument("--cal-stats", action="store_true", help="also write per-channel latent mean/std JSON")
    parser.add_argument("--stats-path", help="where --cal-stats writes (default: DIR_latent_stats.json)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (cached on disk per machine)")
    parser.add_argument("--overwrite", action="store_true", help="redo clips whose outputs already exist")
    parser.add_argument("--tiling", action="store_true", help="tile H/W through both VAEs (bounded memory)")
    parser.add_argument("--tile-size", type=int, help="tile side in pixels (implies --tiling; default 512)")
    parser.add_argument("--tile-overlap", type=int, help="pixels shared by neighbouring tiles (implies --tiling)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    options = parse_cfg_options(args.cfg_options)
    options["dataset.data_path"] = args.data_path
    if args.num_frames:
        options["dataset.num_frames"] = args.num_frames
    if args.image_size:
        size = args.image_size * 2 if len(args.image_size) == 1 else args.image_size[:2]
        options["dataset.image_size"] = tuple(size)
    if args.fps:
        options["fps"] = args.fps
    if args.crf is not None:
        options["crf"] = args.crf
    if args.num_samples is not None:
        options["num_samples"] = args.num_samples
    if args.sample_posterior is not None:
        options["sample_posterior"] = args.sample_posterior
    if args.compile:
        options["compile"] = True
    cfg = load_config(args.config, options)
    tiling = {k: v for k, v in (("tile_size", args.tile_size), ("overlap", args.tile_overlap)) if v is not None}
    if args.tiling or tiling:  # flags refine the config's tiling dict
        cfg.tiling = dict(cfg.get("tiling") or {}, **tiling)
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
