"""Video and image IO: PyAV for video, PIL for still images.

Conventions: everything read or written here is uint8 RGB laid out (T, C, H, W); the model's float
(C, T, H, W) in [-1, 1] layout is converted with `ensure_uint8_video` before writing. Paths may be URLs (storage.py):
PyAV reads them through a seekable file with range reads; writes go through `storage.committed`.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import av
import numpy as np
import torch
from PIL import Image, ImageOps

from .. import storage

__all__ = [
    "FrameIndex",
    "IMAGE_EXTENSIONS",
    "ShortVideoError",
    "VideoInfo",
    "VideoReadError",
    "ensure_uint8_video",
    "frame_index",
    "is_image_path",
    "probe_video",
    "read_frames",
    "read_image",
    "read_video",
    "write_image",
    "write_video",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})


class VideoReadError(RuntimeError):
    """A video or image could not be read; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        self.path = str(path)
        self.reason = reason
        super().__init__(self.path if reason is None else f"{self.path}: {reason}")

    def __reduce__(self):  # keep it picklable across DataLoader workers
        return type(self), (self.path, self.reason)


class ShortVideoError(VideoReadError):
    """Fewer frames decode than a read asked for. `decoded`: how many do (counted from the start), or None when
    the read did not start at frame 0 or stopped at the container's frame count."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None, decoded: int | None = None):
        super().__init__(path, reason)
        self.decoded = decoded

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.decoded)


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def is_image_path(path: str | os.PathLike) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- reading


def _source(path: str):
    """What PyAV opens: a local path as it is, a URL as a seekable file with range reads (storage.open_read). A
    missing file is a VideoReadError (a bad row); a URL that cannot be reached a storage.StorageError."""
    if not storage.is_url(path):
        if not os.path.isfile(path):
            raise VideoReadError(path, "file does not exist")
        return path
    try:
        return storage.open_read(path)
    except FileNotFoundError as e:
        raise VideoReadError(storage.redact(path), "file does not exist") from e


@contextlib.contextmanager
def _open(path: str | os.PathLike):
    """A container with its first video stream, every failure mapped to VideoReadError; closed on exit."""
    path = str(path)
    source = _source(path)
    try:
        try:
            container = av.open(source)
        except storage.StorageError:
            raise  # the store, not the file: not a bad row
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoReadError(storage.redact(path), f"cannot open container ({type(e).__name__}: {e})") from e
        try:
            if not container.streams.video:
                raise VideoReadError(storage.redact(path), "no video stream")
            stream = container.streams.video[0]
            cc = stream.codec_context
            # Decoder threads take milliseconds to start per open: for thumbnails (the demo's 64-px cache) that is more
            # than the decode itself, measured with no gain up to 256 px; from 640x272 on they pay.
            cc.thread_type = "AUTO" if (cc.width or 0) * (cc.height or 0) >= 160 * 160 else "NONE"
            yield container, stream
        finally:
            container.close()
    finally:
        if source is not path:
            source.close()


def _rate(stream) -> Fraction | None:
    for r in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if r is not None and r > 0:
            return Fraction(r)
    return None


@dataclass(frozen=True)
class FrameIndex:
    """A video stream's frames as its packets say, from demuxing only (no decoding).

    Frame k is the k-th in presentation order, counted from the stream's first frame whatever its start time (a
    non-zero start, an audio stream that starts first, an edit list). Empty packets (AVI padding) and packets an
    edit list cuts (the decoder drops them) are not frames. `pts` is None where timestamps cannot number the frames
    (a packet without one, or two with the same one); the count still holds.
    """

    count: int
    pts: np.ndarray | None  # (count,) int64, strictly increasing, in the stream's time_base
    keyframes: np.ndarray | None  # frame numbers of the keyframe packets, increasing

    def frame_of(self, pts: int | None) -> int | None:
        """The frame number of a decoded frame's pts; None when no packet has that pts."""
        if pts is None or self.pts is None:
            return None
        k = int(np.searchsorted(self.pts, pts))
        return k if k < self.count and self.pts[k] == pts else None


