"""Encode the clips of a CSV once into latent shards for diffusion training (scripts/encode_latents.py).

Any video autoencoder (`models.build`: the Open-Sora pipeline, diffusers' Wan, CogVideoX, LTX-Video, ...).
DIR/shards/run{R}-rank{K}-{S}.safetensors hold, per (row, bucket), the model's posterior mean and std BEFORE any
latent normalisation (format 2; format 1, written before, held the Open-Sora pipeline's normalised ones), and in
their metadata the row's fields: each shard describes itself, so a restart finds what is stored by reading shard
headers, and the index is rebuilt from them. Shards are written whole through `storage.committed` (a temporary name
and a rename; on object storage one upload of the complete file): a kill loses at most the shard in the making, and
DIR may be a URL (`s3://bucket/latents`). DIR/meta.json says which model, data and settings made the latents, and
the model's own normalisation (`latent_normalization`), which `LatentDataset(normalize=True)` applies;
DIR/index.{parquet,csv} lists every stored clip.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import __version__, storage
from .data import is_image_path
from .data.latents import INDEX_COLUMNS, LATENT_FORMAT, META_NAME, SHARD_DIR, read_meta, read_shard_records
from .config import check_config
from .distributed import barrier, init_distributed, rank_share
from .signals import StopSignals, start_loader, worker_init
from .errors import UserError
from .models.speed import RUNTIME_OPTIONS
from .jobs import (RowReader, Split, absolute_if_local, check_frame_counts, check_frame_sizes, check_output_folder,
                   job_model, report_skips, row_split, stopping)
from .models.autoencoders import VideoAutoencoder
from .provenance import recorded_model_config
from .registry import DATASETS, build_from_cfg, to_plain
from .runtime import DTYPES, resolve_dtype

logger = logging.getLogger("opensora_vae.encode")

# What must match for a restart to add to an existing DIR.
RESUME_KEYS = ("format", "checkpoint", "model", "data_path", "csv_sha256", "sample_posterior", "dtype", "save_dtype",
               "frame_interval", "crop", "seed")

Bucket = Tuple[int, int, int]  # (num_frames, height, width)


def bucket_name(bucket: Bucket) -> str:
    return "x".join(str(int(v)) for v in bucket)


def parse_buckets(buckets: Sequence[Sequence[int]], num_frames: Optional[int] = None,
                  image_size: Optional[Sequence[int]] = None) -> List[Bucket]:
    """The config's (num_frames, height, width) buckets, with --num-frames / --image-size replacing those fields
    in each; duplicates dropped, order kept."""
    out: List[Bucket] = []
    for b in buckets:
        if len(b) != 3:
            raise ValueError(f"a bucket is (num_frames, height, width), got {tuple(b)}")
        t, h, w = (int(v) for v in b)
        if num_frames:
            t = int(num_frames)
        if image_size:
            h, w = (int(v) for v in image_size)
        if min(t, h, w) < 1:
            raise ValueError(f"bucket sizes must be positive, got {(t, h, w)}")
        if (t, h, w) not in out:
            out.append((t, h, w))
    if not out:
        raise ValueError("no buckets: set buckets=[(num_frames, height, width), ...] in the config")
    return out


def unit_bucket(path: str, bucket: Bucket) -> Bucket:
    """Images are 1-frame clips at the bucket's size (so buckets differing only in length share them)."""
    return (1, bucket[1], bucket[2]) if is_image_path(path) else bucket


def clip_dataset(dataset_cfg, bucket: Bucket):
    """The configured dataset reading clips of the bucket's length and size. It is built at 1 frame and given its
    length after, so that no row is dropped up front (num_frames column): row numbers stay the CSV's, and a
    too-short video fails when read, as a skipped row of this bucket. Images stay 1-frame clips."""
    ds = build_from_cfg(dataset_cfg, DATASETS, num_frames=1, image_size=tuple(bucket[1:]), image_frames="single")
    ds.num_frames = int(bucket[0])
    return ds


