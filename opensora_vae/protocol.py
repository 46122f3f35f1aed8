"""Evaluation protocols: one JSON file fixes everything a VAE comparison depends on, and `evaluate_protocol`
reconstructs its clips with any number of VAEs and scores them in one run (eval/vae/eval_vae.py): a job beside
inference and encoding, its VAEs from models/ (`models.build.load_autoencoder`, spec strings), its scores from
metrics/ (which knows no model).

Schema (`"format": "opensora-vae-eval-protocol/1"`; an unknown field is an error, so a typo cannot pass silently):

  field               type / default          meaning
  name                str (required)          the protocol's name
  description, notes  str / ""                free text (not hashed): sources, how to obtain the clips, deviations
  clips               [str] / null            clip paths relative to --data-root; an entry with no extension also
                                              matches NAME.<video extension> (e.g. "videoSRC01" -> videoSRC01.mp4)
  clips_csv           str / null              or a CSV with a 'path' column (relative to the protocol file);
                                              both null: the user passes --clips-csv
  max_clips           int / null              keep the first N clips of the list
  fps                 number / null           rate the clips are sampled at (null: each file's own)
  num_frames          int (required)          frames scored per clip
  sample_stride       int / 1                 step between scored frames, in frames at `fps`
  start_frame         int / 0                 first source frame
  resize_short_side   int / null              short side after a bilinear resize (long side floored; null: keep)
  antialias           bool / false            antialias in that resize (false: as the reference's evaluation)
  center_crop         int or [h, w] / null    centre crop after the resize
  dtype               fp32 | bf16 | fp16 / fp32   the VAEs' weights and inputs
  round_input_uint8   bool / true             quantise the preprocessed clip to 8-bit levels (as a file written at
                                              that size would be) before it is fed and scored
  round_output_uint8  bool / true             quantise the reconstruction to 8-bit levels before scoring
  posterior           mode | sample / mode    the latent fed to the decoder
  seed                int / 0                 sampled posteriors: generator seed + the clip's index in the list
  metrics             [str] / the first four  any of ssim psnr lpips flolpips fvd temporal (`SCORES`); fvd: rFVD
                                              over the clips (fvd.py), temporal: seam and flicker scores
                                              (temporal.py; seams at this project's micro-chunks only)

Frame sampling: frame j of a clip is source frame start_frame + floor(j * sample_stride * native_fps / fps), the
frame on screen at time j * sample_stride / fps (fps null: every sample_stride-th frame). Resampling drops or
repeats frames, never blends them. With stride 1 and fps null it is eval_common_metric.py's sampler (frames
0..T-1); with a stride > 1 that script spreads frames by linspace and can end one frame later. A clip too short for
its last index is skipped and reported, as is a missing or unreadable file.

Reconstructions are always clamped to [-1, 1] (the metrics take [0, 1]); each clip is fed alone (batch 1).

Hash: sha256 of the canonical JSON (sorted keys, separators "," and ":", UTF-8) of the normalised protocol (every
field, defaults filled in, the crop as [h, w]) without description and notes: it names the setting, not its
prose. The clip list has its own hash (`clip_list_sha256`, over the ordered names), and each clip file its
sha256 (one extra full read of every file, about 1 s per GB from a local disk; `hash_clips=False` skips it).

Scores: `build_scorers` gives a list of `Scorer`s; `score_vae` is the loop (reconstruct a clip, time it, measure
peak memory, hand original and reconstruction to every scorer). A new score (rFVD, seam scores) is one more Scorer
in `build_scorers`: `per_clip` for per-clip values, `finish` for one value over the whole set.
"""
from __future__ import annotations

import difflib
import gc
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import __version__
from .data.transforms import center_crop, resize_short_side
from .data.video import VideoReadError, probe_video, read_frames
from .distributed import gather_shares, rank_share, rank_world
from .errors import UserError
from .metrics.evaluate import build_frame_metrics, build_fvd
from .metrics.fvd import FEATURE_DIM, FVDAccumulator
from .metrics.pairs import VIDEO_EXTENSIONS, ClipTooShortError
from .metrics.temporal import SCORES as TEMPORAL_SCORES
from .metrics.temporal import temporal_scores
from .models.autoencoders import VideoAutoencoder
from .models.build import load_autoencoder, parse_vae_spec
from .runtime import DTYPES, peak_memory_bytes, reset_peak_memory, resolve_device

