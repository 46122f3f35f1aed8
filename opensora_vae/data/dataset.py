"""CSV-driven video/image dataset for VAE training, and the mixed video/image batch strategies."""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate

from .. import storage
from ..schema import Fraction, PositiveInt
from ..registry import DATASETS
from .transforms import center_crop_image, resize_crop, to_model_range
from .video import ShortVideoError, VideoReadError, is_image_path, probe_video, read_frames, read_image

__all__ = ["VideoTextDataset", "apply_mixed_strategy", "collate_clips", "MIXED_STRATEGIES"]

logger = logging.getLogger("opensora_vae.data")

MIXED_STRATEGIES = (None, "mixed_video_image", "mixed_video_random")
IMAGE_FRAMES = ("repeat", "single")
_warned_overstated: set[str] = set()  # paths whose overstated frame count this process has logged


def _generator(seed: int, epoch: int, index: int) -> torch.Generator:
    # SeedSequence mixes the triple well, so neighbouring indices/epochs get unrelated streams
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2)
    g = torch.Generator()
    g.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return g


def _opt_float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


@DATASETS.register_module()
class VideoTextDataset(Dataset):
    """Clips of `num_frames` frames from the videos and images listed in a CSV, sampled as the reference does.

    CSV columns: `path` (required; relative paths are taken from the CSV's folder, a URL's too: storage.py); optional
    `num_frames` (drops too-short videos up front and saves a probe), `fps` and `text` are used when
    present; `height`/`width` and any other columns are accepted and ignored (frames get resized).

    Each item is `{"video": float32 (C, T, H, W) in [-1, 1], "index": int, "path": str, "fps": float,
    "skipped": str}` (`skipped`: newline-joined paths of bad rows passed over to reach this one),
    `"frame_indices"` (T,) (the source frames read; 0 for an image) and `"source_size"` (2,) (height, width before
    resizing), plus `"text"` ("" where blank) when the CSV has that column. `index` is the row actually loaded (it
    differs from the requested one when a bad row was substituted) and `fps` is the clip's effective rate,
    source fps / frame_interval (0.0 for images).

    Temporal window (the reference's TemporalRandomCrop): start uniform in 0..max(0, N - num_frames *
    frame_interval - 1) for a video of N frames, then `num_frames` indices spread by
    linspace(start, end - 1) (truncated) up to end = min(start + num_frames * frame_interval, N); a video
    needs at least `num_frames` frames (a shorter span than num_frames * frame_interval is spread thinner).
    Spatial: `crop="center"` is the reference's "center" transform (videos: scale by size / short side,
    bilinear in float, no antialias unless `antialias=True`, centre crop; images: the ADM centre crop);
    `crop="random"` scales the same way and crops a random window.

    `permute_channels=p` shuffles a sample's colour channels with probability p (not in the published recipe: a
    colour augmentation that keeps a model trained on a few scenes from learning their colour casts; every demo
    stage uses it).

    Images: `image_frames="repeat"` (the reference) repeats the image to `num_frames` frames, a static clip,
    so images and videos mix in one batch; `"single"` gives a 1-frame clip (e.g. to encode images alone).

    Randomness (temporal window start, random crop) comes from a generator seeded by
    (seed, epoch, row), so a sample is identical across resumes, ranks and worker counts. Call
    `set_epoch` before building each epoch's DataLoader iterator; with `persistent_workers=True` the
    workers keep the dataset copy they started with, so the epoch would not reach them.

    Bad rows (missing, unreadable or too-short files) are logged once per path on the
    `opensora_vae.data` logger, recorded in `bad_rows` (path -> reason) and replaced by the next
    good row, (idx + 1) % len. Counters are per process (each DataLoader worker has its own).

    A video whose header (or `num_frames` column) overstates its length: a window reaching past the frames that
    decode is drawn again within those (the same generator state, so a row's window does not depend on which row
    found the file out); the count is logged once per file and kept in `decodable` (path -> frames), and such
    files are read by a plain decode. Only a file with fewer than `num_frames` decodable frames is a bad row.
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        num_frames: PositiveInt = 17,
        frame_interval: PositiveInt = 1,
        image_size: PositiveInt | Tuple[PositiveInt, PositiveInt] = (256, 256),
        crop: str = "center",
        seed: int = 0,
        image_frames: str = "repeat",
        antialias: bool = False,
        permute_channels: Fraction = 0.0,
    ):
        if num_frames < 1 or frame_interval < 1:
            raise ValueError(f"num_frames and frame_interval must be >= 1, got {num_frames}, {frame_interval}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if image_frames not in IMAGE_FRAMES:
            raise ValueError(f"image_frames must be one of {IMAGE_FRAMES}, got {image_frames!r}")
        data_path = os.fspath(data_path)
        self.data_path = data_path if storage.is_url(data_path) else os.path.abspath(data_path)
        self.num_frames = int(num_frames)
        self.frame_interval = int(frame_interval)
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.image_size = tuple(int(v) for v in size)
        self.crop = crop
        self.seed = int(seed)
        self.image_frames = image_frames
        self.antialias = bool(antialias)
        if not 0.0 <= permute_channels <= 1.0:
            raise ValueError(f"permute_channels is a probability, got {permute_channels}")
        self.permute_channels = float(permute_channels)
        self.epoch = 0
        self.bad_rows: dict[str, str] = {}
        self.decodable: dict[str, int] = {}  # frames that decode, for files whose header says more
        self.num_skipped = 0
        self.data = self._load_csv()

    # ------------------------------------------------------------------ construction

    def _load_csv(self) -> pd.DataFrame:
        csv = storage.redact(self.data_path)
        if not storage.isfile(self.data_path):
            raise FileNotFoundError(f"dataset CSV {csv} does not exist")
        try:
            with storage.open_read(self.data_path) as f:
                df = pd.read_csv(f)
        except pd.errors.EmptyDataError as e:
            raise ValueError(f"dataset CSV {csv} is empty") from e
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise ValueError(f"dataset CSV {csv} cannot be parsed: {e}") from e
        if "path" not in df.columns:
            raise ValueError(f"dataset CSV {csv} has no 'path' column (columns: {list(df.columns)})")
        df = df[df["path"].notna() & (df["path"].astype(str).str.strip() != "")]
        if len(df) == 0:
            raise ValueError(f"dataset CSV {csv} has no rows with a path")
        root = storage.dirname(self.data_path)
        paths = [storage.resolve(root, p) for p in df["path"].astype(str)]
        df = df.assign(path=paths)

        if "num_frames" in df.columns:
            known = pd.to_numeric(df["num_frames"], errors="coerce")
            is_img = df["path"].map(is_image_path)
            short = (~is_img) & known.notna() & (known < self.num_frames)
            if short.any():
                logger.info(
                    "%s: dropped %d of %d rows shorter than %d frames (num_frames column)",
                    csv, int(short.sum()), len(df), self.num_frames,
                )
                df = df[~short]
            if len(df) == 0:
                raise ValueError(f"dataset CSV {csv}: every row is shorter than {self.num_frames} frames "
                                 f"(num_frames={self.num_frames}, frame_interval={self.frame_interval})")
        df = df.reset_index(drop=True)

        # stop at the first existing file: enough to know the dataset is not all-bad, cheap on big CSVs
        for p in df["path"]:
            if storage.isfile(p):
                break
            self._mark_bad(p, "file does not exist")
        else:
            raise ValueError(f"dataset CSV {csv}: none of the {len(df)} files exist (first: "
                             f"{storage.redact(df['path'].iloc[0])})")
        return df

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _mark_bad(self, path: str, reason: str) -> None:
        if path not in self.bad_rows:
            self.bad_rows[path] = reason
            logger.warning("skipping %s: %s", storage.redact(path), reason)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        idx = int(index) % n
        skipped = []
        for _ in range(n):
            path = self.data.at[idx, "path"]
            if path not in self.bad_rows:
                try:
                    item = self.load_row(idx)
                    # Rows skipped on the way, so the main process can count them (workers' counters are private).
                    item["skipped"] = "\n".join(skipped)
                    return item
                except VideoReadError as e:
                    self._mark_bad(path, e.reason or str(e))
            skipped.append(path)
            self.num_skipped += 1
            idx = (idx + 1) % n
        raise RuntimeError(
            f"dataset CSV {storage.redact(self.data_path)}: all {n} rows are unreadable "
            f"({len(self.bad_rows)} bad paths)"
        )

    def load_row(self, idx: int) -> dict[str, Any]:
        """Row `idx` as an item, without substitution: raises VideoReadError for a bad row."""
        row = self.data.iloc[idx]
        path = row["path"]
        g = _generator(self.seed, self.epoch, idx)
        if is_image_path(path):
            fps = 0.0
            frames = read_image(path)
            source_size = list(frames.shape[-2:])
            if self.crop == "center":
                frames = center_crop_image(frames, self.image_size).float() / 255.0
            else:
                frames = resize_crop(frames.float() / 255.0, self.image_size, crop=self.crop, generator=g,
                                     antialias=self.antialias)
            if self.image_frames == "repeat":
                frames = frames.expand(self.num_frames, -1, -1, -1)
            indices = [0] * frames.shape[0]
        else:
            frames, fps, indices = self._read_clip(path, row, g)
            source_size = list(frames.shape[-2:])
            frames = resize_crop(frames.float() / 255.0, self.image_size, crop=self.crop, generator=g,
                                 antialias=self.antialias)
        if self.permute_channels and float(torch.rand((), generator=g)) < self.permute_channels:
            frames = frames[:, torch.randperm(frames.shape[1], generator=g)]
        item = {"video": to_model_range(frames), "index": idx, "path": path, "fps": fps,
                "frame_indices": torch.tensor(indices), "source_size": torch.tensor(source_size)}
        if "text" in row.index:  # always present with the column, so default_collate sees the same keys
            item["text"] = row["text"] if isinstance(row["text"], str) else ""
        return item

    def _read_clip(self, path: str, row: pd.Series, g: torch.Generator) -> tuple[torch.Tensor, float, list[int]]:
        total = _opt_float(row.get("num_frames"))
        source = "the header" if total is None else "the num_frames column"
        fps = _opt_float(row.get("fps"))
        if total is None or fps is None:
            info = probe_video(path)
            total = total or info.num_frames
            fps = fps or info.fps
        total = int(total)
        if total < self.num_frames:
            raise VideoReadError(path, f"has {total} frames, a clip needs {self.num_frames}")
        state = g.get_state()
        indices = self.clip_indices(total, g)
        fps = (fps or 0.0) / self.frame_interval
        decodable = self.decodable.get(path)
        if decodable is None:
            try:
                return read_frames(path, indices), fps, indices
            except ShortVideoError as e:
                decodable = e.decoded if e.decoded is not None else probe_video(path, decode=True).num_frames
            self.decodable[path] = decodable
            if decodable >= self.num_frames and path not in _warned_overstated:  # too few: the skip says so
                _warned_overstated.add(path)
                logger.warning("%s: %s says %d frames, %d decode; clips are drawn within those",
                               storage.redact(path), source, total, decodable)
        if decodable < self.num_frames:
            raise VideoReadError(path, f"has {decodable} decodable frames ({source} says {total}), "
                                       f"a clip needs {self.num_frames}")
        if max(indices) >= decodable:
            g.set_state(state)  # the draw this row gets whenever the count is known, so any reader agrees
            indices = self.clip_indices(decodable, g)
        # a plain decode: the pts of such files (e.g. AVI with empty chunks) are spread over the longer timeline
        return read_frames(path, indices, seek=False), fps, indices

    def clip_indices(self, total: int, generator: torch.Generator) -> list[int]:
        """The reference's temporal window over a video of `total` frames (see the class docstring)."""
        size = self.num_frames * self.frame_interval
        start = int(torch.randint(0, max(0, total - size - 1) + 1, (1,), generator=generator))
        end = min(start + size, total)
        return np.linspace(start, end - 1, self.num_frames, dtype=int).tolist()


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Any]:
    """default_collate, with a clear error when a batch mixes clip shapes."""
    shapes = sorted({tuple(item["video"].shape) for item in items})
    if len(shapes) > 1:
        paths = ", ".join(item["path"] for item in items)
        raise ValueError(f"a batch mixes clip shapes {shapes} ({paths}): with image_frames='single' images are "
                         f"1-frame clips, so use batch_size=1 or keep images and videos in separate CSVs")
    return default_collate(items)


