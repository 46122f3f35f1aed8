"""Reconstruct the clips of a CSV with any video autoencoder (`models.build`): DIR_ori (preprocessed input),
DIR_rec (the model's reconstruction), DIR_spatial (the spatial VAE alone, for a model with a spatial-only path: the
Open-Sora pipeline), and optionally the per-channel statistics of the latents before normalisation (the numbers
behind a model's shift/scale). DIR may be a URL (`s3://bucket/recon`): each clip is uploaded whole (storage.py)."""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import storage
from .config import check_config
from .data import ensure_uint8_video, write_image, write_video
from .distributed import init_distributed, rank_share
from .errors import UserError
from .jobs import (RowReader, Split, check_frame_counts, check_frame_sizes, check_output_folder, job_model,
                   report_skips, row_split, stopping)
from .models.autoencoders import VideoAutoencoder
from .provenance import recorded_model_config
from .registry import DATASETS, build_from_cfg
from .runtime import resolve_dtype
from .signals import StopSignals, start_loader, worker_init

logger = logging.getLogger("opensora_vae.inference")
FOLDERS = ("ori", "rec", "spatial")


def output_names(paths: List[str]) -> List[str]:
    """File stems, made unique with the row number where two rows share one."""
    stems = [Path(storage.basename(p)).stem for p in paths]
    counts = Counter(stems)
    return [s if counts[s] == 1 else f"{s}-{i}" for i, s in enumerate(stems)]


@dataclass
class LatentStats:
    """Per-channel running sums of the temporal latents (before shift/scale), in float64."""

    total: Optional[torch.Tensor] = None
    squares: Optional[torch.Tensor] = None
    count: int = 0
    videos: int = 0

    def add(self, z: torch.Tensor) -> None:
        z = z.detach().double().transpose(0, 1).reshape(z.shape[1], -1)
        total, squares = z.sum(1), z.square().sum(1)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += z.shape[1]
        self.videos += 1

    def reduce(self, device: torch.device) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        channels = 0 if self.total is None else self.total.numel()
        size = torch.tensor([channels], device=device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX)
        n = int(size.item())
        packed = torch.zeros(2 * n + 2, dtype=torch.float64, device=device)
        if self.total is not None:
            packed[:n], packed[n:2 * n] = self.total.to(device), self.squares.to(device)
        packed[-2], packed[-1] = self.count, self.videos
        dist.all_reduce(packed)
        self.total, self.squares = packed[:n].cpu(), packed[n:2 * n].cpu()
        self.count, self.videos = int(packed[-2].item()), int(packed[-1].item())

    def as_dict(self) -> Dict[str, Any]:
        if not self.count:
            return {"mean": None, "std": None, "num_latent_values_per_channel": 0, "num_videos": 0}
        mean = self.total / self.count
        std = (self.squares / self.count - mean.square()).clamp_min(0).sqrt()
        return {"mean": mean.tolist(), "std": std.tolist(), "num_latent_values_per_channel": self.count,
                "num_videos": self.videos}


@dataclass
class InferenceReport:
    written: List[str] = field(default_factory=list)
    existing: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # "path [row N]" -> reason
    stats: Optional[Dict[str, Any]] = None
    model: Optional[Dict[str, Any]] = None  # the model entry that describes what was built (provenance)
    preempted: Optional[str] = None  # the stop signal that ended the run early (finished clips are written)


