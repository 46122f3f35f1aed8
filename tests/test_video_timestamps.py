"""The seeking reader numbers frames by their timestamps: on files with awkward timing (variable frame rate, B-frames,
open GOPs, a non-zero start, an audio stream that starts first, edit lists, an average rate that is only an
estimate) every window it reads, and the dataset and encoding on top of it, equals a decode from the start.

The files are made here from a real sample clip, at 64x48 and 40 frames, so each is written in milliseconds."""
from __future__ import annotations

import struct
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from opensora_vae.config import load_config
from opensora_vae.data import VideoTextDataset
from opensora_vae.data import video as V
from opensora_vae.data.latents import read_index
from opensora_vae.data.transforms import resize_crop, to_model_range
from opensora_vae.encode import encode_dataset

from helpers import ROOT, tiny_pipeline
from test_data_video import count_decoded

N, H, W, GOP = 40, 48, 64, 8
MS = Fraction(1, 1000)
VFR_STEPS = (40, 40, 20, 100, 60, 33, 40, 17)  # ms between frames, cycled


def source_frames(path) -> list[np.ndarray]:
    out = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            out.append(f.to_ndarray(format="rgb24", width=W, height=H))
            if len(out) == N:
                return out
    raise AssertionError(f"{path} has fewer than {N} frames")


def write(path, frames, pts_ms, codec="libx264", audio_from_ms=None, hold_last_ms=None):
    """Frames at the given presentation times (ms; the muxer keeps them), a keyframe every GOP frames. The encoders'
    defaults give B-frames (x264, x265 with open GOPs) or hidden alt-ref frames (VP9)."""
    with av.open(str(path), "w") as c:
        if audio_from_ms is not None:  # added first: the first stream, and it starts earlier
            a = c.add_stream("aac", rate=8000)
            a.layout = "mono"
        s = c.add_stream(codec)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.time_base = s.time_base = MS
        s.codec_context.gop_size = GOP
        if codec == "libx265":
            s.options = {"x265-params": "log-level=error"}
        if audio_from_ms is not None:
            sample, end = round(audio_from_ms * 8), (pts_ms[-1] + 500) * 8
            while sample < end:
                t = np.arange(sample, sample + 1024) / 8000
                chunk = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t))[None].astype(np.float32),
                                                   format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts, chunk.time_base = 8000, sample, Fraction(1, 8000)
                c.mux(a.encode(chunk))
                sample += 1024
            c.mux(a.encode(None))
        packets = []
        for arr, pts in zip(frames, pts_ms):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts, frame.time_base = pts, MS
            packets += s.encode(frame)
        packets += s.encode(None)
        if hold_last_ms is not None:
            max(packets, key=lambda p: p.pts).duration = hold_last_ms
        for p in packets:
            c.mux(p)
    return path


def vfr_ms(start: int = 0) -> list[int]:
    return [start + sum(VFR_STEPS[i % len(VFR_STEPS)] for i in range(k)) for k in range(N)]


def cfr_ms(start: int = 0, step: int = 40) -> list[int]:
    return [start + step * k for k in range(N)]


# name -> (codec, presentation times in ms, write options)
FILES = {
    "h264_cfr.mp4": ("libx264", cfr_ms(), {}),
    "h264_vfr.mp4": ("libx264", vfr_ms(), {}),
    "hevc_cfr.mkv": ("libx265", cfr_ms(), {}),  # matroska: the average rate is estimated from the timestamps
    "hevc_vfr.mp4": ("libx265", vfr_ms(), {}),
    "vp9_vfr.webm": ("libvpx-vp9", vfr_ms(), {}),
    "late_start.mkv": ("libx264", cfr_ms(start=1300), {}),
    "late_start.mp4": ("libx264", vfr_ms(start=1300), {}),  # an empty edit before the video
    "late_start.ts": ("libx264", cfr_ms(start=1300), {}),
    "audio_first.mp4": ("libx264", cfr_ms(start=500), {"audio_from_ms": 0}),
    "audio_first.mkv": ("libx264", vfr_ms(start=500), {"audio_from_ms": 0}),
    "edit_list_cut.mp4": ("libx264", cfr_ms(start=-200), {}),  # the edit list cuts the 5 frames before 0
    "held_last_frame.mp4": ("libx264", cfr_ms(step=100), {"hold_last_ms": 1500}),  # exact 0.1 s steps
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, sample_videos):
    missing = [codec for codec, _, _ in FILES.values() if codec not in av.codecs_available]
    if missing:
        pytest.skip(f"this PyAV build lacks the encoders {sorted(set(missing))}")
    root = tmp_path_factory.mktemp("timestamps")
    frames = source_frames(sample_videos["carphone_pristine"])
    return {name: write(root / name, frames, pts, codec, **opts) for name, (codec, pts, opts) in FILES.items()}


