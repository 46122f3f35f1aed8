"""What the command-line scripts share: one spelling of each flag, flags -> config keys, one-line usage errors."""
from __future__ import annotations

import argparse
import typing
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from mmengine.config import Config

from .config import JOB_EXAMPLES, check_config, fits, load_config, parse_cfg_options, type_name
from .errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors raised as one-line UserErrors (exit code 2, no usage dump)."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's range (from `ranged`) and its default once: not where the help already states it,
    nor None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if getattr(action.type, "expected", None):
            text += f" [{action.type.expected}]"
        if "(default" not in text and action.default not in (None, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


def ranged(tp: Any) -> Callable[[str], Any]:
    """An argparse `type` for a declared type with its range (config.PositiveInt, ...): a flag outside it is a
    usage error naming the flag, the value and what it takes."""
    base = typing.get_args(tp)[0]

    def parse(text: str) -> Any:
        try:
            value = base(text)
        except ValueError:
            value = None
        if value is None or not fits(value, tp):
            raise argparse.ArgumentTypeError(f"expected {type_name(tp)}, got {text!r}")
        return value

    parse.expected = type_name(tp)
    return parse


def add_job_arguments(parser: argparse.ArgumentParser, job: str) -> None:
    """Config, data, weights, --cfg-options, --debug and the model's runtime options: the same flags in every
    script, each setting one config key. `job` ("train", "inference", "encode") picks the example config."""
    parser.add_argument("config", help=f"a Python config, e.g. {JOB_EXAMPLES[job]}")
    parser.add_argument("--data-path", help="CSV with a 'path' column (sets dataset.data_path)")
    parser.add_argument("--ckpt-path", help="weights: published folder or hub id, model.safetensors, or trainer "
                                            "checkpoint (sets model.from_pretrained)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config entries, dotted keys: lr=2e-5 model.micro_frame_size=17")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (sets device; default auto: CUDA when available)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    runtime = parser.add_argument_group("runtime options (model.<name>; docs/speed.md)")
    for name, what in (("compile", "torch.compile the VAEs' encoders and decoders"),
                       ("winograd", "fp32 CPU inference: 3x3 convolutions through Winograd F(4x4,3x3)"),
                       ("subpixel", "the spatial decoder's upsamplers as folded 2x2 convolutions (default on)"),
                       ("tiling", "tile H/W through both VAEs (bounded memory)")):
        runtime.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=what)
    runtime.add_argument("--tile-size", type=int, help="largest tile side in each layer's pixels (implies --tiling; "
                                                       "default 512)")
    runtime.add_argument("--tile-overlap", type=int, help="the low-memory path's pixels shared by neighbouring tiles "
                                                          "(implies --tiling)")
    runtime.add_argument("--tile-max-memory", help="memory a tiled VAE call may hold beyond its input and output, "
                                                   "e.g. 8GiB, or auto (90%% of the device's free memory): plans "
                                                   "where segment outputs live and the tile size (implies --tiling)")
    runtime.add_argument("--tile-parallel", action="store_true", default=None,
                         help="under torchrun, split each frame's tiles across the ranks (every rank takes every "
                              "clip, rank 0 writes; implies --tiling)")
    runtime.add_argument("--tile-mid-block", action="store_true", default=None,
                         help="the low-memory path, decoder mid-block per tile too (implies --tiling)")
    runtime.add_argument("--micro-batch-size", type=int, help="frames per spatial VAE call (model.micro_batch_size)")


def flag_options(args: argparse.Namespace) -> Dict[str, object]:
    """The dotted config keys the shared flags set (merged over the config's own values)."""
    options = parse_cfg_options(args.cfg_options)
    if args.data_path:
        options["dataset.data_path"] = args.data_path
    if args.ckpt_path:
        options["model.from_pretrained"] = args.ckpt_path
    if args.device:
        options["device"] = args.device
    for name in ("compile", "winograd", "subpixel"):
        if getattr(args, name) is not None:
            options[f"model.{name}"] = getattr(args, name)
    if args.micro_batch_size is not None:
        options["model.micro_batch_size"] = args.micro_batch_size
    if args.tiling is False:
        options["model.tiling"] = False
    return options


def job_config(args: argparse.Namespace, job: str, options: Optional[Dict[str, object]] = None) -> Config:
    """The checked config of `job` with --cfg-options, the shared flags and the script's own `options` applied;
    the tile flags refine a config's tiling dict."""
    merged = flag_options(args)
    merged.update(options or {})
    cfg = load_config(args.config, merged)
    tile = {k: v for k, v in (("tile_size", args.tile_size), ("overlap", args.tile_overlap),
                              ("max_memory", args.tile_max_memory), ("parallel", args.tile_parallel),
                              ("tile_mid_block", args.tile_mid_block))
            if v is not None}
    if args.tiling is not False and (args.tiling or tile):
        current = cfg.model.get("tiling")
        cfg.model.tiling = dict(current if isinstance(current, dict) else {}, **tile)
    return check_config(cfg, job)


def add_clip_arguments(parser: argparse.ArgumentParser, save_help: str) -> None:
    """Output folder and clip size of the inference and encoding scripts."""
    parser.add_argument("--save-dir", help=save_help)
    parser.add_argument("--num-frames", type=int, help="frames per clip (sets dataset.num_frames)")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="H [W]",
                        help="clip size (sets dataset.image_size; one value: a square)")


def image_size(values: Optional[Sequence[int]]) -> Optional[Tuple[int, int]]:
    """--image-size H [W] -> (H, W); one value means a square."""
    if not values:
        return None
    if len(values) > 2:
        raise UserError(f"--image-size takes H or H W, got {len(values)} values")
    return tuple(values * 2 if len(values) == 1 else values)


def clip_options(args: argparse.Namespace) -> Dict[str, object]:
    options: Dict[str, object] = {}
    if args.save_dir:
        options["save_dir"] = args.save_dir
    if args.num_frames is not None:  # 0 too: the config check refuses it, naming the key
        options["dataset.num_frames"] = args.num_frames
    if args.image_size:
        options["dataset.image_size"] = image_size(args.image_size)
    return options


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation scripts' metric-weight flags, in the reference's snake_case and in kebab-case."""
    def flag(name: str, **kwargs):
        parser.add_argument(*dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]), dest=name, **kwargs)

    flag("lpips_net", default="alex", choices=["alex", "vgg"], help="LPIPS backbone")
    flag("lpips_backbone", default=None, help="torchvision backbone state dict for LPIPS (default: the torch cache)")
    flag("flolpips_backbone", default=None,
         help="AlexNet backbone for FloLPIPS (default: --lpips-backbone when --lpips-net alex, else the torch cache)")
    flag("pwcnet_weights", default=None, help="PWC-Net network-default.pytorch")
    flag("i3d_weights", default=None, help="rFVD: cd-fvd's i3d_pretrained_400.pt (default: the torch hub cache)")
