"""A video whose header overstates its length (an AVI with 68 frames spread over a 444-frame timeline): every row
with enough decodable frames gives a clip, in training, inference and encoding; skip summaries count rows."""
from __future__ import annotations

import logging
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from opensora_vae.config import load_config
from opensora_vae.data import VideoTextDataset, read_frames, read_video
from opensora_vae.data import video as V
from opensora_vae.encode import encode_dataset
from opensora_vae.inference import reconstruct_dataset

from helpers import ROOT, tiny_pipeline

FRAMES, TIMELINE = 68, 444


def lying_avi(path, frames: int = FRAMES, timeline: int = TIMELINE):
    """MPEG-4 in AVI, `frames` frames with pts spread over `timeline` frame slots: the muxer fills the gaps with
    empty chunks, which the header counts. Frame k is a flat gray 3 * k with its left k % 32 columns inverted."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = Fraction(1, 25)
        for k in range(frames):
            arr = np.full((32, 32, 3), 3 * k, np.uint8)
            arr[:, : k % 32] = 255 - arr[:, : k % 32]
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts, frame.time_base = round(k * timeline / frames), Fraction(1, 25)
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path


@pytest.fixture(scope="module")
def avi(tmp_path_factory):
    path = lying_avi(tmp_path_factory.mktemp("lying") / "lying.avi")
    with av.open(str(path)) as c:
        header = c.streams.video[0].frames
    assert header > FRAMES * 5  # the header does overstate
    assert read_video(path)[0].shape[0] == FRAMES
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_pipeline(seed=2).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    # the warning is once per file per process: each test starts as a new process would
    monkeypatch.setattr("opensora_vae.data.dataset._warned_overstated", set())


def overstated_warnings(caplog, path):
    return [r for r in caplog.records if r.name == "opensora_vae.data" and str(path) in r.getMessage()
            and "decode; clips are drawn within those" in r.getMessage()]


def test_reads_past_the_decodable_end_say_how_many_decode(avi):
    full, _ = read_video(avi)
    assert V.probe_video(avi).num_frames > FRAMES and V.probe_video(avi, decode=True).num_frames == FRAMES
    for start in (0, 30, 51):  # inside: the seek cannot anchor on spread pts, so it decodes from the start
        idx = list(range(start, start + 17))
        for seek in (True, False):
            assert torch.equal(read_frames(avi, idx, seek=seek), full[idx])
    for start in (60, 100, 200):  # past the end: never frames of other indices
        for seek in (True, False):
            with pytest.raises(V.ShortVideoError) as err:
                read_frames(avi, range(start, start + 17), seek=seek)
            assert err.value.decoded == FRAMES


def test_short_video_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(V.ShortVideoError("/a/b.avi", "has only 3 frames", decoded=3)))
    assert isinstance(e, V.VideoReadError) and (e.path, e.reason, e.decoded) == ("/a/b.avi", "has only 3 frames", 3)


@pytest.mark.parametrize("frame_interval", [1, 2])
def test_training_draws_within_the_decodable_frames(avi, make_csv, caplog, frame_interval):
    caplog.set_level(logging.WARNING, logger="opensora_vae.data")
    full, _ = read_video(avi)
    csv = make_csv([{"path": avi}] * 4)
    ds = VideoTextDataset(csv, num_frames=17, frame_interval=frame_interval, image_size=(32, 32), seed=3)
    items = [ds[i] for i in range(4)]
    assert [it["index"] for it in items] == [0, 1, 2, 3] and all(it["skipped"] == "" for it in items)
    assert ds.bad_rows == {} and ds.decodable == {str(avi): FRAMES}
    assert len(overstated_warnings(caplog, avi)) == 1
    for it in items:
        idx = it["frame_indices"].tolist()
        assert max(idx) < FRAMES and len(idx) == 17
        want = full[idx].float() / 127.5 - 1  # 32x32 source at 32x32: the transforms only rescale the values
        assert torch.allclose(it["video"], want.permute(1, 0, 2, 3), atol=1e-5)
    # Deterministic: the same row gives the same clip whichever row found the file out, in whichever order.
    fresh = VideoTextDataset(csv, num_frames=17, frame_interval=frame_interval, image_size=(32, 32), seed=3)
    for i in (3, 1, 0, 2):
        assert torch.equal(fresh[i]["frame_indices"], items[i]["frame_indices"])
        assert torch.equal(fresh[i]["video"], items[i]["video"])


def test_inference_writes_every_row(avi, ckpt, tmp_path, make_csv):
    cfg = load_config(ROOT / "configs" / "vae" / "tiny" / "inference.py", {
        "model.from_pretrained": str(ckpt), "dataset.data_path": str(make_csv([{"path": avi}] * 4)),
        "dataset.num_frames": 9, "dataset.image_size": (32, 32), "save_dir": str(tmp_path / "r")})
    report = reconstruct_dataset(cfg)
    assert report.skipped == {} and len(report.written) == 4
    for kind in ("ori", "rec", "spatial"):
        assert len(list((tmp_path / f"r_{kind}").glob("*.mp4"))) == 4


def encode_cfg(ckpt, csv, save_dir):
    return load_config(ROOT / "configs" / "vae" / "tiny" / "latents.py", {
        "model.from_pretrained": str(ckpt), "dataset.data_path": str(csv), "buckets": [(9, 32, 32)],
        "save_dir": str(save_dir)})


def test_encoding_encodes_every_row(avi, ckpt, tmp_path, make_csv):
    report = encode_dataset(encode_cfg(ckpt, make_csv([{"path": avi}] * 4), tmp_path / "z"))
    assert report.skipped == {} and report.encoded == 4


def test_too_few_decodable_frames_still_skip_and_count_rows(avi, tmp_path, ckpt, make_csv, caplog):
    caplog.set_level(logging.WARNING)
    short = lying_avi(tmp_path / "short.avi", frames=6, timeline=60)  # the header says 60, 6 decode
    missing = tmp_path / "missing.mp4"
    # one good row last: the job produces something, so the short rows are counted skips, not "nothing produced"
    csv = make_csv([{"path": short}] * 2 + [{"path": missing}] * 3 + [{"path": avi}])
    ds = VideoTextDataset(csv, num_frames=9, image_size=(32, 32))
    with pytest.raises(V.VideoReadError, match="6 decodable frames"):
        ds.load_row(0)
    assert not overstated_warnings(caplog, short)  # the skip says it, not a "drawn within" warning
    report = encode_dataset(encode_cfg(ckpt, csv, tmp_path / "z"))
    assert report.encoded == 1 and len(report.skipped) == 5
    assert sum(r.getMessage().startswith("skipped 5 of 6 row(s)") for r in caplog.records) == 1
    assert sum("6 decodable frames" in reason for reason in report.skipped.values()) == 2
    caplog.clear()
    cfg = load_config(ROOT / "configs" / "vae" / "tiny" / "inference.py", {
        "model.from_pretrained": str(ckpt), "dataset.data_path": str(csv), "dataset.num_frames": 9,
        "dataset.image_size": (32, 32), "save_dir": str(tmp_path / "r")})
    report = reconstruct_dataset(cfg)
    assert report.written == [str(avi)] and len(report.skipped) == 5
    assert sum("6 decodable frames" in reason for reason in report.skipped.values()) == 2
    assert sum(r.getMessage().startswith("skipped 5 of 6 row(s)") for r in caplog.records) == 1
