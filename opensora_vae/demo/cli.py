"""`make demo`: show on a laptop's CPU that the three-stage recipe learns.

python -m opensora_vae.demo [--out demo_outputs] [--force] [--pretrained ID_OR_DIR] [--steps S0,S1,S2,S3]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ..cli import ArgumentParser
from ..errors import run_main
from .data import build_cache, write_csv
from .report import write_report
from .stages import (CONFIGS, DESCRIPTIONS, SPLITS, STAGES, TRAIN_STAGES, Settings, StageFailed, StageRunner,
                     default_settings, say)


def metric_table(scores: dict) -> dict:
    """{stage: {split: {"ssim", "psnr"}}} of the full pipeline (stage 0: of the spatial VAE alone, the only part
    it trains), from the per-stage scores."""
    table = {}
    for stage, by_split in scores.items():
        kind = "spatial" if stage == "stage0" else "rec"
        table[stage] = {split: {m: by_split[split][kind]["metrics"][m]["mean"] for m in ("ssim", "psnr")}
                        for split in SPLITS if split in by_split}
    return table


def run(out: Path, settings: Settings, force: bool = False, pretrained: str | None = None,
        pretrained_size: int = 256) -> dict:
    out = out.resolve()  # training runs in the repository root
    out.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    say(f"caching the clips and photos at {settings.image_size} px ...")
    data = build_cache(out / "cache", settings.image_size, seed=0)
    cache_seconds = time.perf_counter() - tick
    runner = StageRunner(out, data, settings, force=force)
    records, scores, previous, pending = {}, {}, None, None

    def score(stage: str) -> None:
        scores[stage] = runner.scores(stage, runner.checkpoint(records[stage]))
        held = scores[stage]["heldout"]
        kind = "spatial" if stage == "stage0" else "rec"
        say(f"{stage}: held-out {'spatial VAE' if kind == 'spatial' else 'full pipeline'} PSNR "
            f"{held[kind]['metrics']['psnr']['mean']:.2f} dB, SSIM {held[kind]['metrics']['ssim']['mean']:.3f}"
            f" ({records[stage]['seconds']:.0f} s)")

    try:
        for i, stage in enumerate(STAGES):
            steps = f", {settings.steps[stage]} steps x {settings.nproc} rank(s)" if stage in TRAIN_STAGES else ""
            say(f"[{i + 1}/{len(STAGES)}] {DESCRIPTIONS[stage]}{steps}")
            finish = runner.start(stage, previous)
            if pending is not None:
                score(pending)  # the previous stage, while this one's torchrun starts up (its imports take seconds)
            records[stage] = finish()
            previous, pending = runner.checkpoint(records[stage]), stage
        score(pending)
    finally:
        runner.stop()  # scoring failed while the next stage trained: stop its launch
    table = metric_table(scores)
    published = None
    if pretrained:
        say(f"published weights {pretrained}: reconstructing the original clips at {pretrained_size} px ...")
        published = score_pretrained(out, runner, data, pretrained, pretrained_size, settings.num_frames)
        table["pretrained"] = {split: {m: published[split]["rec"]["metrics"][m]["mean"] for m in ("ssim", "psnr")}
                               for split in SPLITS}
    (out / "metrics.json").write_text(json.dumps(table, indent=2))
    write_report(out, data, settings, records, scores, published, pretrained, pretrained_size, cache_seconds)
    say(f"done: {out / 'report.html'} (metrics.json, report.md, loss.png, frames.png)")
    return table


def score_pretrained(out: Path, runner: StageRunner, data, pretrained: str, size: int, num_frames: int) -> dict:
    """Reconstruct the original clips (not the cache) at `size` with the published weights, and score them."""
    folder = out / "stages" / "pretrained"
    folder.mkdir(parents=True, exist_ok=True)
    result = {}
    for split in SPLITS:
        names = [n for n, v in data.summary["videos"].items() if v["split"] == split]
        csv = write_csv(folder / f"{split}.csv", [data.sources[n] for n in names])
        result[split] = runner.reconstruct_and_score(
            "pretrained", out / "recon" / "pretrained" / split, csv, CONFIGS.parent / "inference" / "video.py",
            pretrained, size, num_frames, options=["num_workers=0"])
    return result


def parse_steps(text: str, parser: argparse.ArgumentParser) -> dict:
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        steps = []
    if len(steps) != len(TRAIN_STAGES) or min(steps) < 1:
        parser.error(f"--steps takes {len(TRAIN_STAGES)} positive integers (stages 0-3), got {text!r}")
    return dict(zip(TRAIN_STAGES, steps))


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_outputs", help="output folder (default: demo_outputs)")
    parser.add_argument("--force", action="store_true", help="redo every stage (finished stages are skipped)")
    parser.add_argument("--pretrained", metavar="ID_OR_DIR",
                        help="also reconstruct and score the clips with these published weights (hub id or folder)")
    parser.add_argument("--pretrained-size", type=int, default=256, help="frame size for --pretrained")
    parser.add_argument("--steps", help="training steps of stages 0,1,2,3 (default: configs/vae/demo/stage*.py)")
    parser.add_argument("--image-size", type=int, help="frame size (default: configs/vae/demo/common.py)")
    parser.add_argument("--nproc", type=int, default=2, help="training ranks per stage (default: 2)")
    parser.add_argument("--launcher", choices=("torchrun", "inprocess"), default="torchrun",
                        help="inprocess: train in this process, one rank (tests, debugging)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = default_settings(nproc=1 if args.launcher == "inprocess" else args.nproc)
    settings.launcher = args.launcher
    if args.steps:
        settings.steps = parse_steps(args.steps, parser)
    if args.image_size:
        settings.image_size = args.image_size
    out = Path(args.out)
    try:
        run(out, settings, force=args.force, pretrained=args.pretrained, pretrained_size=args.pretrained_size)
    except StageFailed as err:
        say(f"FAILED: {err}")
        say(f"finished stages are kept in {out / 'stages'}; run the same command again to continue from there")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