class BucketLoader:
    """(row, bucket name) -> the dataset item of that row at that bucket (picklable, for DataLoader workers)."""

    def __init__(self, dataset_cfg, buckets: Sequence[Bucket]):
        self.datasets = {bucket_name(b): clip_dataset(dataset_cfg, b) for b in buckets}

    def __call__(self, key: Tuple[int, str]) -> Dict[str, Any]:
        row, name = key
        return self.datasets[name].load_row(int(row))


# ---------------------------------------------------------------------------------------------------- shards


def clip_key(row: int, name: str) -> str:
    return f"{int(row)}/{name}"


def stored_shards(save_dir: str) -> List[str]:
    """The complete shards in DIR/shards (what `committed` has not finished is hidden and marked .tmp)."""
    folder = storage.join(save_dir, SHARD_DIR)
    return [storage.join(folder, n) for n in storage.listdir(folder)
            if n.endswith(".safetensors") and not storage.is_temporary(n)]


class ShardWriter:
    """Buffers clips and writes a shard (storage.committed: complete or absent) once the buffer holds `max_bytes`."""

    def __init__(self, folder: str, prefix: str, max_bytes: int, save_dtype: torch.dtype):
        self.folder, self.prefix, self.max_bytes, self.save_dtype = folder, prefix, max(1, int(max_bytes)), save_dtype
        self.tensors: Dict[str, torch.Tensor] = {}
        self.records: List[Dict[str, Any]] = []
        self.size = 0
        self.shards = 0
        self.bytes_written = 0

    def add(self, record: Dict[str, Any], mean: torch.Tensor, std: torch.Tensor) -> None:
        key = record["key"]
        for name, t in (("mean", mean), ("std", std)):
            t = t.detach().to("cpu", self.save_dtype).contiguous()
            self.tensors[f"{key}/{name}"] = t
            self.size += t.numel() * t.element_size()
        self.records.append(record)
        if self.size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        from safetensors.torch import save_file

        name = f"{self.prefix}-{self.shards:06d}.safetensors"
        for r in self.records:
            r["shard"] = name
        with storage.committed(storage.join(self.folder, name)) as tmp:
            save_file(self.tensors, tmp, metadata={"clips": json.dumps(self.records)})
            size = Path(tmp).stat().st_size
        self.bytes_written += size
        self.shards += 1
        self.tensors, self.records, self.size = {}, [], 0