def plain_decode(path) -> torch.Tensor:
    """The reference: every frame by a decode from the start, in PyAV directly (nothing of the reader)."""
    with av.open(str(path)) as c:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1)
                            for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def decoded(files):
    return {name: plain_decode(path) for name, path in files.items()}


def elst_entries(path) -> list[list[tuple[int, int]]]:
    """Each MP4 track's edit list as (segment duration, media time) pairs; media time -1 is an empty edit."""
    data = open(path, "rb").read()
    lists, at = [], data.find(b"elst")
    while at >= 0:
        version, count = data[at + 4], struct.unpack(">I", data[at + 8: at + 12])[0]
        fmt, size, pos, entries = (">Qq", 16, at + 12, []) if version == 1 else (">Ii", 8, at + 12, [])
        for _ in range(count):
            entries.append(struct.unpack(fmt, data[pos: pos + size]))
            pos += size + 4  # media rate
        lists.append(entries)
        at = data.find(b"elst", at + 4)
    return lists


def test_the_files_have_the_timing_they_claim(files, decoded):
    for name, path in files.items():
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            packets = [p for p in c.demux(s) if p.size]
            start, rate, tb = s.start_time, s.average_rate, s.time_base
            audio_start = c.streams.audio[0].start_time * c.streams.audio[0].time_base if c.streams.audio else None
        shown = [p.pts for p in packets if not p.is_discard]
        steps = set(np.diff(sorted(shown)).tolist())
        if not name.startswith("vp9"):
            assert shown != sorted(shown), f"{name}: no B-frames (decode order = presentation order)"
        assert (len(steps) > 2) == ("vfr" in name or name in ("late_start.mp4", "audio_first.mkv")), (name, steps)
        if name.startswith("late_start"):
            assert start * tb >= Fraction(13, 10), (name, start * tb)
        if name.startswith("audio_first"):
            assert audio_start == 0 and start * tb >= Fraction(1, 2), name
        if name == "late_start.mp4":
            assert elst_entries(path)[0][0][1] == -1  # an empty edit: the track starts late
        if name == "edit_list_cut.mp4":
            assert sum(p.is_discard for p in packets) == 5 and len(decoded[name]) == N - 5
            assert elst_entries(path)[0][0][1] > 0
        if name == "held_last_frame.mp4":
            assert steps == {round(Fraction(1, 10) / tb)}  # every step exactly 0.1 s ...
            assert abs(float(rate) - 10) > 1, rate  # ... and an average rate well off 10
        if name == "hevc_cfr.mkv":
            assert steps == {40} and rate != 25, rate  # 25 fps, estimated otherwise
    assert all(len(v) == N for k, v in decoded.items() if k != "edit_list_cut.mp4")


