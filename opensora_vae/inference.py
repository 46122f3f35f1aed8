"""Reconstruct the clips of a CSV: DIR_ori (preprocessed input), DIR_rec (full pipeline), DIR_spatial (2D VAE
only), and optionally the per-channel statistics of the temporal latents (the numbers behind shift/scale)."""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .data import VideoReadError, ensure_uint8_video, write_image, write_video
from .registry import DATASETS, RUNTIME_OPTIONS, build_from_cfg, build_model, to_plain
from .runtime import resolve_dtype
from .distributed import init_distributed

logger = logging.getLogger("opensora_vae.inference")
FOLDERS = ("ori", "rec", "spatial")


def output_names(paths: List[str]) -> List[str]:
    """File stems, made unique with the row number where two rows share one."""
    stems = [Path(p).stem for p in paths]
    counts = Counter(stems)
    return [s if counts[s] == 1 else f"{s}-{i}" for i, s in enumerate(stems)]


def rank_share(items: Sequence[Any], rank: int, world_size: int) -> List[Any]:
    """This rank's part of `items`: every world_size-th one, from its rank."""
    return list(items[rank::world_size])


class RowReader(Dataset):
    """Items `load(key)` for each key, bad ones reported instead of substituted (each row must give its own
    outputs): {"row": key, "item": ...} or {"row": key, "error": reason}."""

    def __init__(self, load: Callable[[Any], Dict[str, Any]], keys: Sequence[Any]):
        self.load, self.keys = load, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        key = self.keys[i]
        try:
            return {"row": key, "item": self.load(key)}
        except VideoReadError as err:
            return {"row": key, "error": err.reason or str(err)}


def report_skips(skipped: Dict[str, str], is_main: bool) -> Dict[str, str]:
    """Every rank's skipped rows (name -> reason), listed once by rank 0."""
    if dist.is_available() and dist.is_initialized():
        parts: List[Dict[str, str]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, skipped)
        skipped = {k: v for p in parts for k, v in p.items()}
    if is_main and skipped:
        logger.warning("skipped %d row(s):\n%s", len(skipped),
                       "\n".join(f"  {p}: {r}" for p, r in sorted(skipped.items())))
    return skipped


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
    skipped: Dict[str, str] = field(default_factory=dict)  # path -> reason
    stats: Optional[Dict[str, Any]] = None


def load_model(model_cfg: Dict[str, Any], ckpt_path: Optional[str], tiling: Optional[Dict[str, Any]] = None,
               **runtime: Any):
    """Build the pipeline (weights from ckpt_path when given) with the runtime options of inference and encoding:
    `tiling` (enable_tiling kwargs, or None for off) and build_model's `compile` (True or torch.compile options,
    compiled once per shape, cached on disk by inductor), `winograd` (True: fp32 CPU fast path) and `subpixel`
    (False: diffusers' upsampling). None leaves an option as the model dict sets it."""
    cfg = to_plain(model_cfg)
    if ckpt_path:
        cfg["from_pretrained"] = str(ckpt_path)
    model = build_model(cfg, **{k: v for k, v in runtime.items() if v is not None})
    if tiling is not None:
        model.enable_tiling(**to_plain(tiling))
    return model


def runtime_options(cfg) -> Dict[str, Any]:
    """The run config's top-level runtime options for `load_model` (`compile`, `winograd`, `subpixel`)."""
    return {name: cfg.get(name) for name in RUNTIME_OPTIONS}


def _write(folder: Path, name: str, video: torch.Tensor, fps: float, crf: int) -> Path:
    frames = ensure_uint8_video(video)
    if frames.shape[0] == 1:  # a single frame is an image
        path = folder / f"{name}.png"
        write_image(path, frames[0])
    else:
        path = folder / f"{name}.mp4"
        write_video(path, frames, fps, crf=crf)
    return path


def reconstruct_dataset(cfg, ckpt_path: Optional[str], save_dir: str, overwrite: bool = False,
                        cal_stats: bool = False, stats_path: Optional[str] = None) -> InferenceReport:
    """Run the pipeline over the CSV's rows (the first `num_samples` if set; split across ranks) and write the
    three folders. Config: `sample_posterior` (False: the posterior mean), `crf` (H.264 quality, default 18),
    `fps` (None: the source clip's rate), `num_samples` (None: every row)."""
    info = init_distributed(cfg.get("device", "auto"))
    device = info.device
    dtype = resolve_dtype(cfg.get("dtype", "auto"), device)
    dataset = build_from_cfg(cfg.dataset, DATASETS)
    paths = list(dataset.data["path"])
    names = output_names(paths)
    num_samples = cfg.get("num_samples")
    if num_samples is not None and int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1 or None, got {num_samples}")
    rows = range(len(paths)) if num_samples is None else range(min(len(paths), int(num_samples)))
    base = Path(save_dir)
    folders = {k: base.parent / f"{base.name}_{k}" for k in FOLDERS}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    report = InferenceReport()

    def done(row: int) -> bool:
        return all(any((folders[k] / f"{names[row]}{ext}").exists() for ext in (".mp4", ".png")) for k in FOLDERS)

    mine = rank_share(rows, info.rank, info.world_size)
    kept = set() if overwrite else {r for r in mine if done(r)}
    report.existing = [paths[r] for r in mine if r in kept]
    todo = [r for r in mine if r not in kept]
    if report.existing:
        logger.info("%d clip(s) already reconstructed: kept (pass --overwrite to redo them)", len(report.existing))

    model = load_model(cfg.model, ckpt_path, cfg.get("tiling"), **runtime_options(cfg)).to(device=device, dtype=dtype)
    model.eval()
    sample_posterior = bool(cfg.get("sample_posterior", False))
    crf = int(cfg.get("crf", 18))
    generator = torch.Generator(device=device).manual_seed(int(cfg.get("seed", 42)) + info.rank)
    stats = LatentStats()
    loader = DataLoader(RowReader(dataset.load_row, todo), batch_size=None, num_workers=int(cfg.get("num_workers", 0)))
    for entry in tqdm(loader, total=len(todo), desc="reconstruct", disable=not info.is_main):
        row = entry["row"]
        if "error" in entry:
            report.skipped[paths[row]] = entry["error"]
            logger.warning("skipping %s: %s", paths[row], entry["error"])
            continue
        item = entry["item"]
        x = item["video"][None].to(device=device, dtype=dtype)
        with torch.inference_mode():
            out = model(x, sample_posterior=sample_posterior, generator=generator)
            spatial = model.spatial_vae.decode(out.x_z)
        if cal_stats:
            stats.add(out.z.float())
        fps = float(cfg.get("fps") or item.get("fps") or 24.0)  # config/--fps, else the source clip's rate
        for key, video in (("ori", x[0]), ("rec", out.x_rec[0]), ("spatial", spatial[0])):
            _write(folders[key], names[row], video.float(), fps, crf)
        report.written.append(paths[row])

    if cal_stats:
        stats.reduce(device)
        report.stats = stats.as_dict()
        if info.is_main:
            target = Path(stats_path) if stats_path else base.parent / f"{base.name}_latent_stats.json"
            target.write_text(json.dumps(report.stats, indent=2))
            logger.info("latent statistics written to %s", target)
    report.skipped = report_skips(report.skipped, info.is_main)
    return report

