"""SSIM / PSNR / LPIPS / FloLPIPS / rFVD / temporal scores between folders of real and generated videos.

Flags follow Open-Sora's eval/vae/eval_common_metric.py; the logic lives in opensora_vae.metrics.evaluate.
Example:
  python eval/vae/eval_common_metric.py --real_video_dir A --generated_video_dir B --device cuda \
      --batch_size 2 --sample_fps 24 --crop_size 256 --resolution 256 --num_frames 17 --sample_rate 1 \
      --metric ssim psnr lpips flolpips --output results.json
Metrics whose weights are missing are reported as unavailable; `--device cuda` without CUDA is an error.
Under torchrun (`torchrun --nproc_per_node=N eval/vae/eval_common_metric.py ...`) the ranks split the batches and
rank 0 reports: the same scores as one rank.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from opensora_vae.cli import ArgumentParser, HelpFormatter, add_weight_arguments, ranged
from opensora_vae.schema import NonNegativeInt, PositiveFloat, PositiveInt
from opensora_vae.distributed import close_distributed, init_distributed
from opensora_vae.errors import UserError, run_main
from opensora_vae.jobs import check_output_folder
from opensora_vae.metrics.evaluate import METRICS, evaluate, format_table


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)

    def flag(name: str, **kwargs):
        # The reference's snake_case spelling, and the kebab-case one the other scripts use.
        spellings = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])
        p.add_argument(*spellings, dest=name, **kwargs)

    flag("real_video_dir", required=True, help="the originals")
    flag("generated_video_dir", required=True, help="the reconstructions, paired with the originals by file name")
    flag("batch_size", type=ranged(PositiveInt), default=2, help="videos per batch")
    flag("device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    flag("num_workers", type=ranged(NonNegativeInt), default=0, help="threads decoding videos")
    flag("sample_fps", type=ranged(PositiveFloat), default=None,
         help="recorded only; frames are not resampled in time")
    flag("resolution", type=ranged(NonNegativeInt), default=256, help="short side after resizing (0: keep)")
    flag("crop_size", type=ranged(NonNegativeInt), default=256, help="centre crop size (0: no crop)")
    flag("num_frames", type=ranged(PositiveInt), default=17, help="frames scored per clip")
    flag("sample_rate", type=ranged(PositiveInt), default=1, help="the frames spread over num_frames x sample_rate")
    flag("subset_size", type=ranged(PositiveInt), default=None, help="evaluate only the first N pairs (by name)")
    flag("metric", nargs="+", default=list(METRICS), choices=METRICS,
         help="fvd: rFVD over the set (I3D weights); temporal: seam dip/jump at chunk boundaries and temporal "
              "consistency (no weights)")
    flag("chunk_frames", type=ranged(NonNegativeInt), default=17,
         help="frames per micro-chunk for the seam scores (0: none)")
    flag("output", type=Path, default=None, help="write a JSON report here")
    add_weight_arguments(p)
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    return p


def main(argv=None) -> int:
    """The exit code: 0, or 2 after printing a user error's one line."""
    return run_main(_main, argv)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.output is not None:
        check_output_folder(args.output.parent, "--output")
    device = args.device
    if "RANK" in os.environ:  # torchrun: each rank on its own device, batches split between them
        device = init_distributed(args.device or "auto").device
    try:
        result = evaluate(
            args.real_video_dir, args.generated_video_dir, args.metric,
            batch_size=args.batch_size, num_frames=args.num_frames, sample_rate=args.sample_rate,
            sample_fps=args.sample_fps, resolution=args.resolution or None, crop_size=args.crop_size or None,
            subset_size=args.subset_size, device=device, lpips_net=args.lpips_net,
            lpips_backbone=args.lpips_backbone, flolpips_backbone=args.flolpips_backbone,
            pwcnet_weights=args.pwcnet_weights, num_workers=args.num_workers, chunk_frames=args.chunk_frames,
            i3d_weights=args.i3d_weights,
        )
    except (RuntimeError, ValueError, FileNotFoundError) as e:  # what the metrics refuse: missing weights, ...
        raise UserError(str(e)) from e
    finally:
        close_distributed()
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    print(format_table(result))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
