"""Temporal artefact scores (metrics/temporal.py): seam dip / jump at micro-chunk boundaries, temporal consistency."""
from __future__ import annotations

import json
import math

import pytest
import torch

from opensora_vae.metrics.temporal import (
    SCORES, chunk_boundaries, seam_scores, summarize, temporal_consistency, temporal_scores,
)
from opensora_vae.models.pipeline import VideoAutoencoderPipeline


def moving_clip(t=51, h=32, w=32, seed=0):
    """(1, T, 3, H, W) in [0.3, 0.7]: a sinusoid drifting right by 0.3 px a frame (real, modest motion)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(w, dtype=torch.float64)
    y = torch.arange(h, dtype=torch.float64)
    phase = torch.rand(3, generator=g, dtype=torch.float64) * 6.28
    frames = [0.5 + 0.2 * torch.sin(2 * math.pi * (x[None, None] - 0.3 * s) / 16 + y[None, :, None] / 5
                                    + phase[:, None, None]) for s in range(t)]
    return torch.stack(frames)[None].float()


def checkerboard(h=32, w=32):
    return ((torch.arange(h)[:, None] + torch.arange(w)[None]) % 2 * 2 - 1).float()  # +-1


def psnr_of(delta):
    return -20 * math.log10(delta)


# ----- where the seams are --------------------------------------------------------------------------------------
def test_chunk_boundaries_values():
    assert chunk_boundaries(1) == [] and chunk_boundaries(17) == []
    assert chunk_boundaries(18) == [17] and chunk_boundaries(34) == [17]
    assert chunk_boundaries(35) == [17, 34] and chunk_boundaries(51) == [17, 34]
    assert chunk_boundaries(100) == [17, 34, 51, 68, 85]
    assert chunk_boundaries(100, None) == [] and chunk_boundaries(10, 4) == [4, 8]
    with pytest.raises(ValueError):
        chunk_boundaries(0)


def test_chunk_boundaries_follow_pipeline_chunks():
    for t in range(1, 80):
        starts = [a for a, _ in VideoAutoencoderPipeline._chunks(None, t, 17)]
        assert chunk_boundaries(t) == starts[1:]


def test_chunk_boundaries_match_the_models_decode():
    """A latent perturbation in micro-chunk k changes exactly the frames chunk_boundaries puts in chunk k."""
    from helpers import tiny_pipeline

    model = tiny_pipeline()
    t = 40
    x = torch.rand(1, 3, t, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = model.encode(x, sample_posterior=False)
        per_chunk = model.temporal_vae.get_latent_size([17])[0]
        base = model.decode(z, t)
        changed = []
        for k in range(3):
            zk = z.clone()
            zk[:, :, k * per_chunk:(k + 1) * per_chunk] += 1.0
            diff = (model.decode(zk, t) - base).abs().amax(dim=(0, 1, 3, 4))
            frames = torch.nonzero(diff > 0).flatten().tolist()
            changed.append((frames[0], frames[-1] + 1))
    edges = [0, *chunk_boundaries(t), t]
    assert changed == list(zip(edges[:-1], edges[1:])) == [(0, 17), (17, 34), (34, 40)]


# ----- seam dip and jump ----------------------------------------------------------------------------------------
def test_injected_discontinuity_at_one_boundary_is_found():
    """Error 0.01 everywhere, 0.1 on frame 34 (first of the third chunk): dip 10 dB at boundary 34, 0 at 17."""
    orig = moving_clip(51)
    amp = torch.full((51,), 0.01)
    amp[34] = 0.1
    rec = orig + amp[None, :, None, None, None] * checkerboard()
    s = seam_scores(orig, rec)[0]
    assert s["boundaries"] == [17, 34]
    assert s["interior_psnr"] == pytest.approx(40.0, abs=1e-3)
    assert s["seam_psnr"] == pytest.approx((3 * 40.0 + 20.0) / 4, abs=1e-3)  # frames 16, 17, 33, 34
    assert s["seam_dip_db"] == pytest.approx(5.0, abs=1e-3)
    b17, b34 = s["per_boundary"]
    assert (b17["boundary"], b34["boundary"]) == (17, 34)
    assert b17["dip_db"] == pytest.approx(0.0, abs=1e-3)
    assert b34["seam_psnr"] == pytest.approx(30.0, abs=1e-3) and b34["dip_db"] == pytest.approx(10.0, abs=1e-3)
    # the pop into frame 34 is a jump there, not at 17
    assert b34["jump_excess"] > 15 and abs(b17["jump_excess"]) < 0.05
    assert s["interior_jump"] == pytest.approx(0.0, abs=1e-3)  # same error every interior frame: no change


def test_brightness_step_after_a_boundary_flags_that_boundary_only():
    orig = moving_clip(51)
    rec = orig.clone()
    rec[:, 17:] += 0.05  # the chunk from frame 17 on decodes brighter (values stay in [0.35, 0.75])
    s = seam_scores(orig, rec)[0]
    b17, b34 = s["per_boundary"]
    d_orig = (orig[0, 17] - orig[0, 16]).double()
    expected = 255 * float((d_orig + 0.05).abs().mean() - d_orig.abs().mean())
    assert b17["jump"] == pytest.approx(expected, abs=1e-4)
    assert 8 < expected < 12.75  # less than 255 * 0.05: part of the step hides in the original's motion
    assert b17["jump_excess"] == pytest.approx(expected, abs=1e-4)
    assert abs(b34["jump"]) < 1e-4 and abs(b34["jump_excess"]) < 1e-4
    assert s["seam_jump_excess"] == pytest.approx(expected / 2, abs=1e-4)  # mean over the two boundaries


def test_noise_uniform_over_time_gives_no_dip():
    orig = moving_clip(68, 48, 48)
    g = torch.Generator().manual_seed(1)
    rec = orig + 0.02 * torch.randn(orig.shape, generator=g)
    s = seam_scores(orig, rec)[0]
    assert s["boundaries"] == [17, 34, 51]
    assert s["seam_psnr"] == pytest.approx(psnr_of(0.02), abs=0.2)
    assert abs(s["seam_dip_db"]) < 0.15
    assert all(abs(b["dip_db"]) < 0.3 for b in s["per_boundary"])
    assert abs(s["seam_jump_excess"]) < 0.2 and s["interior_jump"] > 1  # noise does add change, evenly


def test_one_chunk_clip_is_flat_and_json_safe():
    orig = moving_clip(17)
    rec = orig + 0.01 * checkerboard()
    rec[:, 8] += 0.05  # a bad frame inside the chunk is no seam
    for clip in (orig, orig[:, :5]):
        r = rec[:, :clip.shape[1]]
        s = temporal_scores(clip, r)[0]
        assert s["boundaries"] == [] and s["per_boundary"] == []
        assert s["seam_psnr"] is None and s["seam_jump"] is None
        assert s["seam_dip_db"] == 0.0 and s["seam_jump_excess"] == 0.0
        assert s["interior_psnr"] is not None and s["temporal_consistency"] is not None
        json.dumps(s, allow_nan=False)  # no NaN reaches the JSON
    one = temporal_scores(orig[:, :1], rec[:, :1])[0]
    assert one["interior_jump"] is None and one["temporal_consistency"] is None


def test_explicit_boundaries_and_window():
    orig = moving_clip(30)
    amp = torch.full((30,), 0.01)
    amp[[9, 10, 11, 12]] = 0.1
    rec = orig + amp[None, :, None, None, None] * checkerboard()
    s = seam_scores(orig, rec, boundaries=[11], window=2)[0]  # seam frames 9..12
    assert s["seam_psnr"] == pytest.approx(20.0, abs=1e-3) and s["interior_psnr"] == pytest.approx(40.0, abs=1e-3)
    assert s["seam_dip_db"] == pytest.approx(20.0, abs=1e-3)
    assert seam_scores(orig, rec, chunk=None)[0]["boundaries"] == []
    with pytest.raises(ValueError):
        seam_scores(orig, rec, boundaries=[0])
    with pytest.raises(ValueError):
        seam_scores(orig, rec, boundaries=[20, 10])
    # seams covering every frame leave no interior: None, not NaN
    full = seam_scores(orig[:, :4], rec[:, :4], boundaries=[2], window=2)[0]
    assert full["interior_psnr"] is None and full["seam_dip_db"] is None
    json.dumps(full, allow_nan=False)


def test_seam_scores_on_a_real_clip(sample_videos):
    from opensora_vae.metrics.pairs import load_clip

    orig = load_clip(sample_videos["carphone_pristine"], 40, crop_size=128)[None]
    rec = orig.clone()
    rec[:, 34] = (rec[:, 34] + 0.1 * checkerboard(128, 128)).clamp(0, 1)  # only the first frame of the last chunk
    s = seam_scores(orig, rec)[0]
    b17, b34 = s["per_boundary"]
    assert s["interior_psnr"] == 100.0 and b17["seam_psnr"] == 100.0 and b17["dip_db"] == 0.0
    assert b34["seam_psnr"] == pytest.approx((100.0 + psnr_of(0.1)) / 2, abs=1.0)  # clamping trims a little error
    assert b34["jump_excess"] > 10 and b17["jump_excess"] == 0.0


# ----- temporal consistency -------------------------------------------------------------------------------------
def test_temporal_consistency_zero_for_identical_and_fixed_offset():
    orig = moving_clip(20)
    assert temporal_consistency(orig, orig.clone()) == [dict(temporal_consistency=0.0, temporal_consistency_max=0.0)]
    offset = 0.05 * torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tc = temporal_consistency(orig, orig + offset)[0]  # large per-frame error, constant in time
    assert tc["temporal_consistency"] < 1e-4 and tc["temporal_consistency_max"] < 1e-4
    assert seam_scores(orig, orig + offset)[0]["interior_psnr"] < 30


def test_temporal_consistency_grows_with_flicker():
    orig = moving_clip(20)
    sign = torch.tensor([(-1.0) ** s for s in range(20)])[None, :, None, None, None]
    small = temporal_consistency(orig, orig + 0.01 * sign)[0]
    large = temporal_consistency(orig, orig + 0.02 * sign)[0]
    # alternating +-f: the error changes by 2f at every step
    assert small["temporal_consistency"] == pytest.approx(255 * 0.02, abs=1e-4)
    assert large["temporal_consistency"] == pytest.approx(255 * 0.04, abs=1e-4)
    assert large["temporal_consistency_max"] == pytest.approx(255 * 0.04, abs=1e-4)
    rec = orig.clone()
    rec[:, 7] += 0.04  # one flicker: steps 7 and 8 change by 0.04, 17 others by 0
    one = temporal_consistency(orig, rec)[0]
    assert one["temporal_consistency_max"] == pytest.approx(255 * 0.04, abs=1e-4)
    assert one["temporal_consistency"] == pytest.approx(2 * 255 * 0.04 / 19, abs=1e-4)


def test_batch_and_summary():
    orig = torch.cat([moving_clip(35, seed=0), moving_clip(35, seed=1)])
    amp = torch.full((2, 35), 0.01)
    amp[1, 17] = 0.1
    rec = orig + amp[:, :, None, None, None] * checkerboard()
    clips = temporal_scores(orig, rec)
    assert [c["seam_dip_db"] for c in clips] == pytest.approx([0.0, 40.0 - (3 * 40.0 + 20.0) / 4], abs=1e-3)
    short = temporal_scores(orig[:1, :10], rec[:1, :10])[0]
    summary = summarize({"a": clips[0], "b": clips[1], "short": short})
    assert set(summary) == set(SCORES)
    dip = summary["seam_dip_db"]
    assert dip["available"] and dip["num_videos"] == 3  # the one-chunk clip counts as flat (0)
    assert dip["mean"] == pytest.approx(5.0 / 3, abs=1e-3)
    assert dip["std"] == pytest.approx(float(torch.tensor([0.0, 5.0, 0.0]).std(unbiased=False)), abs=1e-3)
    assert summary["seam_psnr"]["num_videos"] == 2 and "short" not in summary["seam_psnr"]["per_video"]
    none = summarize({"short": short}, scores=["seam_psnr"])
    assert none["seam_psnr"]["available"] is False
    json.dumps(summary, allow_nan=False)
