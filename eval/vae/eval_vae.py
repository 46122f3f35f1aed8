"""Reconstruct a protocol's clips with one or more VAEs and score them in one run (one JSON for all).

  python eval/vae/eval_vae.py --protocol configs/eval/mcl_jcv_17x256.json --data-root MCL-JCV/ \
      --vae opensora:hpcai-tech/OpenSora-VAE-v1.2 \
      --vae diffusers:AutoencoderKLCogVideoX=THUDM/CogVideoX-2b,subfolder=vae \
      --vae diffusers:AutoencoderKLWan=Wan-AI/Wan2.1-T2V-1.3B-Diffusers,subfolder=vae \
      --device cuda --output scores.json

The protocol file fixes the clips, frames, size, dtype and rounding (schema: opensora_vae/protocol.py);
--vae specs (syntax: opensora_vae/models/build.py, as --ckpt-path): opensora:PATH_OR_ID[,key=value...] or
diffusers:CLASS=PATH_OR_ID[,subfolder=vae][,frames=8k+1][,name=LABEL]... Each VAE is fed the length its design
needs (last frame repeated) and cropped back. Exit code 1 when a VAE failed (its error is in the JSON).
Under torchrun the ranks split the clips (each on its own GPU) and rank 0 reports the scores one rank would give.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from opensora_vae.cli import ArgumentParser, add_weight_arguments
from opensora_vae.distributed import close_distributed, init_distributed
from opensora_vae.errors import run_main
from opensora_vae.jobs import check_output_folder
from opensora_vae.protocol import evaluate_protocol, format_report, load_protocol


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--protocol", type=Path, required=True, help="protocol JSON (configs/eval/*.json)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder the clip paths are relative to (default: the clip CSV's folder)")
    p.add_argument("--clips-csv", type=Path, default=None,
                   help="CSV with a 'path' column, for protocols that list no clips (DAVIS, WebVid-val)")
    p.add_argument("--vae", action="append", required=True, metavar="SPEC", help="a VAE to score (repeatable)")
    p.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    add_weight_arguments(p)
    p.add_argument("--no-clip-hashes", action="store_true",
                   help="skip the sha256 of each clip file (saves one full read of every file)")
    p.add_argument("--random-weights", action="store_true",
                   help="LPIPS / FloLPIPS / I3D with random weights: meaningless values, for tests only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    return p


def main(argv=None) -> int:
    """The exit code: 0; 1 when a VAE failed; 2 after printing a usage error's one line."""
    return run_main(_main, argv)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    protocol = load_protocol(args.protocol)  # a bad protocol is refused before anything loads
    if args.output is not None:
        check_output_folder(args.output.parent, "--output")
    device = args.device
    if "RANK" in os.environ:  # torchrun: each rank on its own device scores every N-th clip; rank 0 reports
        device = init_distributed(args.device or "auto").device
    try:
        result = evaluate_protocol(
            protocol, args.vae, args.data_root, clips_csv=args.clips_csv, device=device,
            lpips_net=args.lpips_net, lpips_backbone=args.lpips_backbone, flolpips_backbone=args.flolpips_backbone,
            pwcnet_weights=args.pwcnet_weights, i3d_weights=args.i3d_weights, random_weights=args.random_weights,
            hash_clips=not args.no_clip_hashes, progress=not args.no_progress,
        )
    finally:
        close_distributed()
    failed = any("error" in v for v in result["vaes"].values())
    if int(os.environ.get("RANK", 0)) != 0:
        return 1 if failed else 0
    print(format_report(result))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