def apply_mixed_strategy(
    video: torch.Tensor,
    strategy: str | None,
    mixed_image_ratio: float = 0.0,
    generator: torch.Generator | None = None,
    lengths: Sequence[int] | None = None,
) -> torch.Tensor:
    """Shorten a (B, C, T, H, W) batch in time, as Open-Sora's VAE training does.

    None: unchanged. "mixed_video_image": with probability `mixed_image_ratio` keep only the first
    frame. "mixed_video_random": keep the first L frames, L uniform in 1..T, or uniform over `lengths` (the
    lengths <= T a model takes, e.g. 1, 5, 9 for 4k+1). Exactly one draw from `generator` per call for the random
    strategies, so its state can be checkpointed and replayed.
    """
    if strategy is None:
        return video
    if video.ndim != 5:
        raise ValueError(f"expected (B, C, T, H, W), got shape {tuple(video.shape)}")
    if strategy == "mixed_video_image":
        if float(torch.rand((), generator=generator)) < mixed_image_ratio:
            return video[:, :, :1]
        return video
    if strategy == "mixed_video_random":
        if lengths is None:
            length = int(torch.randint(1, video.shape[2] + 1, (), generator=generator))
        else:
            valid = [n for n in lengths if 1 <= n <= video.shape[2]]
            if not valid:
                raise ValueError(f"no length of {list(lengths)} fits a clip of {video.shape[2]} frames")
            length = valid[int(torch.randint(len(valid), (), generator=generator))]
        return video[:, :, :length]
    raise ValueError(f"unknown mixed strategy {strategy!r}; expected one of {MIXED_STRATEGIES}")