def _reconstruct_rows(cfg, model: VideoAutoencoder, loader, total: int, paths, names, folders, device, dtype,
                      split: Split, stats: LatentStats, report: InferenceReport, stop: StopSignals) -> None:
    """Reconstruct and write each row the loader gives, until a stop signal. split: `jobs.row_split`'s (ranks that
    share each clip draw the same posterior samples, stop together, and one of them writes)."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed + split.rank)
    for entry in tqdm(loader, total=total, desc="reconstruct", disable=not (split.rank == 0 and split.writes)):
        if stopping(stop, split, device):
            return
        row = entry["row"]
        if "error" in entry:
            shown = storage.redact(paths[row])
            report.skipped[f"{shown} [row {row}]"] = entry["error"]
            logger.warning("skipping %s [row %d]: %s", shown, row, entry["error"])
            continue
        item = entry["item"]
        x = item["video"][None].to(device=device, dtype=dtype)
        with torch.inference_mode():
            out = model(x, sample_posterior=cfg.sample_posterior, generator=generator)
            videos = {"ori": x[0], "rec": out.reconstruction[0]}
            if "spatial" in folders:
                videos["spatial"] = model.spatial_reconstruction(out)[0]
        if not split.writes:
            continue
        if cfg.cal_stats:
            stats.add(out.z.float())
        fps = float(cfg.fps or item.get("fps") or 24.0)  # config/--fps, else the source clip's rate
        for key, video in videos.items():
            _write(folders[key], names[row], video.float(), fps, cfg.crf)
        report.written.append(paths[row])


def _write(folder: Union[Path, str], name: str, video: torch.Tensor, fps: float, crf: int) -> str:
    """One clip, committed whole: its folder is made with its first clip, so a job that writes none leaves none."""
    frames = ensure_uint8_video(video)
    if frames.shape[0] == 1:  # a single frame is an image
        path = storage.join(folder, f"{name}.png")
        write_image(path, frames[0])
    else:
        path = storage.join(folder, f"{name}.mp4")
        write_video(path, frames, fps, crf=crf)
    return path


def reconstruct_dataset(cfg, overwrite: bool = False, stats_path: Optional[str] = None) -> InferenceReport:
    """Run the model over the CSV's rows (the first `num_samples`; split across ranks) and write the folders
    `save_dir`_ori/_rec, and _spatial where the model has a spatial-only path. `cfg`: an inference config
    (config.InferenceConfig's keys)."""
    cfg = check_config(cfg, "inference")
    if not cfg.save_dir:
        raise UserError("no output folder: pass --save-dir DIR (or set save_dir in the config)")
    if cfg.num_samples is not None and cfg.num_samples < 1:
        raise UserError(f"num_samples must be >= 1 or None, got {cfg.num_samples}")
    base = str(cfg.save_dir).rstrip("/")
    check_output_folder(storage.dirname(base) or ".")
    if stats_path:
        check_output_folder(storage.dirname(stats_path) or ".", "--stats-path")
    info = init_distributed(cfg.device, cfg.dist_timeout)
    device = info.device
    dtype = resolve_dtype(cfg.dtype, device)
    dataset = build_from_cfg(cfg.dataset, DATASETS)
    paths = list(dataset.data["path"])
    names = output_names(paths)
    rows = range(len(paths)) if cfg.num_samples is None else range(min(len(paths), cfg.num_samples))
    model = job_model(cfg.model, device, dtype, log=info.is_main)  # before any folder: a bad checkpoint leaves none
    check_frame_sizes(model, [dataset.image_size])
    check_frame_counts(model, [dataset.num_frames])
    report = InferenceReport(model=recorded_model_config(cfg.model, model, log=info.is_main))
    kinds = FOLDERS if model.has_spatial_path else tuple(k for k in FOLDERS if k != "spatial")
    folders = {k: storage.location(f"{base}_{k}") for k in kinds}
    if info.is_main and not model.has_spatial_path:
        name = storage.basename(base)
        logger.info("%s has no spatial-only path: writing %s_ori and %s_rec (no _spatial)", model.name, name, name)
    written = {k: set(storage.listdir(folder)) for k, folder in folders.items()}  # one listing per folder

    def done(row: int) -> bool:
        return all(any(f"{names[row]}{ext}" in written[k] for ext in (".mp4", ".png")) for k in folders)

    split = row_split(model, info.rank, info.world_size)
    mine = rank_share(rows, split.rank, split.world)
    kept = set() if overwrite else {r for r in mine if done(r)}
    report.existing = [paths[r] for r in mine if r in kept]
    todo = [r for r in mine if r not in kept]
    if report.existing:
        logger.info("%d clip(s) already reconstructed: kept (pass --overwrite to redo them)", len(report.existing))

    stats = LatentStats()
    loader = DataLoader(RowReader(dataset.load_row, todo), batch_size=None, num_workers=cfg.num_workers,
                        worker_init_fn=worker_init(cfg.stop_signals))
    stop = StopSignals(cfg.stop_signals).install()
    try:
        _reconstruct_rows(cfg, model, start_loader(loader, cfg.stop_signals), len(todo), paths, names, folders,
                          device, dtype, split, stats, report, stop)
    finally:
        stop.restore()
    if stop.received:  # ranks stop on their own: no collective; a rerun keeps what is written
        logger.warning("%s: rank %d stopped after %d clip(s); rerun the same command to continue", stop.name,
                       info.rank, len(report.written))
        report.preempted = stop.name
        return report

    report.skipped = report_skips(report.skipped, info.is_main, len(rows))
    if cfg.cal_stats:
        stats.reduce(device)
        report.stats = stats.as_dict()
        if info.is_main:
            target = str(stats_path) if stats_path else f"{base}_latent_stats.json"
            storage.write_text(target, json.dumps(report.stats, indent=2))
            logger.info("latent statistics written to %s", storage.redact(target))
    return report
