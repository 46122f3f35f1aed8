"""rFVD: Frechet distance against closed forms, feature statistics, the I3D extractor's preprocessing and weights."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d
from cdfvd.third_party.i3d.utils import preprocess_i3d

from opensora_vae.metrics import fvd as fvd_mod
from opensora_vae.metrics.fvd import (
    I3D_FILENAME,
    I3D_URL,
    FeatureMoments,
    FVDAccumulator,
    feature_statistics,
    frechet_distance,
    load_i3d,
    rfvd,
)
from opensora_vae.perceptual import MissingWeightsError

# few clips on purpose (speed): silence only the "unreliable" warning, which test_few_clips_warn checks
pytestmark = pytest.mark.filterwarnings("ignore:FVD from .* clips is unreliable:UserWarning")


def _closed_form_commuting(mu1, a, mu2, b):
    """FD of N(mu1, Q diag(a) Q^T) and N(mu2, Q diag(b) Q^T): (S1 S2)^(1/2) = Q diag(sqrt(a b)) Q^T."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def _random_spd(rng, d, cond=10.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(1.0, cond, d)) @ q.T


# ------------------------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 5.0, d), rng.uniform(0.1, 5.0, d)
    want = _closed_form_commuting(mu1, a, mu2, b)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-6)


def test_frechet_distance_commuting_closed_form_and_singular():
    rng = np.random.default_rng(1)
    d = 40
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    a[:15] = 0.0  # rank-deficient, as with fewer clips than feature dimensions
    b[10:20] = 0.0
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    want = _closed_form_commuting(mu1, a, mu2, b)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
    # torch float32 inputs are promoted to float64
    got = frechet_distance(torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu2), torch.tensor(s2))
    assert got == pytest.approx(want, rel=1e-6)


def test_frechet_distance_non_commuting_2d_closed_form():
    # 2x2: tr M^(1/2) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 (real positive eigenvalues)
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.1, 0.4])
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)


def test_frechet_distance_matches_scipy_sqrtm_route():
    rng = np.random.default_rng(2)
    d = 50
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d, cond=100.0)
    root = scipy.linalg.sqrtm(s1 @ s2)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root.real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 80)) * 3 + 5  # 30 samples in 80-d: singular covariance
    mu, sigma = feature_statistics(x)
    assert frechet_distance(mu, sigma, mu, sigma) <= 1e-10 * np.trace(sigma)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([0.0, np.nan]), np.eye(2), np.zeros(2), np.eye(2))


# -------------------------------------------------------------------------------------------------- statistics

def test_feature_statistics_population_covariance():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((100, 7)) + 10
    mu, sigma = feature_statistics(x.astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, x32.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x32, rowvar=False, ddof=0), rtol=1e-10, atol=1e-12)


def test_streaming_moments_match_batch_statistics_and_merge():
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((50, 6)) * 2 + 3)
    whole_mu, whole_sigma = feature_statistics(x)
    streamed = FeatureMoments(6)
    for i in range(0, 50, 7):  # uneven batches
        streamed.add(x[i : i + 7])
    first, second = FeatureMoments(6), FeatureMoments(6)
    first.add(x[:20])
    second.add(x[20:])
    merged = FeatureMoments.from_state(first.state()).merge(second)  # what a caller does with gathered states
    for m in (streamed, merged):
        assert m.count == 50
        mu, sigma = m.statistics()
        np.testing.assert_allclose(mu, whole_mu, rtol=1e-12)
        np.testing.assert_allclose(sigma, whole_sigma, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="dimension"):
        FeatureMoments(5).merge(first)


def test_all_reduce_round_trip_single_rank(tmp_path):
    import torch.distributed as dist

    x = torch.randn(9, 4, dtype=torch.float64)
    m = FeatureMoments(4)
    m.add(x)
    before = m.state()
    assert m.all_reduce() is m  # no process group: unchanged
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m.all_reduce()
    finally:
        dist.destroy_process_group()
    after = m.state()
    assert m.count == 9
    for k in before:
        assert torch.equal(before[k], after[k])


