"""The demo's report: report.html and report.md (metrics table, timings, loss curves, frame grid)."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..data import read_video
from .data import HELD_OUT
from .stages import SPLITS, STAGES, TRAIN_STAGES

# Loss terms plotted per stage (the ones that stage optimises; l1 is the mean absolute pixel error in [-1, 1]).
CURVES = {"stage0": ("l1",), "stage1": ("z_rec_nll", "identity_nll"), "stage2": ("z_rec_nll",),
          "stage3": ("l1",)}
GRID_COLUMNS = 6
GRID_SCALE = 2  # pixels per cached pixel in frames.png
MAX_WIDTH = 1280


def short_reason(reason: str) -> str:
    """One line for the table: the missing weight files, else the reason's first line."""
    files = list(dict.fromkeys(re.findall(r"'([^'/]+\.(?:pth|pytorch|pt|bin|safetensors))'", reason)))
    if files:
        return f"weights not found: {', '.join(files)}"
    first = reason.strip().splitlines()[0] if reason.strip() else "unavailable"
    return first if len(first) <= 100 else first[:97] + "..."


def instructions(notes: Dict[str, str]) -> str:
    """The full reasons of every unavailable metric, once: FloLPIPS's repeats LPIPS's AlexNet part."""
    return "\n".join(dict.fromkeys(line for reason in notes.values() for line in reason.splitlines()))


