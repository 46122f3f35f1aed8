"""Video and image IO: PyAV for video, PIL for still images.

Conventions: everything read or written here is uint8 RGB laid out (T, C, H, W); the model's float
(C, T, H, W) in [-1, 1] layout is converted with `ensure_uint8_video` before writing.
"""
from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import av
import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "ShortVideoError",
    "VideoInfo",
    "VideoReadError",
    "ensure_uint8_video",
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


def _open(path: str | os.PathLike):
    """Open a container with its first video stream, mapping every failure to VideoReadError."""
    path = str(path)
    if not os.path.isfile(path):
        raise VideoReadError(path, "file does not exist")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoReadError(path, f"cannot open container ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoReadError(path, "no video stream")
    stream = container.streams.video[0]
    cc = stream.codec_context
    # Decoder threads take milliseconds to start per open: for thumbnails (the demo's 64-px cache) that is more than the
    # decode itself, measured with no gain up to 256 px; from 640x272 on they pay.
    cc.thread_type = "AUTO" if (cc.width or 0) * (cc.height or 0) >= 160 * 160 else "NONE"
    return container, stream


def _rate(stream) -> Fraction | None:
    for r in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if r is not None and r > 0:
            return Fraction(r)
    return None


def _count_packets(container, stream) -> int:
    # demuxing only reads packets; no decoding happens
    return sum(1 for p in container.demux(stream) if p.size > 0)


def probe_video(path: str | os.PathLike, decode: bool = False) -> VideoInfo:
    """Frame count, fps and size. The count is the container's, else the number of packets; `decode=True` counts
    the frames that actually decode instead (a full decode, no pixel conversion), for files whose header
    overstates it."""
    container, stream = _open(path)
    try:
        if decode:
            n = sum(1 for _ in _decode(container, stream, path))
        else:
            n = stream.frames or _count_packets(container, stream)
        rate = _rate(stream)
        cc = stream.codec_context
        return VideoInfo(num_frames=int(n), fps=float(rate) if rate else 0.0, height=cc.height, width=cc.width)
    except av.FFmpegError as e:
        raise VideoReadError(path, f"cannot probe ({type(e).__name__}: {e})") from e
    finally:
        container.close()


def _to_rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def _stack(frames: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def _decode(container, stream, path) -> Iterator:
    try:
        yield from container.decode(stream)
    except av.FFmpegError as e:
        raise VideoReadError(path, f"decoding failed ({type(e).__name__}: {e})") from e


def _collect(frames_iter, first_index: int, wanted: set[int], last: int, path,
             pts_index=None) -> dict[int, np.ndarray] | None:
    """Frame i of the iterator is frame `first_index + i` of the video; keep the wanted ones.

    `pts_index` (after a seek: pts -> frame index): None is returned when a frame's pts is more than a frame away
    from its count, i.e. the timestamps do not step one frame per frame (spread or variable), so the anchor the
    count started from cannot be trusted either.
    """
    out: dict[int, np.ndarray] = {}
    idx = first_index - 1
    for idx, frame in enumerate(frames_iter, start=first_index):
        if pts_index is not None and frame.pts is not None and abs(pts_index(frame.pts) - idx) > 1:
            return None
        if idx in wanted:
            out[idx] = _to_rgb(frame)
        if idx >= last:
            return out
    decoded = idx + 1 if pts_index is None else None  # counted from frame 0 only without a seek anchor
    raise ShortVideoError(path, f"has only {idx + 1} frames, asked for frame index {last}", decoded=decoded)


def read_frames(path: str | os.PathLike, indices: Sequence[int], seek: bool = True) -> torch.Tensor:
    """The frames at 0-based `indices` as uint8 (T, C, H, W) RGB, in the order given.

    Seeks to the keyframe at or before the first wanted frame and decodes forward only to the last
    one. The first decoded frame after the seek is located from its pts (stream time_base and
    average rate); later frames are counted from it, so indices match a decode from the start. Where the
    timestamps do not step one frame per frame, it decodes from the start instead, as `seek=False` always does.

    Raises ShortVideoError when fewer frames decode than the largest index needs.
    """
    path = str(path)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("read_frames needs at least one index")
    if min(indices) < 0:
        raise ValueError(f"negative frame index in {indices}")
    first, last, wanted = min(indices), max(indices), set(indices)
    container, stream = _open(path)
    try:
        if stream.frames and last >= stream.frames:
            raise ShortVideoError(path, f"has only {stream.frames} frames, asked for frame index {last}")
        if seek:
            frames = _read_seeking(container, stream, first, last, wanted, path)
        else:
            frames = _collect(_decode(container, stream, path), 0, wanted, last, path)
    except av.FFmpegError as e:
        raise VideoReadError(path, f"decoding failed ({type(e).__name__}: {e})") from e
    finally:
        container.close()
    return _stack([frames[i] for i in indices])


def _read_seeking(container, stream, first: int, last: int, wanted: set[int], path) -> dict[int, np.ndarray]:
    rate, tb = _rate(stream), stream.time_base
    start = stream.start_time or 0
    if rate is None or tb is None or first == 0:
        return _collect(_decode(container, stream, path), 0, wanted, last, path)

    def pts_to_index(pts: int) -> int:
        return round((pts - start) * tb * rate)

    target = start + math.floor(Fraction(first) / (rate * tb))
    back = Fraction(0)  # seconds to back off when a seek lands past the wanted frame
    while True:
        seek_pts = max(start, target - math.ceil(back / tb))
        container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
        it = _decode(container, stream, path)
        head = next(it, None)
        if head is None or head.pts is None:
            break  # nothing to anchor on: fall back to a plain decode from the start
        anchor = pts_to_index(head.pts)
        if anchor <= first:
            frames = _collect(_chain(head, it), anchor, wanted, last, path, pts_to_index)
            if frames is None:
                break  # timestamps spread over a longer timeline than the frames (e.g. AVI with empty chunks)
            return frames
        if seek_pts == start:
            break
        # the demuxer's index is dts-based, so with B-frames the keyframe found may start after the target
        back = max(Fraction(1), back * 2)
    container.seek(start, stream=stream, backward=True, any_frame=False)
    return _collect(_decode(container, stream, path), 0, wanted, last, path)


def _chain(head, rest):
    yield head
    yield from rest


def read_video(path: str | os.PathLike) -> tuple[torch.Tensor, float]:
    """All frames as uint8 (T, C, H, W) and the stream's average fps."""
    container, stream = _open(path)
    try:
        rate = _rate(stream)
        frames = [_to_rgb(f) for f in _decode(container, stream, path)]
    finally:
        container.close()
    if not frames:
        raise VideoReadError(path, "no decodable frames")
    return _stack(frames), float(rate) if rate else 0.0


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image as uint8 (1, 3, H, W) RGB.

    EXIF orientation is applied, grayscale is replicated to RGB, and transparency is composited on
    white (so transparent regions look like a blank page rather than black).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise VideoReadError(path, "file does not exist")
    try:
        with Image.open(path) as img:
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
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise VideoReadError(path, f"cannot read image ({type(e).__name__}: {e})") from e
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


def _tmp_path(path: Path) -> Path:
    # same folder (so rename is atomic) and same suffix (so the muxer / PIL format is inferred)
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


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

    Written to a temporary file in the same folder and renamed, so readers never see a partial file.
    """
    path = Path(path)
    arr = _check_frames(frames)
    if keyframe_every is not None and keyframe_every < 1:
        raise ValueError(f"keyframe_every must be a positive number of frames or None, got {keyframe_every}")
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    codecs = [c for c in ("libx264", "mpeg4") if c in av.codecs_available]
    if not codecs:
        raise RuntimeError("this PyAV build has neither libx264 nor mpeg4 encoders")
    tmp = _tmp_path(path)
    err: Exception | None = None
    for codec in codecs:
        try:
            _encode(tmp, arr, float(fps), codec, crf, keyframe_every)
            os.replace(tmp, path)
            return
        except (av.FFmpegError, ValueError) as e:
            err = e
        finally:
            if tmp.exists():
                tmp.unlink()
    raise RuntimeError(f"could not encode {path} with {codecs}: {err}") from err


def write_image(path: str | os.PathLike, frame: torch.Tensor) -> None:
    """Write one uint8 (C, H, W) frame (C = 1 or 3) with PIL, atomically; format from the extension."""
    path = Path(path)
    ok = isinstance(frame, torch.Tensor) and frame.dtype == torch.uint8 and frame.ndim == 3
    if not ok or frame.shape[0] not in (1, 3):
        raise ValueError("write_image expects a uint8 tensor (C, H, W) with C in (1, 3)")
    arr = frame.permute(1, 2, 0).contiguous().cpu().numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unknown image extension for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        img.save(tmp, format=fmt)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
