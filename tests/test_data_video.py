"""Video / image IO and transforms."""
from __future__ import annotations

import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from opensora_vae.data import transforms as T
from opensora_vae.data import video as V


def decode_prefix(path, n: int) -> torch.Tensor:
    """Reference: the first n frames by plain decoding from the start (no seeking)."""
    out = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            out.append(torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1))
            if len(out) == n:
                break
    return torch.stack(out)


def gradient_clip(t: int, h: int, w: int) -> torch.Tensor:
    """Smooth moving gradients: compress well, so a lossy round trip stays close."""
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    frames = [torch.stack([x * 200 + 3 * i + 0 * y, y * 200 + 0 * x, (x + y) * 100]) for i in range(t)]
    return torch.stack(frames).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------- probe / read


@pytest.mark.parametrize(
    "name,n,fps,h,w", [("bikes", 250, 25.0, 272, 640), ("carphone_pristine", 120, 30000 / 1001, 144, 176)]
)
def test_probe(sample_videos, name, n, fps, h, w):
    info = V.probe_video(sample_videos[name])
    assert info == V.VideoInfo(num_frames=n, fps=pytest.approx(fps), height=h, width=w)


def test_probe_counts_packets_when_container_has_no_count(tmp_path):
    path = tmp_path / "clip.mkv"  # matroska stores no per-stream frame count
    V.write_video(path, gradient_clip(7, 32, 48), fps=10)
    with av.open(str(path)) as c:
        assert not c.streams.video[0].frames
    assert V.probe_video(path).num_frames == 7


@pytest.mark.parametrize(
    "indices",
    [
        list(range(100, 117)),  # 17 frames from the middle
        [28, 29, 30, 31],  # across the keyframe at 30
        [77, 75, 75, 80],  # unsorted, duplicates
        [249],  # last frame
    ],
)
def test_read_frames_matches_full_decode(sample_videos, indices):
    path = sample_videos["bikes"]  # several keyframes and B-frames: exercises the seek
    ref = decode_prefix(path, max(indices) + 1)
    got = V.read_frames(path, indices)
    assert got.dtype == torch.uint8 and got.shape == (len(indices), 3, 272, 640)
    assert torch.equal(got, ref[indices])


def count_decoded(monkeypatch) -> list[int]:
    """Spy: [frames the reader has taken from the decoder]."""
    count, real = [0], V._decode

    def spy(*args):
        for frame in real(*args):
            count[0] += 1
            yield frame

    monkeypatch.setattr(V, "_decode", spy)
    return count


def test_read_frames_seeks(sample_videos, monkeypatch):
    count = count_decoded(monkeypatch)
    V.read_frames(sample_videos["bikes"], [200, 201])
    assert 0 < count[0] <= 20  # decoding started at the keyframe at 187, not at frame 0


def test_read_frames_errors(sample_videos, tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(V.VideoReadError, match="nope.mp4.*does not exist"):
        V.read_frames(missing, [0])
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(V.VideoReadError, match="corrupt.mp4"):
        V.read_frames(corrupt, [0])
    with pytest.raises(V.VideoReadError, match="corrupt.mp4"):
        V.probe_video(corrupt)
    with pytest.raises(V.VideoReadError, match=r"carphone_pristine.mp4.*120 frames"):
        V.read_frames(sample_videos["carphone_pristine"], [110, 120])


def test_video_read_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(V.VideoReadError("/a/b.mp4", "broken")))
    assert e.path == "/a/b.mp4" and e.reason == "broken" and str(e) == "/a/b.mp4: broken"


def test_read_video(sample_videos):
    frames, fps = V.read_video(sample_videos["carphone_distorted"])
    assert frames.shape == (120, 3, 144, 176) and frames.dtype == torch.uint8
    assert fps == pytest.approx(29.97, abs=0.01)


# ----------------------------------------------------------------- write


@pytest.mark.parametrize("h,w", [(32, 48), (33, 47)])
def test_write_video_roundtrip(tmp_path, h, w):
    clip = gradient_clip(9, h, w)
    path = tmp_path / "out" / "clip.mp4"
    V.write_video(path, clip, fps=12)
    assert os.listdir(path.parent) == ["clip.mp4"]  # temporary file renamed away
    back, fps = V.read_video(path)
    assert back.shape == clip.shape and fps == pytest.approx(12)
    assert (back.float() - clip.float()).abs().mean() < 4


