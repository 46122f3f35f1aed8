"""Command-line pieces shared by scripts/inference_vae.py and scripts/encode_latents.py (one spelling of each flag)."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence, Tuple

from .config import load_config, parse_cfg_options
from .registry import RUNTIME_OPTIONS


def add_model_run_arguments(parser: argparse.ArgumentParser, save_help: str) -> None:
    """Config, checkpoint, CSV, output, clip size and the model's runtime options (compile, winograd, tiling)."""
    parser.add_argument("config", help="a Python config, e.g. configs/vae/inference/video.py")
    parser.add_argument("--ckpt-path", help="published folder or hub id, model.safetensors, or trainer checkpoint")
    parser.add_argument("--data-path", required=True, help="CSV with a 'path' column ('text', 'fps' used if present)")
    parser.add_argument("--save-dir", help=save_help)
    parser.add_argument("--num-frames", type=int, help="frames per clip (overrides the config)")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="H [W]", help="clip size (overrides the config)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (cached on disk per machine)")
    parser.add_argument("--winograd", action="store_true",
                        help="fp32 CPU: spatial VAE and temporal decoder convolutions through Winograd F(4x4,3x3) "
                             "(about 1.25x; +3-3.6 GiB)")
    parser.add_argument("--tiling", action="store_true", help="tile H/W through both VAEs (bounded memory)")
    parser.add_argument("--tile-size", type=int, help="tile side in pixels (implies --tiling; default 512)")
    parser.add_argument("--tile-overlap", type=int, help="pixels shared by neighbouring tiles (implies --tiling)")
    parser.add_argument("--tile-mid-block", action="store_true", default=None,
                        help="decoder mid-block per tile too, exact attention (implies --tiling; slower)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")


def image_size(values: Optional[Sequence[int]]) -> Optional[Tuple[int, int]]:
    """--image-size H [W] -> (H, W); one value means a square."""
    if not values:
        return None
    return tuple(values * 2 if len(values) == 1 else values[:2])


def load_run_config(args: argparse.Namespace, options: Optional[dict] = None):
    """The config with --cfg-options, the CSV, `options` and the runtime flags applied (flags refine the config's
    `tiling` dict)."""
    merged = parse_cfg_options(args.cfg_options)
    merged["dataset.data_path"] = args.data_path
    merged.update(options or {})
    for name in RUNTIME_OPTIONS:  # the opt-in ones have a --flag
        if getattr(args, name, None):
            merged[name] = True
    cfg = load_config(args.config, merged)
    tiling = {k: v for k, v in (("tile_size", args.tile_size), ("overlap", args.tile_overlap),
                                ("tile_mid_block", args.tile_mid_block)) if v is not None}
    if args.tiling or tiling:
        cfg.tiling = dict(cfg.get("tiling") or {}, **tiling)
    return cfg