def _build_index(path: str) -> FrameIndex:
    pts: list[int | None] = []
    keys: list[bool] = []
    with _open(path) as (container, stream):
        try:
            for p in container.demux(stream):
                if p.size > 0 and not p.is_discard:
                    pts.append(p.pts)
                    keys.append(p.is_keyframe)
        except av.FFmpegError:
            pass  # a damaged tail: the packets before it still number their frames; reads past them decode plainly
    if not pts or None in pts:
        return FrameIndex(len(pts), None, None)
    order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
    sorted_pts = np.asarray(pts, dtype=np.int64)[order]
    if np.any(np.diff(sorted_pts) <= 0):
        return FrameIndex(len(pts), None, None)
    return FrameIndex(len(pts), sorted_pts, np.flatnonzero(np.asarray(keys, dtype=bool)[order]))


@functools.lru_cache(maxsize=256)
def _cached_index(path: str, size: int, version: str) -> FrameIndex:
    return _build_index(path)


def frame_index(path: str | os.PathLike) -> FrameIndex:
    """The FrameIndex of a video file, built once per process (and DataLoader worker) while the file is unchanged
    (an LRU cache keyed by path, size and version: mtime, or a URL's ETag)."""
    path = os.fspath(path) if storage.is_url(path) else os.path.abspath(os.fspath(path))
    try:
        size, version = storage.info(path)
    except OSError as e:
        raise VideoReadError(storage.redact(path), "file does not exist") from e
    return _cached_index(path, size, version)


def probe_video(path: str | os.PathLike, decode: bool = False) -> VideoInfo:
    """Frame count, fps and size. The count is the container's, else the number of frames its packets hold (the
    FrameIndex); `decode=True` counts the frames that actually decode instead (a full decode, no pixel
    conversion), for files whose header overstates it."""
    with _open(path) as (container, stream):
        try:
            if decode:
                n = sum(1 for _ in _decode(container, stream, path))
            else:
                n = stream.frames or frame_index(path).count
            rate = _rate(stream)
            cc = stream.codec_context
            return VideoInfo(num_frames=int(n), fps=float(rate) if rate else 0.0, height=cc.height, width=cc.width)
        except av.FFmpegError as e:
            raise VideoReadError(path, f"cannot probe ({type(e).__name__}: {e})") from e


