"""VideoTextDataset (CSV parsing, sampling, bad rows) and apply_mixed_strategy."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from opensora_vae.data import VideoTextDataset, apply_mixed_strategy, collate_clips, read_frames, write_video
from opensora_vae.registry import DATASETS, build_from_cfg


def flat_clip(path, n: int, size=(32, 48)) -> None:
    """Frame i is a flat gray of value 8 * i, so the frame index can be read back from the pixels."""
    vals = torch.arange(n, dtype=torch.float32) * 8
    frames = vals.view(n, 1, 1, 1).expand(n, 3, *size).round().to(torch.uint8)
    write_video(path, frames, fps=10)


def frame_ids(video: torch.Tensor) -> list[int]:
    """Inverse of flat_clip for a dataset item (C, T, H, W) in [-1, 1]."""
    vals = (video.mean(dim=(0, 2, 3)) + 1) * 127.5
    return [round(v / 8) for v in vals.tolist()]


@pytest.fixture
def small_ds(sample_videos, make_csv):
    def _make(rows, **kw):
        kw.setdefault("num_frames", 5)
        kw.setdefault("image_size", (32, 32))
        return VideoTextDataset(make_csv(rows), **kw)

    return _make


def test_item_shape_range_and_meta(sample_videos, small_ds):
    ds = small_ds(
        [{"path": sample_videos["carphone_pristine"], "text": "a phone call"}, {"path": sample_videos["bikes"]}],
        image_size=(48, 64),
        frame_interval=2,
    )
    assert len(ds) == 2
    item = ds[0]
    v = item["video"]
    assert v.dtype == torch.float32 and v.shape == (3, 5, 48, 64)
    assert v.min() >= -1 and v.max() <= 1 and v.std() > 0.05
    assert item["index"] == 0 and item["path"] == str(sample_videos["carphone_pristine"])
    assert item["fps"] == pytest.approx(30000 / 1001 / 2)
    assert item["text"] == "a phone call"
    assert ds[1]["video"].shape == (3, 5, 48, 64) and ds[1]["text"] == ""
    batch = next(iter(DataLoader(ds, batch_size=2, num_workers=2)))  # picklable, collatable
    assert batch["video"].shape == (2, 3, 5, 48, 64) and batch["text"] == ["a phone call", ""]


def test_temporal_window_and_determinism(tmp_path, make_csv):
    flat_clip(tmp_path / "count.mp4", 30)
    csv = make_csv([{"path": "count.mp4"}])  # relative to the CSV folder
    ds = VideoTextDataset(csv, num_frames=5, frame_interval=3, image_size=(16, 16), crop="random", seed=7)
    starts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        ids = frame_ids(ds[0]["video"])
        # the reference's window: 5 * 3 frames from a start in 0..30-15-1, indices linspace(s, s + 14, 5) truncated
        assert ids == [ids[0] + d for d in (0, 3, 7, 10, 14)] and 0 <= ids[0] <= 30 - 15 - 1
        starts.add(ids[0])
        again = VideoTextDataset(csv, num_frames=5, frame_interval=3, image_size=(16, 16), crop="random", seed=7)
        again.set_epoch(epoch)
        assert torch.equal(again[0]["video"], ds[0]["video"])  # same (seed, epoch, index) -> same sample
    assert len(starts) > 1  # the epoch reseeds the window


def test_permute_channels_shuffles_whole_samples_deterministically(sample_videos, small_ds):
    rows = [{"path": sample_videos["bikes"]}]
    plain = small_ds(rows, crop="random", seed=3)
    aug = small_ds(rows, crop="random", seed=3, permute_channels=1.0)
    permutations = set()
    for epoch in range(8):
        plain.set_epoch(epoch)
        aug.set_epoch(epoch)
        a, b = plain[0]["video"], aug[0]["video"]
        # the same clip and crop (the draw comes after them), its channels in some order, the same for every frame
        matches = [[int(torch.equal(b[i], a[j])) for j in range(3)] for i in range(3)]
        assert all(sum(r) == 1 for r in matches), matches
        permutations.add(tuple(r.index(1) for r in matches))
        assert torch.equal(aug[0]["video"], b)  # deterministic per (seed, epoch, row)
    assert len(permutations) > 1
    with pytest.raises(ValueError, match="probability"):
        small_ds(rows, permute_channels=1.5)


def test_image_row_is_a_static_clip_and_mixes_with_videos(tmp_path, sample_videos, make_csv):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    rows = [{"path": tmp_path / "noise.png"}, {"path": sample_videos["carphone_pristine"]}]
    ds = VideoTextDataset(make_csv(rows), num_frames=5, image_size=(16, 16))
    item = ds[0]
    v = item["video"]
    assert v.shape == (3, 5, 16, 16) and item["fps"] == 0.0 and v.std() > 0.1
    assert all(torch.equal(v[:, t], v[:, 0]) for t in range(5))  # the image repeated: a static clip
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_clips)))
    assert batch["video"].shape == (2, 3, 5, 16, 16)

    single = VideoTextDataset(make_csv(rows, name="single.csv"), num_frames=5, image_size=(16, 16),
                              image_frames="single")
    assert torch.equal(single[0]["video"], v[:, :1])
    with pytest.raises(ValueError, match="1-frame clips"):
        collate_clips([single[0], single[1]])
    randomly = VideoTextDataset(make_csv(rows, name="random.csv"), num_frames=5, image_size=(16, 16), crop="random")
    assert randomly[0]["video"].shape == (3, 5, 16, 16) and randomly[0]["video"].abs().max() <= 1
    assert randomly[0]["video"].std() > 0.1
    with pytest.raises(ValueError, match="image_frames"):
        VideoTextDataset(make_csv(rows, name="bad.csv"), image_frames="once")


def test_white_image_stays_white(tmp_path, make_csv):
    Image.fromarray(np.full((40, 60, 3), 255, np.uint8)).save(tmp_path / "white.jpg")
    ds = VideoTextDataset(make_csv([{"path": tmp_path / "white.jpg"}]), num_frames=1, image_size=(16, 24))
    item = ds[0]
    assert item["video"].shape == (3, 1, 16, 24) and item["fps"] == 0.0
    assert torch.allclose(item["video"], torch.ones(1), atol=0.02)


def test_bad_rows_skipped_logged_once_and_counted(tmp_path, sample_videos, make_csv, caplog):
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    flat_clip(tmp_path / "short.mp4", 3)
    rows = [
        {"path": sample_videos["carphone_pristine"]},
        {"path": "corrupt.mp4"},
        {"path": "missing.mp4"},
        {"path": "short.mp4"},
        {"path": sample_videos["carphone_distorted"]},
    ]
    caplog.set_level(logging.WARNING, logger="opensora_vae.data")
    ds = VideoTextDataset(make_csv(rows), num_frames=5, image_size=(16, 16))
    for _ in range(2):
        for i in (1, 2, 3):
            assert ds[i]["index"] == 4  # substituted by the next good row
    assert ds[0]["index"] == 0 and ds[0]["skipped"] == ""
    bad = {str(tmp_path / n) for n in ("corrupt.mp4", "missing.mp4", "short.mp4")}
    assert set(ds.bad_rows) == bad
    assert "does not exist" in ds.bad_rows[str(tmp_path / "missing.mp4")]
    assert "frames" in ds.bad_rows[str(tmp_path / "short.mp4")]
    assert ds.num_skipped == 12  # 6 lookups, each passing over 3, 2 and 1 bad rows
    assert ds[2]["skipped"].split("\n") == [str(tmp_path / "missing.mp4"), str(tmp_path / "short.mp4")]
    msgs = [r.getMessage() for r in caplog.records if r.name == "opensora_vae.data"]
    for p in bad:
        assert sum(p in m for m in msgs) == 1, msgs


def test_num_frames_column_prefilters_without_opening(tmp_path, sample_videos, make_csv):
    (tmp_path / "never_opened.mp4").write_bytes(b"garbage")
    rows = [
        {"path": sample_videos["carphone_pristine"], "num_frames": 120, "fps": 30},
        {"path": "never_opened.mp4", "num_frames": 4},
    ]
    ds = VideoTextDataset(make_csv(rows), num_frames=5, image_size=(16, 16))
    assert len(ds) == 1 and ds[0]["fps"] == 30
    assert not ds.bad_rows


def test_csv_errors(tmp_path, sample_videos, make_csv):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        VideoTextDataset(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match=r"empty\.csv.*empty"):
        VideoTextDataset(make_csv([], name="empty.csv"))
    with pytest.raises(ValueError, match=r"header\.csv.*no rows"):
        VideoTextDataset(make_csv([], name="header.csv", columns=["path", "text"]))
    with pytest.raises(ValueError, match=r"nopath\.csv.*'path' column"):
        VideoTextDataset(make_csv([{"file": sample_videos["bikes"]}], name="nopath.csv"))
    with pytest.raises(ValueError, match=r"allmissing\.csv.*none of the 2 files exist"):
        VideoTextDataset(make_csv([{"path": "a.mp4"}, {"path": "/no/b.mp4"}], name="allmissing.csv"))
    with pytest.raises(ValueError, match=r"tooshort\.csv.*shorter"):
        VideoTextDataset(make_csv([{"path": sample_videos["bikes"], "num_frames": 3}], name="tooshort.csv"))


def test_all_rows_unreadable_raises_instead_of_looping(tmp_path, make_csv):
    for n in ("a.mp4", "b.mp4"):
        (tmp_path / n).write_bytes(b"\x00" * 100)
    ds = VideoTextDataset(make_csv([{"path": "a.mp4"}, {"path": "b.mp4"}]), image_size=(16, 16))
    with pytest.raises(RuntimeError, match="all 2 rows are unreadable"):
        ds[0]


def test_registry_build(sample_videos, make_csv):
    ds = build_from_cfg(
        dict(type="VideoTextDataset", data_path=str(make_csv([{"path": sample_videos["bikes"]}])), num_frames=2),
        DATASETS,
        image_size=(8, 8),
    )
    assert isinstance(ds, VideoTextDataset) and ds[0]["video"].shape == (3, 2, 8, 8)


# ----------------------------------------------------------------- mixed strategies


def test_mixed_strategies():
    video = torch.randn(2, 3, 9, 4, 4)
    assert apply_mixed_strategy(video, None, 0.5, torch.Generator()) is video

    g = torch.Generator().manual_seed(0)
    lengths = [apply_mixed_strategy(video, "mixed_video_image", 0.3, g).shape[2] for _ in range(4000)]
    assert set(lengths) == {1, 9}
    assert abs(lengths.count(1) / 4000 - 0.3) < 0.03
    out = apply_mixed_strategy(video, "mixed_video_image", 1.0, g)
    assert torch.equal(out, video[:, :, :1])
    assert apply_mixed_strategy(video, "mixed_video_image", 0.0, g).shape[2] == 9

    lengths = [apply_mixed_strategy(video, "mixed_video_random", 0, g).shape[2] for _ in range(4500)]
    counts = np.bincount(lengths, minlength=10)[1:]
    assert counts.min() > 400 and counts.max() < 600  # uniform over 1..9, 500 expected each
    out = apply_mixed_strategy(video, "mixed_video_random", 0, torch.Generator().manual_seed(3))
    assert torch.equal(out, video[:, :, : out.shape[2]])

    # only the passed generator is used: same seed, same sequence
    def draws():
        g = torch.Generator().manual_seed(5)
        return [apply_mixed_strategy(video, "mixed_video_random", 0, g).shape[2] for _ in range(5)]

    a = draws()
    torch.manual_seed(123)  # the global RNG must not matter
    assert draws() == a
    with pytest.raises(ValueError, match="unknown mixed strategy"):
        apply_mixed_strategy(video, "mixed_video_sometimes", 0.5, g)


def test_collate_names_mixed_clip_shapes():
    import torch

    from opensora_vae.data import collate_clips

    video = {"video": torch.zeros(3, 5, 8, 8), "path": "a.mp4", "index": 0}
    image = {"video": torch.zeros(3, 1, 8, 8), "path": "b.png", "index": 1}
    assert collate_clips([video, dict(video, index=2)])["video"].shape == (2, 3, 5, 8, 8)
    with pytest.raises(ValueError, match="b.png.*batch_size=1"):
        collate_clips([video, image])


def reference_center_transform(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Open-Sora 1.2's "center" video transform, written from its definition: uint8 (T, C, H, W) / 255, bilinear
    F.interpolate with scale_factor = size / short side (align_corners=False, no antialias), centre crop with
    offsets round((H - size) / 2), normalise with mean 0.5 and std 0.5; returned as (C, T, H, W)."""
    x = frames.float() / 255.0
    x = torch.nn.functional.interpolate(x, scale_factor=size / min(x.shape[-2:]), mode="bilinear",
                                        align_corners=False)
    top, left = int(round((x.shape[-2] - size) / 2.0)), int(round((x.shape[-1] - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    return ((x - 0.5) / 0.5).permute(1, 0, 2, 3)


@pytest.mark.parametrize("name, num_frames, interval, size", [("bikes", 2, 125, 256),  # 640x272, 250 frames
                                                               ("carphone_pristine", 4, 30, 256)])  # 176x144, 120
def test_video_transform_matches_the_reference_center_transform(sample_videos, make_csv, name, num_frames,
                                                                interval, size):
    # num_frames * interval == the clip's length, so the window starts at 0 and the indices are known
    csv = make_csv([{"path": sample_videos[name]}])
    item = VideoTextDataset(csv, num_frames=num_frames, frame_interval=interval, image_size=(size, size))[0]
    indices = np.linspace(0, num_frames * interval - 1, num_frames, dtype=int).tolist()
    expected = reference_center_transform(read_frames(sample_videos[name], indices), size)
    assert item["video"].shape == expected.shape
    level = 2 / 255  # one 8-bit level on the [-1, 1] scale
    assert (item["video"] - expected).abs().max() <= level
    smoothed = VideoTextDataset(csv, num_frames=num_frames, frame_interval=interval, image_size=(size, size),
                                antialias=True)[0]["video"]
    if min(expected.shape[-2:]) < min(read_frames(sample_videos[name], [0]).shape[-2:]):  # shrinking
        assert (smoothed - expected).abs().max() > level  # the option is not the reference's transform