def windows(n: int, length: int = 9) -> dict[str, list[int]]:
    mid = n // 2 - length // 2
    return {"start": list(range(length)), "middle": list(range(mid, mid + length)),
            "end": list(range(n - length, n)), "strided": list(range(5, n, 3)), "unsorted": [n - 2, 7, 7, n // 2]}


@pytest.mark.parametrize("name", list(FILES))
def test_windows_equal_a_decode_from_the_start(files, decoded, name):
    path, ref = files[name], decoded[name]
    for where, idx in windows(len(ref)).items():
        assert torch.equal(V.read_frames(path, idx), ref[idx]), f"{name}: the {where} window"
    for k in range(len(ref)):  # every frame number lands on its own frame
        assert torch.equal(V.read_frames(path, [k]), ref[k: k + 1]), f"{name}: frame {k}"
    with pytest.raises(V.ShortVideoError):
        V.read_frames(path, [len(ref) - 3, len(ref)])


@pytest.mark.parametrize("name", list(FILES))
def test_the_end_window_is_read_by_seeking(files, decoded, name, monkeypatch):
    n = len(decoded[name])
    count = count_decoded(monkeypatch)
    V.read_frames(files[name], range(n - 4, n))
    assert 0 < count[0] <= 4 + 2 * GOP, f"{name}: {count[0]} frames decoded for the last 4"


def test_the_index_is_built_once_per_file_and_rebuilt_when_it_changes(files, tmp_path, monkeypatch):
    built, real = [], V._build_index
    monkeypatch.setattr(V, "_build_index", lambda path: built.append(path) or real(path))
    V._cached_index.cache_clear()
    path = tmp_path / "clip.mkv"
    path.write_bytes(files["late_start.mkv"].read_bytes())
    for _ in range(3):
        V.read_frames(path, [20, 21])
    assert V.probe_video(path).num_frames == N and len(built) == 1  # matroska has no count: the index gives it
    index = V.frame_index(path)
    assert index.count == N and index.frame_of(int(index.pts[7])) == 7 and index.frame_of(int(index.pts[7]) + 1) is None
    path.write_bytes(files["late_start.ts"].read_bytes())
    assert torch.equal(V.read_frames(path, [30]), plain_decode(path)[30:31]) and len(built) == 2


# ----------------------------------------------------------------- the dataset and encoding on top


LATE = ("late_start.mkv", "audio_first.mp4", "edit_list_cut.mp4")


@pytest.mark.parametrize("name", LATE)
def test_dataset_windows_equal_a_decode_from_the_start(files, decoded, name, make_csv):
    csv = make_csv([{"path": files[name]}] * 8)
    ds = VideoTextDataset(csv, num_frames=9, frame_interval=2, image_size=(H, W), seed=5)
    starts = []
    for i in range(len(ds)):
        item = ds[i]
        assert item["index"] == i and item["skipped"] == ""
        idx = item["frame_indices"].tolist()
        starts.append(idx[0])
        want = decoded[name][idx].float() / 127.5 - 1  # the source size: the transforms only rescale the values
        assert torch.allclose(item["video"], want.permute(1, 0, 2, 3), atol=1e-5), (name, idx)
    assert max(starts) > GOP  # windows well inside the file, read by seeking


def test_encoding_reads_the_right_frames_of_a_late_start(files, decoded, make_csv, tmp_path, monkeypatch):
    from opensora_vae.models.autoencoders import OpenSoraAutoencoder

    inputs, encode = [], OpenSoraAutoencoder.encode
    monkeypatch.setattr(OpenSoraAutoencoder, "encode", lambda self, x: inputs.append(x) or encode(self, x))
    tiny_pipeline(seed=2).save_pretrained(tmp_path / "ckpt")
    csv = make_csv([{"path": files[name]} for name in LATE])
    cfg = load_config(ROOT / "configs" / "vae" / "tiny" / "latents.py", {
        "model.from_pretrained": str(tmp_path / "ckpt"), "dataset.data_path": str(csv), "buckets": [(5, 32, 32)],
        "dataset.seed": 4, "save_dir": str(tmp_path / "z")})
    report = encode_dataset(cfg)
    assert report.encoded == len(LATE) and report.skipped == {} and len(inputs) == len(LATE)
    rows = read_index(tmp_path / "z").sort_values("row")
    assert max(idx[0] for idx in rows["frame_indices"]) > GOP  # windows well inside the files, read by seeking
    for x, (_, row) in zip(inputs, rows.iterrows()):  # one rank, no workers: rows are encoded in order
        idx = list(row["frame_indices"])
        want = to_model_range(resize_crop(decoded[LATE[row["row"]]][idx].float() / 255, (32, 32)))[None]
        assert torch.allclose(x, want, atol=1e-5), (LATE[row["row"]], idx)