def _to_rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def _stack(frames: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def _decode(container, stream, path, packets=None) -> Iterator:
    """The stream's frames, or those of `packets` (demuxed from it) when given."""
    try:
        if packets is None:
            yield from container.decode(stream)
        else:
            for packet in packets:
                yield from packet.decode()
    except av.FFmpegError as e:
        raise VideoReadError(path, f"decoding failed ({type(e).__name__}: {e})") from e


def _collect(frames_iter, wanted: set[int], last: int, path) -> dict[int, np.ndarray]:
    """A decode from the start: the i-th frame out is frame i. Keep the wanted ones."""
    out: dict[int, np.ndarray] = {}
    idx = -1
    for idx, frame in enumerate(frames_iter):
        if idx in wanted:
            out[idx] = _to_rgb(frame)
        if idx >= last:
            return out
    raise ShortVideoError(path, f"has only {idx + 1} frames, asked for frame index {last}", decoded=idx + 1)


def read_frames(path: str | os.PathLike, indices: Sequence[int], seek: bool = True) -> torch.Tensor:
    """The frames at 0-based `indices` as uint8 (T, C, H, W) RGB, in the order given.

    Frame k is the k-th frame in presentation order, as a decode from the start gives them. With `seek`, the
    frame numbers come from the file's packet timestamps (`frame_index`, cached per process): it seeks to the
    keyframe at or before the first wanted frame, decodes forward to the last one and numbers each frame by its
    pts, so a non-zero start time, an audio stream that starts first, an edit list, a variable frame rate or an
    inexact average rate cannot shift a window. Where the timestamps cannot number the frames (missing or repeated
    ones, fewer packets than the window needs, decoded frames the packets do not explain) it decodes from the
    start instead, as `seek=False` always does.

    Raises ShortVideoError when fewer frames decode than the largest index needs.
    """
    path = str(path)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("read_frames needs at least one index")
    if min(indices) < 0:
        raise ValueError(f"negative frame index in {indices}")
    first, last, wanted = min(indices), max(indices), set(indices)
    frames = None
    index = frame_index(path) if seek and first > 0 else None
    if index is not None and index.pts is not None and last < index.count:  # else: a plain decode says how many
        frames = _read(path, last, lambda c, s: _read_seeking(c, s, index, first, last, wanted, path))
    if frames is None:  # a fresh container, so no seek state is left to undo
        frames = _read(path, last, lambda c, s: _collect(_decode(c, s, path), wanted, last, path))
    return _stack([frames[i] for i in indices])


def _read(path: str, last: int, read):
    """`read(container, stream)` on a freshly opened file, after checking the header's frame count."""
    with _open(path) as (container, stream):
        try:
            if stream.frames and last >= stream.frames:
                raise ShortVideoError(path, f"has only {stream.frames} frames, asked for frame index {last}")
            return read(container, stream)
        except av.FFmpegError as e:
            raise VideoReadError(path, f"decoding failed ({type(e).__name__}: {e})") from e


_LATE = object()  # a seek landed after the first wanted frame


def _read_seeking(container, stream, index: FrameIndex, first: int, last: int, wanted: set[int],
                  path) -> dict[int, np.ndarray] | None:
    """The wanted frames by seeking, numbered by pts through `index`; None: decode from the start instead."""
    keys = index.keyframes
    k = int(np.searchsorted(keys, first, side="right")) - 1  # the last keyframe at or before the first wanted frame
    step = 1
    while k > 0:
        container.seek(int(index.pts[keys[k]]), stream=stream, backward=True, any_frame=False)
        frames = _collect_numbered(container, stream, index, first, last, wanted, path)
        if frames is not _LATE:
            return frames
        # a seek index by dts (B-frames) or a search by byte position (MPEG-TS) can land on a later keyframe
        k, step = max(0, k - step), step * 2
    return None


def _collect_numbered(container, stream, index: FrameIndex, first: int, last: int, wanted: set[int], path):
    """After a seek: the wanted frames, each numbered by its pts, decoded from the first keyframe packet on. Frames
    before that keyframe are passed over (the leading pictures of an open GOP may be missing or broken). _LATE: it
    is after the first wanted frame; None: a pts is no packet's, or frames come out missing or out of order."""
    packets = container.demux(stream)
    head = next((p for p in packets if p.size == 0 or (p.is_keyframe and not p.is_discard)), None)
    if head is None or head.size == 0:
        return _LATE  # no keyframe after the seek point
    key = index.frame_of(head.pts)
    if key is None:
        return None
    if key > first:
        return _LATE
    out: dict[int, np.ndarray] = {}
    expect = key
    for frame in _decode(container, stream, path, _chain(head, packets)):
        idx = index.frame_of(frame.pts)
        if idx is None:
            return None
        if idx < key:
            continue
        if idx != expect:
            return None
        if idx in wanted:
            out[idx] = _to_rgb(frame)
        if idx >= last:
            return out
        expect += 1
    return None


def _chain(head, rest):
    yield head
    yield from rest


def read_video(path: str | os.PathLike) -> tuple[torch.Tensor, float]:
    """All frames as uint8 (T, C, H, W) and the stream's average fps."""
    with _open(path) as (container, stream):
        rate = _rate(stream)
        frames = [_to_rgb(f) for f in _decode(container, stream, path)]
    if not frames:
        raise VideoReadError(path, "no decodable frames")
    return _stack(frames), float(rate) if rate else 0.0


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image as uint8 (1, 3, H, W) RGB.

    EXIF orientation is applied, grayscale is replicated to RGB, and transparency is composited on
    white (so transparent regions look like a blank page rather than black).
    """
    path = str(path)
    source = _source(path)
    try:
        with Image.open(source) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L"):
                # 16-bit grayscale: keep the high byte instead of letting PIL clip to 255
                arr = (np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(arr)
            has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                img.mode == "P" and "transparency" in img.info
            )
            if has_alpha:
                rgba = img.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(canvas, rgba).convert("RGB")
            else:
                img = img.convert("RGB")
            arr = np.asarray(img, dtype=np.uint8).copy()
    except storage.StorageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise VideoReadError(storage.redact(path), f"cannot read image ({type(e).__name__}: {e})") from e
    finally:
        if source is not path:
            source.close()
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


# --------------------------------------------------------------------------- writing


def ensure_uint8_video(x: torch.Tensor) -> torch.Tensor:
    """Model output float (C, T, H, W) in [-1, 1] -> uint8 (T, C, H, W), rounded; uint8 passes through."""
    if x.dtype == torch.uint8:
        return x
    if x.ndim != 4:
        raise ValueError(f"expected a (C, T, H, W) tensor, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 0, 2, 3).contiguous()


def _check_frames(frames: torch.Tensor) -> np.ndarray:
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.ndim != 4:
        raise ValueError("write_video expects a uint8 tensor (T, C, H, W); use ensure_uint8_video for model output")
    if frames.shape[1] not in (1, 3) or frames.shape[0] == 0:
        raise ValueError(f"expected (T, C, H, W) with T >= 1 and C in (1, 3), got {tuple(frames.shape)}")
    if frames.shape[1] == 1:
        frames = frames.expand(-1, 3, -1, -1)
    return frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _fps_fraction(fps: float) -> Fraction:
    ntsc = round(fps * 1.001)
    if ntsc % 6 == 0 and abs(fps - ntsc / 1.001) < 1e-3:
        return Fraction(ntsc * 1000, 1001)  # 23.976, 29.97, 59.94 -> the exact NTSC rates
    return Fraction(fps).limit_denominator(1001)


def _encode(tmp: Path, arr: np.ndarray, fps: float, codec: str, crf: int, keyframe_every: int | None) -> None:
    t, h, w, _ = arr.shape
    rate = _fps_fraction(fps)
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = w, h
        if keyframe_every is not None:
            stream.codec_context.gop_size = keyframe_every
        if codec == "libx264":
            # x264 cannot do 4:2:0 at odd sizes; 4:4:4 keeps the exact size instead of padding
            stream.pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
            stream.options = {"crf": str(crf), "preset": "medium"}
        else:
            stream.pix_fmt = "yuv420p"  # mpeg4 accepts odd sizes
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = 2 * 118  # -q:v 2 (FF_QP2LAMBDA = 118)
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(arr[i], format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_video(path: str | os.PathLike, frames: torch.Tensor, fps: float, crf: int = 18,
                keyframe_every: int | None = None) -> None:
    """Write uint8 (T, C, H, W) RGB frames with H.264 (libx264) when available, else MPEG-4 Part 2.

    keyframe_every: the GOP size (1: every frame a keyframe, so reading any frame decodes only that frame; None:
    the encoder's default).

    Written to a temporary file and committed whole (storage.committed: a rename, or one upload to a URL), so
    readers never see a partial file.
    """
    path = str(path)
    arr = _check_frames(frames)
    if keyframe_every is not None and keyframe_every < 1:
        raise ValueError(f"keyframe_every must be a positive number of frames or None, got {keyframe_every}")
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    codecs = [c for c in ("libx264", "mpeg4") if c in av.codecs_available]
    if not codecs:
        raise RuntimeError("this PyAV build has neither libx264 nor mpeg4 encoders")
    with storage.committed(path) as tmp:
        err: Exception | None = None
        for codec in codecs:
            try:
                _encode(Path(tmp), arr, float(fps), codec, crf, keyframe_every)
                return
            except (av.FFmpegError, ValueError) as e:
                err = e
        raise RuntimeError(f"could not encode {storage.redact(path)} with {codecs}: {err}") from err


def write_image(path: str | os.PathLike, frame: torch.Tensor) -> None:
    """Write one uint8 (C, H, W) frame (C = 1 or 3) with PIL, atomically; format from the extension."""
    path = str(path)
    ok = isinstance(frame, torch.Tensor) and frame.dtype == torch.uint8 and frame.ndim == 3
    if not ok or frame.shape[0] not in (1, 3):
        raise ValueError("write_image expects a uint8 tensor (C, H, W) with C in (1, 3)")
    arr = frame.permute(1, 2, 0).contiguous().cpu().numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise ValueError(f"unknown image extension for {storage.redact(path)}")
    with storage.committed(path) as tmp:
        img.save(tmp, format=fmt)