@pytest.mark.parametrize("every", [1, 4])
def test_write_video_keyframe_every(tmp_path, every):
    clip = gradient_clip(9, 32, 48)
    path = tmp_path / "clip.mp4"
    V.write_video(path, clip, fps=12, keyframe_every=every)
    with av.open(str(path)) as container:
        keys = [p.is_keyframe for p in container.demux(video=0) if p.size]
    assert len(keys) == 9 and [i for i, k in enumerate(keys) if k] == list(range(0, 9, every))
    assert torch.equal(V.read_frames(path, [5]), V.read_video(path)[0][5:6])
    with pytest.raises(ValueError, match="keyframe_every"):
        V.write_video(tmp_path / "bad.mp4", clip, fps=12, keyframe_every=0)


def test_write_video_rejects_float(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        V.write_video(tmp_path / "x.mp4", torch.zeros(3, 4, 8, 8), fps=8)


def test_ensure_uint8_video():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(3, 2, 5, 4)
    y = V.ensure_uint8_video(x)
    assert y.dtype == torch.uint8 and y.shape == (2, 3, 5, 4)
    assert y[0, 0, 0].tolist() == [0, 128, 255, 255]
    assert V.ensure_uint8_video(y) is y


# ----------------------------------------------------------------- images


def test_image_roundtrip_and_modes(tmp_path):
    rgb = torch.randint(0, 256, (3, 10, 14), dtype=torch.uint8)
    V.write_image(tmp_path / "a.png", rgb)
    img = V.read_image(tmp_path / "a.png")
    assert img.shape == (1, 3, 10, 14) and torch.equal(img[0], rgb)

    gray = np.arange(80, dtype=np.uint8).reshape(8, 10)
    Image.fromarray(gray).save(tmp_path / "g.png")
    img = V.read_image(tmp_path / "g.png")
    assert img.shape == (1, 3, 8, 10)
    assert all(torch.equal(img[0, c], torch.from_numpy(gray)) for c in range(3))

    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba).save(tmp_path / "t.png")
    img = V.read_image(tmp_path / "t.png")[0]
    assert img[:, 0, 0].tolist() == [200, 0, 0]
    assert img[:, 3, 0].tolist() == [255, 255, 255]

    with pytest.raises(V.VideoReadError, match="missing.png"):
        V.read_image(tmp_path / "missing.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(V.VideoReadError, match="bad.jpg"):
        V.read_image(tmp_path / "bad.jpg")


def test_is_image_path():
    assert V.is_image_path("a/b.JPG") and V.is_image_path("x.webp") and V.is_image_path("x.tiff")
    assert not V.is_image_path("x.mp4") and not V.is_image_path("noext")


# ----------------------------------------------------------------- transforms


def test_resize_short_side_and_crops():
    x = torch.randint(0, 256, (4, 3, 60, 100), dtype=torch.uint8)
    y = T.resize_short_side(x, 30)
    assert y.shape == (4, 3, 30, 50) and y.dtype == torch.uint8
    assert T.resize_short_side(x.transpose(2, 3), 30).shape == (4, 3, 50, 30)
    assert T.resize_short_side(x.float(), 30).dtype == torch.float32

    assert torch.equal(T.center_crop(x, (20, 30)), x[..., 20:40, 35:65])
    a = T.random_crop(x, (20, 30), torch.Generator().manual_seed(1))
    b = T.random_crop(x, (20, 30), torch.Generator().manual_seed(1))
    assert a.shape == (4, 3, 20, 30) and torch.equal(a, b)
    with pytest.raises(ValueError):
        T.center_crop(x, (61, 10))


@pytest.mark.parametrize("hw", [(60, 100), (100, 60), (17, 23), (300, 300)])
def test_resize_crop_shapes(hw):
    x = torch.randint(0, 256, (2, 3, *hw), dtype=torch.uint8)
    for crop in ("center", "random"):
        assert T.resize_crop(x, (32, 48), crop=crop, generator=torch.Generator()).shape == (2, 3, 32, 48)
    with pytest.raises(ValueError):
        T.resize_crop(x, (32, 48), crop="middle")


def test_resize_crop_keeps_constant_image_and_to_model_range():
    x = torch.full((3, 3, 50, 70), 200, dtype=torch.uint8)
    assert (T.resize_crop(x, (16, 16)) == 200).all()
    y = T.to_model_range(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 4, 5))
    assert y.dtype == torch.float32 and y.shape == (3, 2, 4, 5)
    assert y[:, 0].eq(-1).all() and y[:, 1].eq(1).all()