def test_too_few_clips_and_few_clips_warn():
    m = FeatureMoments(3)
    m.add(torch.randn(1, 3))
    with pytest.raises(ValueError, match="at least 2 clips"):
        m.statistics()
    with pytest.raises(ValueError, match="at least 2 clips"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2 clips"):
        rfvd(torch.rand(1, 9, 3, 8, 8), torch.rand(1, 9, 3, 8, 8), extractor=lambda c: c.flatten(1))


@pytest.mark.filterwarnings("default")
def test_few_clips_warn():
    with pytest.warns(UserWarning, match="unreliable"):
        feature_statistics(np.random.default_rng(0).standard_normal((4, 4)))  # needs >= 5 clips in 4-d


# ------------------------------------------------------------------------------------------------ I3D extractor

@pytest.fixture(scope="module")
def random_i3d():
    return load_i3d(random_weights=True, num_frames=9)  # 9: the fewest frames I3D takes (speed)


def test_preprocessing_matches_cdfvd(random_i3d):
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (2, 11, 3, 20, 36), dtype=torch.uint8, generator=g)
    x = random_i3d.preprocess(clips)
    assert x.shape == (2, 3, 9, 224, 224) and x.dtype == torch.float32
    assert -1.0 <= x.min().item() < -0.9 and 0.9 < x.max().item() <= 1.0
    # cd-fvd takes (B, T, H, W, C) uint8 numpy; the first 9 frames, same operations: bit-identical
    ref = preprocess_i3d(clips[:, :9].permute(0, 1, 3, 4, 2).numpy())
    assert torch.equal(x, ref)
    # float input in [0, 1] is the same clip
    torch.testing.assert_close(random_i3d.preprocess(clips.float() / 255), ref, atol=1e-5, rtol=0)


def test_default_protocol_takes_16_frames():
    ext = fvd_mod.I3DFeatureExtractor(InceptionI3d(400), num_frames=None)
    assert ext.preprocess(torch.rand(1, 10, 3, 8, 8)).shape == (1, 3, 10, 224, 224)
    ext.num_frames = fvd_mod.NUM_FRAMES
    assert ext.preprocess(torch.rand(1, 17, 3, 8, 8)).shape == (1, 3, 16, 224, 224)
    with pytest.raises(ValueError, match="at least 16 frames"):
        ext.preprocess(torch.rand(1, 12, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, T, 3, H, W\)"):
        ext.preprocess(torch.rand(1, 16, 8, 8))


def test_rfvd_self_is_zero_and_grows_with_noise(random_i3d):
    g = torch.Generator().manual_seed(1)
    real = torch.rand(3, 9, 3, 16, 16, generator=g)
    noise = torch.randn(real.shape, generator=g)
    acc = FVDAccumulator(random_i3d, batch_size=2)  # uneven chunks: 2 + 1
    acc.update(real, real.clone())  # features computed twice: self-distance includes any nondeterminism
    same = acc.compute()

    def against_real(fake):  # reuses the real clips' moments (I3D on CPU is the slow part of this file)
        other = FVDAccumulator(random_i3d)
        other.real.merge(acc.real)
        other.fake.add(random_i3d(fake))
        return other.compute()

    small = against_real((real + 0.05 * noise).clamp(0, 1))
    large = against_real((real + 0.2 * noise).clamp(0, 1))
    assert 0 < small < large
    assert same < 1e-6 * small


def test_accumulator_equals_rfvd_and_does_not_depend_on_batches():
    def extractor(clips):  # cheap stand-in: per-frame channel means
        return clips.float().mean(dim=(3, 4)).flatten(1)

    g = torch.Generator().manual_seed(2)
    real, fake = torch.rand(10, 4, 3, 5, 5, generator=g), torch.rand(10, 4, 3, 5, 5, generator=g)
    want = rfvd(real, fake, extractor, batch_size=64)
    assert rfvd(real, fake, extractor, batch_size=3) == pytest.approx(want, rel=1e-9)
    acc, other = FVDAccumulator(extractor), FVDAccumulator(extractor, dim=12)
    acc.update(real[:6], fake[:6])
    other.update(real[6:], fake[6:])  # e.g. another rank's share
    assert acc.merge(other.state()).compute() == pytest.approx(want, rel=1e-9)


# ------------------------------------------------------------------------------------------------------ weights

def test_missing_weights_names_file_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(fvd_mod, "_cdfvd_download_path", lambda: tmp_path / "cdfvd" / I3D_FILENAME)
    with pytest.raises(MissingWeightsError) as err:
        load_i3d()
    msg = str(err.value)
    place = str(tmp_path / "hub" / "checkpoints" / I3D_FILENAME)
    assert I3D_FILENAME in msg and I3D_URL in msg and place in msg
    assert err.value.searched == [place, str(tmp_path / "cdfvd" / I3D_FILENAME)]
    with pytest.raises(MissingWeightsError, match="nowhere.pt"):
        load_i3d(weights=tmp_path / "nowhere.pt")


def test_weights_from_file_and_hub_cache(tmp_path, monkeypatch):
    torch.manual_seed(3)
    state = InceptionI3d(400).state_dict()
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / I3D_FILENAME)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    for ext in (load_i3d(weights=tmp_path / "checkpoints" / I3D_FILENAME), load_i3d()):
        assert not ext.training and not any(p.requires_grad for p in ext.parameters())
        loaded = ext.net.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a state dict for cd-fvd's InceptionI3d"):
        load_i3d(weights=bad)