__all__ = [
    "FORMAT",
    "LoadedClip",
    "Protocol",
    "ProtocolError",
    "SCORES",
    "Scorer",
    "build_scorers",
    "canonical_json",
    "evaluate_protocol",
    "file_sha256",
    "format_report",
    "frame_indices",
    "load_protocol",
    "load_protocol_clip",
    "package_versions",
    "protocol_from_dict",
    "resolve_clips",
    "score_vae",
]

FORMAT = "opensora-vae-eval-protocol/1"
PathLike = Union[str, os.PathLike]
_UNHASHED = ("description", "notes")
# The scores `build_scorers` knows (its own list: the protocol's default and hash must not follow another module's).
SCORES = ("ssim", "psnr", "lpips", "flolpips", "fvd", "temporal")
DEFAULT_SCORES = ("ssim", "psnr", "lpips", "flolpips")


class ProtocolError(UserError):
    """A protocol file that cannot be used: one line naming the file and the field."""


# ----- the protocol ---------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(v) -> bool:
    return _is_int(v) and v >= 1


def _str_list(v) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(s, str) and s.strip() for s in v)


def _crop(v) -> bool:
    return _positive_int(v) or (isinstance(v, list) and len(v) == 2 and all(_positive_int(s) for s in v))


_NULL = object()  # "no default": the field is required
# field -> (default, check, what a valid value is)
FIELDS: Dict[str, Tuple[Any, Callable[[Any], bool], str]] = {
    "format": (_NULL, lambda v: v == FORMAT, f"the string {FORMAT!r}"),
    "name": (_NULL, lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "description": ("", lambda v: isinstance(v, str), "a string"),
    "notes": ("", lambda v: isinstance(v, str), "a string"),
    "clips": (None, lambda v: v is None or _str_list(v), "null or a non-empty list of paths"),
    "clips_csv": (None, lambda v: v is None or (isinstance(v, str) and bool(v.strip())), "null or a path"),
    "max_clips": (None, lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    "fps": (None, lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
            "null or a number > 0"),
    "num_frames": (_NULL, _positive_int, "an integer >= 1"),
    "sample_stride": (1, _positive_int, "an integer >= 1"),
    "start_frame": (0, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "resize_short_side": (None, lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    "antialias": (False, lambda v: isinstance(v, bool), "true or false"),
    "center_crop": (None, lambda v: v is None or _crop(v), "null, an integer >= 1 or [height, width]"),
    "dtype": ("fp32", lambda v: v in ("fp32", "bf16", "fp16"), "one of fp32, bf16, fp16"),
    "round_input_uint8": (True, lambda v: isinstance(v, bool), "true or false"),
    "round_output_uint8": (True, lambda v: isinstance(v, bool), "true or false"),
    "posterior": ("mode", lambda v: v in ("mode", "sample"), "'mode' or 'sample'"),
    "seed": (0, _is_int, "an integer"),
    "metrics": (list(DEFAULT_SCORES), lambda v: _str_list(v) and set(v) <= set(SCORES) and len(set(v)) == len(v),
                f"a list of distinct names from {', '.join(SCORES)}"),
}


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


@dataclass(frozen=True)
class Protocol:
    content: Dict[str, Any]  # normalised: every field, defaults filled in
    source: str = "<dict>"  # the file it came from

    def __getattr__(self, key):  # protocol.num_frames etc.; only called for names that are not attributes
        content = self.__dict__.get("content") or {}
        if key not in content:
            raise AttributeError(key)
        return content[key]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(canonical_json({k: v for k, v in self.content.items() if k not in _UNHASHED})).hexdigest()

    @property
    def crop(self) -> Optional[Tuple[int, int]]:
        return None if self.content["center_crop"] is None else tuple(self.content["center_crop"])

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.content["dtype"]]


def protocol_from_dict(data: Any, source: str = "<dict>") -> Protocol:
    """Validate and normalise; ProtocolError naming the field on the first problem."""
    if not isinstance(data, dict):
        raise ProtocolError(f"protocol {source}: expected a JSON object, got {type(data).__name__}")
    for key in data:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; fields: {', '.join(FIELDS)}"
            raise ProtocolError(f"protocol {source}: unknown field {key!r}{hint}")
    content = {}
    for key, (default, check, what) in FIELDS.items():
        if key not in data:
            if default is _NULL:
                raise ProtocolError(f"protocol {source}: field {key!r} is missing; it must be {what}")
            content[key] = json.loads(json.dumps(default))  # a fresh copy of list defaults
            continue
        if not check(data[key]):
            raise ProtocolError(f"protocol {source}: field {key!r} must be {what}, got {json.dumps(data[key])}")
        content[key] = data[key]
    if content["clips"] is not None and content["clips_csv"] is not None:
        raise ProtocolError(f"protocol {source}: give 'clips' or 'clips_csv', not both")
    if content["clips"] is not None and len(set(content["clips"])) != len(content["clips"]):
        dup = sorted({c for c in content["clips"] if content["clips"].count(c) > 1})
        raise ProtocolError(f"protocol {source}: field 'clips' lists {dup[0]!r} more than once")
    crop = content["center_crop"]
    content["center_crop"] = None if crop is None else ([crop, crop] if _is_int(crop) else list(crop))
    if content["fps"] is not None:
        content["fps"] = float(content["fps"])
    return Protocol(content, source)


def load_protocol(path: PathLike) -> Protocol:
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"protocol file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ProtocolError(f"protocol {path}: not valid JSON ({e})") from e
    return protocol_from_dict(data, str(path))


# ----- clips ----------------------------------------------------------------------------------------------------
@dataclass
class ClipEntry:
    name: str  # as the protocol or CSV lists it
    path: Optional[Path]  # None: not found
    reason: Optional[str] = None


def _find(root: Path, name: str) -> ClipEntry:
    path = Path(os.path.expanduser(name))
    path = path if path.is_absolute() else root / path
    if path.is_file():
        return ClipEntry(name, path)
    if not path.suffix and path.parent.is_dir():  # a bare sequence name: NAME.<video extension>
        hits = sorted(p for p in path.parent.glob(path.name + ".*") if p.suffix.lower() in VIDEO_EXTENSIONS)
        if len(hits) == 1:
            return ClipEntry(name, hits[0])
        if hits:
            return ClipEntry(name, None, f"several files match: {', '.join(p.name for p in hits)}")
    return ClipEntry(name, None, f"file not found: {path}")


def resolve_clips(protocol: Protocol, data_root: Optional[PathLike] = None,
                  clips_csv: Optional[PathLike] = None) -> Tuple[List[ClipEntry], Optional[Path]]:
    """The protocol's clips (first `max_clips`) as files under `data_root`; missing ones keep a reason. Also the
    CSV used, if any. `clips_csv` fills in a protocol that lists no clips (it cannot replace a list)."""
    csv = None
    if clips_csv is not None:
        if protocol.clips is not None or protocol.clips_csv is not None:
            raise UserError(f"protocol {protocol.name} fixes its own clip list; --clips-csv is only for protocols "
                            "whose clips and clips_csv are null")
        csv = Path(clips_csv)
    elif protocol.clips_csv is not None:
        csv = Path(protocol.clips_csv)
        if not csv.is_absolute() and protocol.source != "<dict>":
            csv = Path(protocol.source).parent / csv
    if protocol.clips is not None:
        names = list(protocol.clips)
    elif csv is not None:
        names = _csv_paths(csv)
    else:
        raise UserError(f"protocol {protocol.name} lists no clips: pass --clips-csv CSV (a 'path' column, relative "
                        "to --data-root); its notes say which clips")
    if data_root is None:
        if csv is None:
            raise UserError(f"protocol {protocol.name} lists clips relative to a data root: pass --data-root DIR")
        data_root = csv.parent
    root = Path(os.path.expanduser(str(data_root)))
    if not root.is_dir():
        raise UserError(f"--data-root {root} is not a folder")
    if protocol.max_clips is not None:
        names = names[: protocol.max_clips]
    return [_find(root, n) for n in names], csv


def _csv_paths(csv: Path) -> List[str]:
    import pandas as pd

    if not csv.is_file():
        raise UserError(f"clip CSV {csv} does not exist")
    try:
        df = pd.read_csv(csv)
    except (ValueError, pd.errors.ParserError) as e:
        raise UserError(f"clip CSV {csv}: cannot read ({e})") from e
    if "path" not in df.columns:
        raise UserError(f"clip CSV {csv} has no 'path' column (columns: {list(df.columns)})")
    paths = [str(p).strip() for p in df["path"] if isinstance(p, str) and p.strip()]
    if not paths:
        raise UserError(f"clip CSV {csv} has no rows with a path")
    seen: set = set()
    for p in paths:  # clips are keyed by their listed path in the report
        if p in seen:
            raise UserError(f"clip CSV {csv} lists {p!r} more than once")
        seen.add(p)
    return paths


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def frame_indices(total_frames: int, native_fps: float, protocol: Protocol) -> List[int]:
    """Source frames of one clip (module docstring); ValueError when the clip is too short or its rate unknown."""
    step = protocol.sample_stride
    if protocol.fps is not None:
        if not native_fps or native_fps <= 0:
            raise ValueError(f"frame rate unknown, cannot resample to {protocol.fps:g} fps")
        step = step * native_fps / protocol.fps
    # the epsilon keeps exact ratios (e.g. 60 -> 30 fps) from flooring one frame short
    idx = [protocol.start_frame + int(math.floor(j * step + 1e-9)) for j in range(protocol.num_frames)]
    if idx[-1] >= total_frames:
        raise ValueError(f"needs frame index {idx[-1]} (num_frames {protocol.num_frames}, stride "
                         f"{protocol.sample_stride}, start {protocol.start_frame}), has {total_frames} frames")
    return idx


@dataclass
class LoadedClip:
    name: str
    path: Path
    frames: torch.Tensor  # (T, C, H, W): uint8 when quantised (exact, a quarter of the memory), else float32 [0, 1]
    info: Dict[str, Any] = field(default_factory=dict)
    index: int = 0  # position in the protocol's list: seeds a sampled posterior, whatever else is skipped

    def unit(self) -> torch.Tensor:
        """float32 (T, C, H, W) in [0, 1]."""
        return self.frames.float() / 255.0 if self.frames.dtype == torch.uint8 else self.frames


def load_protocol_clip(path: PathLike, protocol: Protocol, name: Optional[str] = None) -> LoadedClip:
    """One clip sampled and preprocessed per the protocol; VideoReadError (ClipTooShortError) when it cannot be."""
    probe = probe_video(path)
    try:
        idx = frame_indices(probe.num_frames, probe.fps, protocol)
    except ValueError as e:
        raise ClipTooShortError(path, str(e)) from e
    x = read_frames(path, idx).float() / 255.0
    if protocol.resize_short_side:
        x = resize_short_side(x, protocol.resize_short_side, antialias=protocol.antialias)
    if protocol.crop:
        try:
            x = center_crop(x, protocol.crop)
        except ValueError as e:
            raise VideoReadError(path, str(e)) from e
    frames = (x.clamp(0, 1) * 255).round().to(torch.uint8) if protocol.round_input_uint8 else x.contiguous()
    info = dict(native_fps=probe.fps, native_frames=probe.num_frames, native_size=[probe.height, probe.width],
                indices=idx, size=list(x.shape[-2:]))
    return LoadedClip(name or Path(path).name, Path(path), frames, info)


# ----- scores ---------------------------------------------------------------------------------------------------
@dataclass
class Scorer:
    """A score of original vs reconstruction. `per_clip(real, rec)` gets two (1, T, C, H, W) videos in [0, 1] on the
    VAE's device and returns {score name: value} (values may be omitted, e.g. a scorer that only collects features);
    `finish(world)`, if given, returns {score name: summary dict} over all clips of one VAE (e.g. rFVD), first
    gathering what the `world` ranks collected (collective when world > 1: each rank scored every world-th clip);
    `reset(vae)`, if given, runs before each VAE and may read it (e.g. seam scores: where its chunks in time start)."""

    names: Tuple[str, ...]
    per_clip: Callable[[torch.Tensor, torch.Tensor], Dict[str, float]]
    finish: Optional[Callable[[int], Dict[str, Dict[str, Any]]]] = None
    reset: Optional[Callable[[VideoAutoencoder], None]] = None


def _frame_metric(name: str, fn: Callable) -> Scorer:
    # a clip's value is the nan-mean over its frames (FloLPIPS is NaN on the last), as evaluate.py
    return Scorer((name,), lambda real, rec: {name: float(fn(real, rec).double().nanmean())})


def build_scorers(
    metrics: Sequence[str], device: torch.device, num_frames: int, *, lpips_net: str = "alex",
    lpips_backbone: Optional[PathLike] = None, flolpips_backbone: Optional[PathLike] = None,
    pwcnet_weights: Optional[PathLike] = None, random_weights: bool = False, i3d_weights: Optional[PathLike] = None,
) -> Tuple[List[Scorer], Dict[str, str]]:
    """The scorers for `metrics`, with their models loaded once, and {metric: reason} for those that cannot run
    (missing weights). Add new scores here: rFVD as a Scorer whose per_clip collects features and whose finish
    computes the distance; seam scores as a per-clip Scorer."""
    # the frame metrics are built exactly as eval_common_metric.py builds them
    fns, unavailable = build_frame_metrics(
        list(metrics), device, num_frames, lpips_net, lpips_backbone, flolpips_backbone, pwcnet_weights, random_weights
    )
    scorers = [_frame_metric(m, fns[m]) for m in metrics if m in fns]
    if "temporal" in metrics:
        scorers.append(_temporal_scorer())
    if "fvd" in metrics:
        i3d = build_fvd(metrics, device, num_frames, i3d_weights, random_weights, unavailable)
        if i3d is not None:
            scorers.append(_fvd_scorer(i3d, unavailable))
    return scorers, unavailable


def _temporal_scorer() -> Scorer:
    """Seam scores at the VAE's micro-chunk boundaries (this project's pipeline; none for other VAEs) and temporal
    consistency."""
    chunk: Dict[str, Optional[int]] = {"frames": None}

    def reset(vae: VideoAutoencoder) -> None:
        chunk["frames"] = vae.info.get("micro_frame_size")

    def per_clip(real: torch.Tensor, rec: torch.Tensor) -> Dict[str, float]:
        scores = temporal_scores(real, rec, chunk=chunk["frames"])[0]
        return {k: scores[k] for k in TEMPORAL_SCORES if scores.get(k) is not None}

    return Scorer(TEMPORAL_SCORES, per_clip, reset=reset)


def _fvd_scorer(i3d, unavailable: Dict[str, str]) -> Scorer:
    """rFVD over all the clips of one VAE: features per clip, the distance at the end, summed in clip order (the
    value of one rank whatever the number of ranks)."""
    features: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def reset(_vae) -> None:
        features.clear()

    def per_clip(real: torch.Tensor, rec: torch.Tensor) -> Dict[str, float]:
        features.append((i3d(real).cpu(), i3d(rec).cpu()))
        return {}

    def finish(world: int) -> Dict[str, Dict[str, Any]]:
        acc = FVDAccumulator(dim=FEATURE_DIM)
        for real, fake in gather_shares(features, world):
            acc.add_features(real, fake)
        try:
            value = acc.compute()
        except ValueError as e:  # fewer than 2 clips
            return {"fvd": {"available": False, "reason": str(e)}}
        return {"fvd": {"available": True, "mean": value, "std": None, "num_clips": acc.real.count, "per_clip": {}}}

    return Scorer(("fvd",), per_clip, finish, reset)


def _summary(values: Dict[str, Optional[float]]) -> Dict[str, Any]:
    finite = [v for v in values.values() if v is not None]
    t = torch.tensor(finite, dtype=torch.float64)
    return {"available": True, "mean": float(t.mean()) if finite else None,
            "std": float(t.std(unbiased=False)) if finite else None, "num_clips": len(finite), "per_clip": values}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_unit(video: torch.Tensor, quantise: bool) -> torch.Tensor:
    """(1, C, T, H, W) in [-1, 1] -> float32 (1, T, C, H, W) in [0, 1], clamped, optionally on 8-bit levels."""
    x = ((video.float().clamp(-1, 1) + 1) / 2).transpose(1, 2)
    return (x * 255).round() / 255 if quantise else x


def score_vae(vae: VideoAutoencoder, clips: Sequence[LoadedClip], scorers: Sequence[Scorer], protocol: Protocol,
              progress: bool = False) -> Dict[str, Any]:
    """Reconstruct every clip with `vae` and score it: per-score summaries, throughput and peak memory.

    Throughput is clips / the summed reconstruction time (encode + decode, synchronised; loading and scoring are
    outside it; the first clip, which pays one-off set-up, is included and also reported alone; with several ranks,
    all clips over the slowest rank's time). Peak memory is the
    largest over the reconstruction calls: CUDA max allocated (weights, clip and activations), or on CPU the
    process's peak RSS (everything the process holds, including the loaded clips and metric models)."""
    device = vae.device
    for s in scorers:
        if s.reset is not None:
            s.reset(vae)
    rows: List[Tuple[str, Dict[str, Optional[float]]]] = []  # (clip, its scores), in this rank's clip order
    times: List[float] = []
    peak, peak_from_reset = 0, True
    # Under torchrun each rank scores every world-th clip; values are gathered back into clip order.
    rank, world = rank_world()
    items = rank_share(clips, rank, world)
    if progress and rank == 0:
        try:
            from tqdm import tqdm

            items = tqdm(items, desc=vae.name, file=sys.stderr)
        except ImportError:
            pass
    for clip in items:
        real = clip.unit()
        x = (real * 2 - 1).transpose(0, 1).unsqueeze(0).to(device=device, dtype=vae.dtype)
        generator = None
        if vae.posterior == "sample":
            generator = torch.Generator(device=device).manual_seed(protocol.seed + clip.index)
        _sync(device)
        peak_from_reset &= reset_peak_memory(device)
        start = time.perf_counter()
        rec = vae.reconstruct(x, generator=generator)
        _sync(device)
        times.append(time.perf_counter() - start)
        peak = max(peak, peak_memory_bytes(device) or 0)
        rec = _to_unit(rec, protocol.round_output_uint8)
        real = real.unsqueeze(0).to(device)
        scores: Dict[str, Optional[float]] = {}
        with torch.no_grad():
            for s in scorers:
                scores.update((k, v if math.isfinite(v) else None) for k, v in s.per_clip(real, rec).items())
        rows.append((clip.name, scores))
        del rec, x
    values: Dict[str, Dict[str, Optional[float]]] = {n: {} for s in scorers for n in s.names}
    for name, scores in gather_shares(rows, world):
        for score, value in scores.items():
            values[score][name] = value
    timing = [(sum(times), len(times), times[:1], peak, peak_from_reset)]
    if world > 1:
        timing = [None] * world
        dist.all_gather_object(timing, (sum(times), len(times), times[:1], peak, peak_from_reset))
    total, count = max(t[0] for t in timing), sum(t[1] for t in timing)  # the slowest rank sets the pace
    times = [t for part in timing for t in part[2]]  # each rank's first clip (set-up cost)
    peak, peak_from_reset = max(t[3] for t in timing), all(t[4] for t in timing)
    results = {n: _summary(v) for n, v in values.items() if v}
    for s in scorers:
        if s.finish is not None:
            results.update(s.finish(world))
    kind = "cuda_max_allocated" if device.type == "cuda" else (
        "process_peak_rss" if peak_from_reset else "process_peak_rss_since_start")
    return {
        "metrics": results,
        "num_clips": count,
        "ranks": world,
        "reconstruct_seconds": total,
        "first_clip_seconds": times[0] if times else None,
        "throughput_clips_per_s": count / total if total > 0 else None,
        "peak_memory_bytes": peak or None,
        "peak_memory_gib": peak / 2**30 if peak else None,
        "peak_memory_kind": kind,
    }


# ----- one run ----------------------------------------------------------------------------------------------------
_PACKAGES = ("torch", "torchvision", "diffusers", "opensora-vae", "lpips", "av", "numpy", "huggingface-hub",
             "safetensors", "pandas")


def package_versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["opensora_vae"] = __version__  # the imported package (an editable install's tree)
    out["opensora_vae_git"] = _git_commit(Path(__file__).parent)
    return out


def _git_commit(folder: Path) -> Optional[str]:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def evaluate_protocol(
    protocol: Union[Protocol, PathLike],
    vae_specs: Sequence[str],
    data_root: Optional[PathLike] = None,
    *,
    clips_csv: Optional[PathLike] = None,
    device: Optional[Union[str, torch.device]] = None,
    lpips_net: str = "alex",
    lpips_backbone: Optional[PathLike] = None,
    flolpips_backbone: Optional[PathLike] = None,
    pwcnet_weights: Optional[PathLike] = None,
    i3d_weights: Optional[PathLike] = None,
    random_weights: bool = False,
    hash_clips: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> Dict[str, Any]:
    """Load the protocol's clips once, then reconstruct and score them with each VAE in turn (one VAE in memory at a
    time, so peak memory is its own). Missing, unreadable or short clips are skipped and listed; a VAE that fails
    to load or run gets an "error" entry and the others still run. `random_weights=True`: LPIPS / FloLPIPS with
    random trunks (meaningless values; tests only)."""
    protocol = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    if dist.is_initialized() and dist.get_rank() != 0:
        log = lambda msg: None  # noqa: E731 - rank 0 speaks for all
    if not vae_specs:
        raise UserError("no VAE to evaluate: pass --vae SPEC at least once")
    try:
        specs = [parse_vae_spec(s) for s in vae_specs]  # every spec checked before any work
    except ValueError as e:
        raise UserError(str(e)) from e
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"two --vae specs share the label {dup[0]!r}: add ,name=LABEL to tell them apart")
    dev = resolve_device(device)
    entries, csv = resolve_clips(protocol, data_root, clips_csv)

    clips: List[LoadedClip] = []
    records: List[Dict[str, Any]] = []
    skipped: Dict[str, str] = {}
    for index, entry in enumerate(entries):
        record: Dict[str, Any] = {"name": entry.name, "path": None if entry.path is None else str(entry.path)}
        records.append(record)
        if entry.path is None:
            skipped[entry.name] = entry.reason
            continue
        record["bytes"] = entry.path.stat().st_size
        record["sha256"] = file_sha256(entry.path) if hash_clips else None
        try:
            clip = load_protocol_clip(entry.path, protocol, entry.name)
        except VideoReadError as e:
            skipped[entry.name] = e.reason or str(e)
            continue
        record.update(clip.info)
        clip.index = index
        clips.append(clip)
    for name, reason in skipped.items():
        log(f"skipping clip {name}: {reason}")
    if not clips:
        first = next(iter(skipped.items()))
        raise UserError(f"none of the {len(entries)} clips of protocol {protocol.name} could be used "
                        f"(first: {first[0]}: {first[1]})")

    scorers, unavailable = build_scorers(
        protocol.metrics, dev, protocol.num_frames, lpips_net=lpips_net, lpips_backbone=lpips_backbone,
        flolpips_backbone=flolpips_backbone, pwcnet_weights=pwcnet_weights, random_weights=random_weights,
        i3d_weights=i3d_weights,
    )
    t = protocol.num_frames
    vaes: Dict[str, Dict[str, Any]] = {}
    for spec in specs:
        entry: Dict[str, Any] = {"spec": spec.text, "frames_scored": t}
        vaes[spec.name] = entry
        vae = None
        try:
            vae = load_autoencoder(spec, dev, protocol.torch_dtype, protocol.posterior)
            entry.update(vae.describe(), frames_fed=vae.frames_needed(t))
            log(f"{spec.name}: {t} frames fed as {entry['frames_fed']} (rule {vae.frame_rule}), {len(clips)} clips")
            entry.update(score_vae(vae, clips, scorers, protocol, progress=progress))
        except (ValueError, OSError) as e:  # cannot load, or refuses the clips (a wrong length rule)
            entry["error"] = " ".join(str(e).split())
            log(f"{spec.name} failed: {entry['error']}")
        except torch.cuda.OutOfMemoryError as e:
            entry["error"] = "CUDA out of memory: " + " ".join(str(e).split())[:300]
            log(f"{spec.name} failed: out of memory")
        for name, reason in unavailable.items():
            entry.setdefault("metrics", {})[name] = {"available": False, "reason": reason}
        if "metrics" in entry:  # the protocol's order
            entry["metrics"] = {m: entry["metrics"][m] for m in protocol.metrics if m in entry["metrics"]} | {
                k: v for k, v in entry["metrics"].items() if k not in protocol.metrics}
        del vae
        _release(dev)

    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    return {
        "protocol": {"name": protocol.name, "sha256": protocol.sha256, "file": protocol.source,
                     "content": protocol.content},
        "clip_list_sha256": hashlib.sha256(canonical_json([e.name for e in entries])).hexdigest(),
        "clips_csv": None if csv is None else str(csv),
        "clips_csv_sha256": file_sha256(csv) if csv is not None and csv.is_file() else None,
        "clips": records,
        "num_clips_listed": len(entries),
        "num_clips_scored": len(clips),
        "skipped_clips": skipped,
        "environment": {"packages": package_versions(), "device": str(dev), "device_name": device_name,
                        "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        "options": {"lpips_net": lpips_net, "random_weights": random_weights, "hash_clips": hash_clips,
                    "lpips_backbone": None if lpips_backbone is None else str(lpips_backbone),
                    "flolpips_backbone": None if flolpips_backbone is None else str(flolpips_backbone),
                    "pwcnet_weights": None if pwcnet_weights is None else str(pwcnet_weights),
                    "i3d_weights": None if i3d_weights is None else str(i3d_weights)},
        "vaes": vaes,
    }


def _reported_temporal(result: Dict[str, Any]) -> List[str]:
    """The temporal scores some VAE of the report has (seam scores only where a VAE has chunks in time)."""
    return [m for m in TEMPORAL_SCORES if any(m in v.get("metrics", {}) for v in result["vaes"].values())]


def format_report(result: Dict[str, Any]) -> str:
    """Plain-text table: one row per VAE with each score's mean (`temporal`: its scores, as the JSON holds them),
    clips/s and peak memory."""
    metrics = [m for name in result["protocol"]["content"]["metrics"]
               for m in (_reported_temporal(result) if name == "temporal" else (name,))]
    width = {m: max(9, len(m)) for m in metrics}
    head = (f"{'vae':<28} {'fed':>4} " + " ".join(f"{m:>{width[m]}}" for m in metrics)
            + f" {'clips/s':>8} {'peak GiB':>9}")
    rows = [f"protocol {result['protocol']['name']} ({result['protocol']['sha256'][:12]}), "
            f"{result['num_clips_scored']}/{result['num_clips_listed']} clips", head]
    for name, v in result["vaes"].items():
        if "error" in v:
            rows.append(f"{name:<28} error: {v['error']}")
            continue
        cells = []
        for m in metrics:
            r = v["metrics"].get(m, {})
            cells.append(f"{r['mean']:>{width[m]}.4f}" if r.get("available") and r.get("mean") is not None
                         else f"{'n/a':>{width[m]}}")
        tput, peak = (float("nan") if x is None else x for x in (v["throughput_clips_per_s"], v["peak_memory_gib"]))
        rows.append(f"{name:<28} {v['frames_fed']:>4} " + " ".join(cells) + f" {tput:>8.3f} {peak:>9.2f}")
    reasons = {m: r["reason"] for v in result["vaes"].values() for m, r in v.get("metrics", {}).items()
               if not r.get("available", True)}  # the same for every VAE: listed once
    rows += [f"{m} unavailable: " + " ".join(reason.split()) for m, reason in reasons.items()]
    return "\n".join(rows)