# ---------------------------------------------------------------------------------------------------- meta, index


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with storage.open_read(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _absolute_checkpoint(meta: Dict[str, Any]) -> Dict[str, Any]:
    """meta.json of an earlier version recorded the checkpoint as given (relative to where that job started)."""
    meta = dict(meta, checkpoint=absolute_if_local(meta.get("checkpoint")))
    if isinstance(meta.get("model"), dict) and "from_pretrained" in meta["model"]:
        meta["model"] = dict(meta["model"], from_pretrained=absolute_if_local(meta["model"]["from_pretrained"]))
    return meta


def _check_meta(save_dir: str, meta: Dict[str, Any]) -> None:
    """meta.json from an earlier run must describe the same job, or its latents would be mixed with others."""
    old = _absolute_checkpoint(read_meta(save_dir))
    if old.get("format", 1) != meta["format"]:
        raise UserError(f"{storage.redact(save_dir)} holds latents of format {old.get('format', 1)} (an earlier "
                        f"version: normalised latents); this version writes format {meta['format']} (before "
                        f"normalisation): use a new --save-dir (LatentDataset reads both)")
    diff = [k for k in RESUME_KEYS if json.dumps(old.get(k), sort_keys=True) != json.dumps(meta.get(k), sort_keys=True)]
    if diff:
        raise ValueError(f"{storage.redact(save_dir)} holds latents of another job ({', '.join(diff)} differ); "
                         f"use a new --save-dir. Stored: {({k: old.get(k) for k in diff})}")


def _has_pyarrow() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


def write_index(save_dir: str) -> Tuple[str, int]:
    """One index over every shard (any run, any rank), ordered by (row, bucket); a clip stored twice (two jobs
    writing one folder at once) is listed once, from the first shard."""
    records, seen = [], set()
    for shard in stored_shards(save_dir):
        for r in read_shard_records(shard):
            if r["key"] in seen:
                logger.warning("%s also in %s: listed once", r["key"], storage.basename(shard))
                continue
            seen.add(r["key"])
            records.append(r)
    df = pd.DataFrame.from_records(records, columns=list(INDEX_COLUMNS))
    df = df.sort_values(["row", "bucket"], kind="stable").reset_index(drop=True)
    for col in ("frame_indices", "latent_shape"):
        df[col] = df[col].map(json.dumps)
    parquet, csv = storage.join(save_dir, "index.parquet"), storage.join(save_dir, "index.csv")
    target, other = (parquet, csv) if _has_pyarrow() else (csv, parquet)
    with storage.committed(target) as tmp:
        if target == parquet:
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    storage.remove(other)  # an older index in the other format would be stale
    return target, len(df)


# ---------------------------------------------------------------------------------------------------- the job


@dataclass
class EncodeReport:
    encoded: int = 0  # clips (row x bucket) encoded by this run, all ranks
    existing: int = 0  # clips found stored by earlier runs
    skipped: Dict[str, str] = field(default_factory=dict)  # "path [row N]" -> "bucket: reason; ..." (one per row)
    bytes_written: int = 0
    shards_written: int = 0
    stored: int = 0  # clips in the index at the end
    seconds: float = 0.0  # the whole job, model loading included
    loop_seconds: float = 0.0  # reading, encoding and writing (slowest rank)
    index: Optional[str] = None
    preempted: Optional[str] = None  # the stop signal that ended the run early (what it encoded is stored)


def _reduce(values: List[float], device: torch.device, op=dist.ReduceOp.SUM) -> List[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t.tolist()


def _job_meta(cfg, dataset, buckets: List[Bucket], dtype: torch.dtype, model: VideoAutoencoder,
              is_main: bool) -> Dict[str, Any]:
    # What was built (a checkpoint may bring another structure, a spec another model than the config's entry).
    # How the model runs (compile, Winograd, tiling, ...) may change between restarts; what it is may not.
    built = recorded_model_config(cfg.model, model, log=is_main)
    model_cfg = {k: v for k, v in built.items() if k not in RUNTIME_OPTIONS or k == "micro_batch_size"}
    if "from_pretrained" in model_cfg:  # absolute: meta.json is read from other folders than the job's
        model_cfg["from_pretrained"] = absolute_if_local(model_cfg["from_pretrained"])
    norm = model.latent_normalization
    return {
        "format": LATENT_FORMAT,
        "checkpoint": model_cfg.get("from_pretrained"),
        "model": model_cfg,  # models.build.build_autoencoder(meta["model"]) rebuilds the model
        "model_config": json.loads(json.dumps(to_plain(getattr(model.model, "config", None)), default=str)),
        "autoencoder": {k: v for k, v in model.describe().items() if k in (
            "kind", "class_name", "frame_rule", "temporal_compression", "spatial_multiple", "latent_channels")},
        # the model's own normalisation: normalised = (z - shift) / scale per channel (LatentDataset(normalize=True))
        "normalization": {"shift": norm["shift"], "scale": norm["scale"], "source": norm["source"]},
        "shift": norm["shift"],
        "scale": norm["scale"],
        "data_path": storage.redact(absolute_if_local(dataset.data_path)),
        "num_rows": len(dataset),
        "csv_sha256": _sha256(dataset.data_path),
        "buckets": [list(b) for b in buckets],
        "frame_interval": dataset.frame_interval,
        "crop": dataset.crop,
        "seed": dataset.seed,
        "sample_posterior": False,
        "dtype": str(dtype).replace("torch.", ""),
        "save_dtype": cfg.save_dtype,
        "latent_space": "posterior mean and std before normalisation; normalised: (mean - shift) / scale, "
                        "std / scale",
        "package_version": __version__,
        "torch_version": torch.__version__,
    }


def _open_folder(out: str, meta: Dict[str, Any], is_main: bool) -> bool:
    """Create the folder and its meta.json, or check that an existing one holds this job's latents (new buckets
    join its list); drop the shards a killed run was writing. Returns whether rank 0 created meta.json."""
    shard_dir = storage.join(out, SHARD_DIR)
    meta_path = storage.join(out, META_NAME)
    created = False
    if is_main:
        created = not storage.exists(out)
        storage.makedirs(shard_dir)
        for name in storage.listdir(shard_dir):
            if storage.is_temporary(name):
                storage.remove(storage.join(shard_dir, name))
        if not storage.isfile(meta_path):
            storage.write_text(meta_path, json.dumps(meta, indent=2))
    barrier()
    _check_meta(out, meta)
    if is_main:
        stored_meta = read_meta(out)
        if stored_meta["buckets"] != meta["buckets"]:
            stored_meta["buckets"] += [b for b in meta["buckets"] if b not in stored_meta["buckets"]]
            storage.write_text(meta_path, json.dumps(stored_meta, indent=2))
    return created


def _remove_unused_folder(out: str) -> None:
    """The folder this run created and stored nothing in: removed, so that a rerun with a fixed CSV is not refused
    as another job's. Only what the job writes goes (meta.json, an empty shards/); anything else keeps it."""
    storage.remove(storage.join(out, META_NAME))
    if storage.is_url(out):
        return  # object stores have no empty folders
    for folder in (storage.join(out, SHARD_DIR), out):
        try:
            Path(folder).rmdir()
        except OSError:  # not empty: something else is in it
            return


def _encode_rows(model, loader, paths: List[str], writer: ShardWriter, device, dtype, show: bool,
                 skipped: Dict[str, str], stop: StopSignals, split: Split) -> int:
    """Encode each (row, bucket) the loader gives into the writer (if this rank writes: `split`), until a stop
    signal; bad rows go to `skipped`. Returns the count written."""
    encoded = 0
    bar = tqdm(start_loader(loader, stop.names), total=len(loader), desc="encode (rank 0)", unit="clip",
               disable=not show, smoothing=0.1)
    for entry in bar:
        if stopping(stop, split, device):
            break
        row, name = entry["row"]
        if "error" in entry:
            key = f"{paths[row]} [row {row}]"  # one entry per row: its buckets' reasons join
            reason = f"{name}: {entry['error']}"
            skipped[key] = f"{skipped[key]}; {reason}" if key in skipped else reason
            logger.warning("skipping %s [row %d, %s]: %s", paths[row], row, name, entry["error"])
            continue
        item = entry["item"]
        x = item["video"][None].to(device=device, dtype=dtype)
        with torch.inference_mode():
            posterior = model.encode(x)  # the model's own, before any normalisation
            mean, std = posterior.mean, posterior.std
        if not split.writes:
            continue
        t, h, w = (int(v) for v in name.split("x"))
        writer.add({
            "key": clip_key(row, name), "row": int(row), "bucket": name, "num_frames": t, "height": h, "width": w,
            "latent_shape": list(mean.shape[1:]), "path": paths[row], "text": str(item.get("text", "")),
            "fps": float(item["fps"]), "frame_indices": [int(i) for i in item["frame_indices"]],
            "source_height": int(item["source_size"][0]), "source_width": int(item["source_size"][1]),
        }, mean[0], std[0])
        encoded += 1
    writer.flush()
    bar.close()
    return encoded


def encode_dataset(cfg, num_frames: Optional[int] = None, image_size: Optional[Sequence[int]] = None) -> EncodeReport:
    """Encode every (row, bucket) of the CSV not yet stored in `save_dir`; ranks split what is left.
    `num_frames` / `image_size` replace those fields of every configured bucket. `cfg`: an encoding config
    (config.EncodeConfig's keys)."""
    start = time.perf_counter()
    cfg = check_config(cfg, "encode")
    if not cfg.save_dir:
        raise UserError("no output folder: pass --save-dir DIR (or set save_dir in the config)")
    out = str(cfg.save_dir)
    check_output_folder(out)
    info = init_distributed(cfg.device, cfg.dist_timeout)
    device = info.device
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True  # two runs must give identical latents
        torch.backends.cudnn.benchmark = False
    buckets = parse_buckets(cfg.buckets or [(cfg.dataset.num_frames, *cfg.dataset.image_size)], num_frames, image_size)
    base = clip_dataset(cfg.dataset, (1, *buckets[0][1:]))  # the rows, numbered as every bucket numbers them
    paths = list(base.data["path"])
    model = job_model(cfg.model, device, dtype, log=info.is_main)
    check_frame_sizes(model, [b[1:] for b in buckets], "bucket height x width")
    check_frame_counts(model, [b[0] for b in buckets], "bucket num_frames")
    if any(is_image_path(p) for p in paths):  # images are 1-frame clips
        check_frame_counts(model, [1], "an image row's num_frames")
    created = _open_folder(out, _job_meta(cfg, base, buckets, dtype, model, info.is_main), info.is_main)

    shards = stored_shards(out)
    stored = {r["key"] for s in shards for r in read_shard_records(s)}
    run = 1 + max((int(storage.basename(s).split("-")[0][3:]) for s in shards), default=-1)
    barrier()  # every rank has listed the shards before any rank writes one
    keys = [(row, bucket_name(b)) for row, path in enumerate(paths)
            for b in dict.fromkeys(unit_bucket(path, b) for b in buckets)]
    units = [k for k in keys if clip_key(*k) not in stored]
    all_buckets = sorted({unit_bucket(p, b) for p in paths for b in buckets})
    split = row_split(model, info.rank, info.world_size)
    mine = rank_share(units, split.rank, split.world)
    if info.is_main:
        logger.info("%d clip(s) to encode (%d row(s) x %d bucket(s), %d already stored) on %d rank(s)",
                    len(units), len(paths), len(buckets), len(keys) - len(units), info.world_size)

    writer = ShardWriter(storage.join(out, SHARD_DIR), f"run{run:03d}-rank{info.rank:03d}", cfg.shard_size_mb * 2**20,
                         DTYPES[cfg.save_dtype])
    loader = DataLoader(RowReader(BucketLoader(cfg.dataset, all_buckets), mine), batch_size=None,
                        num_workers=cfg.num_workers, worker_init_fn=worker_init(cfg.stop_signals))
    skipped: Dict[str, str] = {}
    loop_start = time.perf_counter()
    stop = StopSignals(cfg.stop_signals).install()
    try:
        shown = [storage.redact(p) for p in paths]  # what records and warnings say: no credentials
        encoded = _encode_rows(model, loader, shown, writer, device, dtype, info.is_main, skipped, stop, split)
    finally:
        stop.restore()
    loop_seconds = time.perf_counter() - loop_start
    if stop.received:  # ranks stop on their own: no collective, the next run lists the shards and writes the index
        logger.warning("%s: rank %d stopped after %d clip(s), all written to shards; rerun the same command to "
                       "continue", stop.name, info.rank, encoded)
        return EncodeReport(encoded=encoded, existing=len(keys) - len(units), skipped=skipped,
                            bytes_written=writer.bytes_written, shards_written=writer.shards,
                            loop_seconds=loop_seconds, preempted=stop.name)

    report = EncodeReport(existing=len(keys) - len(units))
    report.encoded, report.bytes_written, report.shards_written = (
        int(v) for v in _reduce([encoded, writer.bytes_written, writer.shards], device))
    produced = report.encoded + report.existing > 0
    if not produced and info.is_main and created:
        _remove_unused_folder(out)
    report.skipped = report_skips(skipped, info.is_main, len(paths), produced)
    report.loop_seconds = _reduce([loop_seconds], device, dist.ReduceOp.MAX)[0]
    barrier()  # every shard is renamed before the index is built
    if info.is_main:
        target, report.stored = write_index(out)
        report.index = storage.redact(target)
    report.seconds = time.perf_counter() - start
    if info.is_main:
        rate = report.encoded / report.loop_seconds if report.loop_seconds else 0.0
        logger.info("encoded %d clip(s) in %.1f s (%.2f clips/s; %.1f s in all), %d already stored, %d row(s) skipped; "
                    "wrote %d shard(s), %.2f MB; %s lists %d clip(s)", report.encoded, report.loop_seconds, rate,
                    report.seconds, report.existing,
                    len(report.skipped), report.shards_written, report.bytes_written / 1e6, storage.redact(target),
                    report.stored)
    barrier()
    return report