def _curves_png(out: Path, records: Dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in TRAIN_STAGES if s in records]
    fig, axes = plt.subplots(1, len(stages), figsize=(3 * len(stages), 2.9), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        run = (out / records[stage]["checkpoint"]).parent.parent
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        for key in CURVES[stage]:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if not pts:
                continue
            steps, values = zip(*pts)
            line, = ax.plot(steps, values, lw=0.6, alpha=0.35)
            k = max(1, len(values) // 15)  # moving average: single steps vary with the clip and its length
            smooth = torch.tensor(values).unfold(0, k, 1).mean(1).tolist() if len(values) >= k else list(values)
            ax.plot(steps[k - 1:], smooth, lw=1.6, color=line.get_color(), label=key)
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)  # 3 in per stage: 1200 px for four stages
    plt.close(fig)


def _frame_grid(rows: List[tuple], path: Path) -> None:
    """rows: (label, video path); evenly spaced frames side by side, one row per video, labels on the left."""
    from PIL import Image, ImageDraw, ImageFont

    strips = []
    for _, video in rows:
        frames, _ = read_video(video)
        pick = torch.linspace(0, frames.shape[0] - 1, GRID_COLUMNS).round().long()
        strips.append(torch.cat(list(frames[pick]), dim=2).permute(1, 2, 0).numpy())  # (H, W * columns, 3)
    h, w = strips[0].shape[:2]
    label_w, gap = 170, 4
    scale = max(1, min(GRID_SCALE, (MAX_WIDTH - label_w) // w))
    canvas = Image.new("RGB", (label_w + w * scale, len(rows) * (h * scale + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    for i, ((label, _), strip) in enumerate(zip(rows, strips)):
        top = i * (h * scale + gap)
        canvas.paste(Image.fromarray(strip).resize((w * scale, h * scale), Image.NEAREST), (label_w, top))
        draw.multiline_text((8, top + h * scale // 2 - 18), label, fill="black", font=font)
    canvas.save(path)


def _fmt(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _metric_cells(result: dict, name: str, notes: Dict[str, str]) -> str:
    m = result["metrics"].get(name)
    if m is None:
        return "-"
    if m["available"]:
        return _fmt(m["mean"], 2 if name == "psnr" else 3)
    notes[name] = m["reason"]
    return "unavailable"


def _table(scores: Dict[str, dict], published: Optional[dict], notes: Dict[str, str]) -> tuple:
    """(header, rows) of the metrics table: stages as rows; per split PSNR, SSIM, LPIPS, FloLPIPS of the full
    pipeline (stage 0: the spatial VAE alone), and the spatial VAE alone's held-out PSNR."""
    metrics = [("psnr", "PSNR dB"), ("ssim", "SSIM"), ("lpips", "LPIPS"), ("flolpips", "FloLPIPS")]
    header = (["stage"] + [f"{split} {label}" for split in SPLITS for _, label in metrics]
              + ["held-out PSNR dB, spatial VAE alone"])
    rows = []
    entries = [(s, scores[s]) for s in STAGES if s in scores]
    if published is not None:
        entries.append(("pretrained", published))
    for stage, by_split in entries:
        kind = "spatial" if stage == "stage0" else "rec"
        cells = [stage]
        for split in SPLITS:
            cells += [_metric_cells(by_split[split][kind], m, notes) for m, _ in metrics]
        cells.append(_fmt(by_split["heldout"]["spatial"]["metrics"]["psnr"]["mean"], 2))
        rows.append(cells)
    return header, rows


def write_report(out: Path, data, settings, records: Dict[str, dict], scores: Dict[str, dict],
                 published: Optional[dict], pretrained: Optional[str], pretrained_size: int,
                 cache_seconds: float) -> None:
    _curves_png(out, records, out / "loss.png")
    recon = out / "recon"
    # Stage 0's spatial VAE too: the demo's stand-in for the pretrained SDXL VAE, before stage 3 retunes it.
    grid_rows = [("original", recon / "stage3" / "heldout_ori"),
                 ("spatial VAE only\n(after stage 0)", recon / "stage0" / "heldout_spatial"),
                 ("spatial VAE only\n(after stage 3)", recon / "stage3" / "heldout_spatial"),
                 ("full pipeline\n(after stage 3)", recon / "stage3" / "heldout_rec"),
                 ("full pipeline\n(random start)", recon / "init" / "heldout_rec")]
    _frame_grid([(label, folder / f"{HELD_OUT}.mp4") for label, folder in grid_rows], out / "frames.png")

    notes: Dict[str, str] = {}
    header, rows = _table(scores, published, notes)
    videos = data.summary["videos"]
    train_clips = [n for n, v in videos.items() if v["split"] == "train"]
    size = settings.image_size
    intro = (
        f"This demo trains a <b>tiny</b> Open-Sora 1.2 VAE for a few minutes on the CPU: a spatial VAE that "
        f"compresses {size}x{size} frames 4x per side (16-32-64 channels) and a small causal temporal VAE "
        f"(4x in time). It is not the published VAE: it shows that the three-stage recipe learns. Stage 0 is the "
        f"demo's own: it fits the spatial VAE, standing in for the pretrained SDXL VAE that the real recipe starts "
        f"from; stages 1-3 are the published stages, each launched with torchrun ({settings.nproc} gloo rank(s)) "
        f"from the previous stage's checkpoint."
    )
    data_text = (
        f"Training: the clips {', '.join(train_clips)} and {len(data.summary['photos'])} views and crops of "
        f"scikit-image's colour photographs, cached once at {size} px. Held out: <b>{HELD_OUT}</b> (its "
        f"distorted twin is in neither split). Scores: {settings.num_frames} frames at {size}x{size}, "
        f"reconstruction vs the cached input."
    )
    timing_header = ["stage", "steps", "ranks", "seconds", "s / step"]
    timing_rows = [["data cache", "-", "-", f"{cache_seconds:.1f}", "-"]]
    for stage in STAGES:
        r = records.get(stage)
        if r:
            timing_rows.append([stage, str(r["steps"]), str(r["ranks"] or "-"), f"{r['seconds']:.1f}",
                                _fmt(r["sec_per_step"], 3)])
    total = cache_seconds + sum(r["seconds"] for r in records.values())
    timing_rows.append(["total training", "", "", f"{total:.1f}", ""])
    short_notes = {name: short_reason(reason) for name, reason in notes.items()}

    _write_html(out, intro, data_text, header, rows, timing_header, timing_rows, notes, short_notes, pretrained,
                pretrained_size)
    _write_md(out, intro, data_text, header, rows, timing_header, timing_rows, notes, short_notes, pretrained,
              pretrained_size)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1240px;margin:1.5em auto;padding:0 1em;color:#222;
line-height:1.45}table{border-collapse:collapse;margin:.6em 0;font-size:14px}th,td{border:1px solid #ccc;
padding:3px 8px;text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto;display:block;margin:.5em 0}pre{white-space:pre-wrap;word-break:break-word;
background:#f7f7f7;padding:.6em;font-size:13px}.na{color:#999}"""


def _html_table(header: List[str], rows: List[List[str]], groups: Optional[List[tuple]] = None) -> str:
    """groups: (title, number of columns) spanning the header's columns, as a first header row."""
    def cell(c: str) -> str:
        return f"<td class='na'>{html.escape(c)}</td>" if c == "unavailable" else f"<td>{html.escape(c)}</td>"

    top = "".join(f"<th colspan='{n}'>{html.escape(t)}</th>" for t, n in groups) if groups else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table>{f'<tr>{top}</tr>' if top else ''}<tr>{head}</tr>{body}</table>"


def _write_html(out, intro, data_text, header, rows, timing_header, timing_rows, notes, short_notes, pretrained,
                pretrained_size) -> None:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>opensora-vae demo</title>",
             f"<style>{_CSS}</style></head><body>",
             "<h1>opensora-vae demo: the three-stage recipe, tiny, on a CPU</h1>",
             f"<p>{intro}</p><p>{data_text}</p>", "<h2>Reconstruction quality</h2>",
             "<p>Rows are the model after each stage (<code>stage0</code>: the spatial VAE alone, the part it trains;"
             " the others: the full pipeline, spatial then temporal VAE). Higher PSNR and SSIM are better.</p>",
             _html_table([h.split(" ", 1)[-1] if h.startswith(SPLITS) else h for h in header[:-1]]
                         + ["held-out PSNR dB"], rows,
                         [("", 1), ("train clips (full pipeline)", 4), ("held-out clip (full pipeline)", 4),
                          ("spatial VAE alone", 1)])]
    if pretrained:
        parts.append(f"<p><code>pretrained</code>: the published weights <code>{html.escape(pretrained)}</code> on "
                     f"the original clips at {pretrained_size}x{pretrained_size}.</p>")
    for name, line in short_notes.items():
        parts.append(f"<p class='na'>{html.escape(name)} unavailable: {html.escape(line)} (see below).</p>")
    parts += ["<h2>Held-out clip</h2>",
              f"<p>{html.escape(HELD_OUT)}, {GRID_COLUMNS} frames evenly spaced over the scored clip.</p>",
              "<img src='frames.png' alt='held-out frames: original, spatial VAE only, full pipeline'>",
              "<h2>Training losses</h2><img src='loss.png' alt='loss curves per stage'>",
              "<h2>Time</h2>", _html_table(timing_header, timing_rows),
              "<p>Seconds of wall time per stage (start-up included) and the median seconds per training step.</p>"]
    if notes:
        parts += ["<h2>Enabling LPIPS and FloLPIPS</h2>", f"<pre>{html.escape(instructions(notes))}</pre>"]
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))


def _md_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _write_md(out, intro, data_text, header, rows, timing_header, timing_rows, notes, short_notes, pretrained,
              pretrained_size) -> None:
    def plain(text: str) -> str:
        return re.sub(r"</?b>", "**", text)

    parts = ["# opensora-vae demo: the three-stage recipe, tiny, on a CPU", "", plain(intro), "", plain(data_text),
             "", "## Reconstruction quality", "", _md_table(header, rows), ""]
    if pretrained:
        parts += [f"`pretrained`: the published weights `{pretrained}` on the original clips at "
                  f"{pretrained_size}x{pretrained_size}.", ""]
    parts += [f"{name} unavailable: {line} (see below)." for name, line in short_notes.items()]
    parts += ["", "## Held-out clip", "", f"![{HELD_OUT}: original, spatial VAE only, full pipeline](frames.png)", "",
              "## Training losses", "", "![loss curves per stage](loss.png)", "", "## Time", "",
              _md_table(timing_header, timing_rows), ""]
    if notes:
        parts += ["## Enabling LPIPS and FloLPIPS", ""]
        parts += ["```\n" + instructions(notes) + "\n```"]
    (out / "report.md").write_text("\n".join(parts) + "\n")
