"""SSIM / PSNR / LPIPS / FloLPIPS definitions against scikit-image, hand computations and the lpips package."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from opensora_vae.metrics import flolpips, load_clip, lpips, psnr, ssim
from opensora_vae.perceptual import build_lpips


def _pair(seed=0, shape=(2, 3, 3, 24, 30), noise=0.1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=dtype)
    b = (a + noise * torch.randn(shape, generator=g, dtype=dtype)).clamp(0, 1)
    return a, b


def _skimage_ssim(x: np.ndarray, y: np.ndarray, full=False):
    return structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=0, full=full
    )


def test_ssim_matches_skimage_valid_region():
    a, b = _pair()
    ours = ssim(a, b)
    assert ours.shape == (2, 3) and ours.dtype == torch.float64
    for i in range(2):
        for t in range(3):
            x, y = a[i, t].numpy(), b[i, t].numpy()
            # skimage's full map is padded (reflect); its interior 5 px in is exactly our valid-region map
            _, smap = _skimage_ssim(x, y, full=True)
            interior = smap[:, 5:-5, 5:-5].mean(axis=(1, 2)).mean()
            assert ours[i, t].item() == pytest.approx(interior, abs=1e-6)
            assert ours[i, t].item() == pytest.approx(_skimage_ssim(x, y), abs=1e-6)


def test_ssim_single_window_by_hand():
    # an 11x11 frame has exactly one valid window: SSIM from Gaussian-weighted moments of the whole frame
    a, b = _pair(seed=1, shape=(1, 1, 1, 11, 11), noise=0.2)
    x, y = a[0, 0, 0].numpy(), b[0, 0, 0].numpy()
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy, cxy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2, (w * x * y).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    want = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert ssim(a, b).item() == pytest.approx(want, abs=1e-10)


def test_ssim_constant_frames_and_channel_mean():
    # constant frames: variances vanish, SSIM = (2pq + C1) / (p^2 + q^2 + C1); channels are averaged
    p = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    q = torch.tensor([0.3, 0.5, 0.1], dtype=torch.float64)
    a = p.view(1, 1, 3, 1, 1).expand(1, 1, 3, 16, 16)
    b = q.view(1, 1, 3, 1, 1).expand(1, 1, 3, 16, 16)
    c1 = 0.01**2
    want = ((2 * p * q + c1) / (p**2 + q**2 + c1)).mean().item()
    assert ssim(a, b).item() == pytest.approx(want, abs=1e-12)


def test_ssim_identical_is_one_and_rejects_small_frames():
    a, _ = _pair(shape=(1, 2, 3, 12, 12))
    assert torch.allclose(ssim(a, a), torch.ones(1, 2, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[..., :10, :], a[..., :10, :])


def test_psnr_matches_skimage_and_hand_cases():
    a, b = _pair(seed=2)
    ours = psnr(a, b)
    assert ours.shape == (2, 3)
    for i in range(2):
        for t in range(3):
            want = peak_signal_noise_ratio(a[i, t].numpy(), b[i, t].numpy(), data_range=1.0)
            assert ours[i, t].item() == pytest.approx(want, abs=1e-6)
    zero = torch.zeros(1, 3, 3, 8, 8, dtype=torch.float64)
    # mse 0.01 -> 20 dB; 4e-10 -> 20 log10(1 / 2e-5); 2.5e-11 < 1e-10 -> capped at 100; identical -> 100
    offsets = torch.tensor([0.1, 2e-5, 5e-6], dtype=torch.float64).view(1, 3, 1, 1, 1)
    got = psnr(zero, zero + offsets)[0].tolist()
    assert got == pytest.approx([20.0, 20 * math.log10(1 / 2e-5), 100.0], abs=1e-6)
    assert psnr(a, a).eq(100.0).all()


@pytest.fixture(scope="module")
def lpips_model():
    torch.manual_seed(0)  # the random trunk is drawn from the global RNG; fix it so scores are reproducible
    return build_lpips("alex", random_backbone=True)


def test_lpips_is_the_package_metric_on_minus1_1(lpips_model):
    a, b = _pair(seed=3, shape=(2, 2, 3, 32, 32), noise=0.2, dtype=torch.float32)
    ours = lpips(a, b, model=lpips_model)
    assert ours.shape == (2, 2)
    with torch.no_grad():
        want = lpips_model(a.flatten(0, 1), b.flatten(0, 1), normalize=True).reshape(2, 2)
    assert torch.allclose(ours, want, atol=1e-6)
    assert (ours > 0).all()
    assert lpips(a, a, model=lpips_model).abs().max().item() == 0.0


def test_lpips_builds_random_backbone_through_build_lpips():
    a, b = _pair(seed=4, shape=(1, 2, 3, 32, 32), dtype=torch.float32)
    out = lpips(a, b, net="alex", random_backbone=True)
    assert out.shape == (1, 2) and torch.isfinite(out).all()


def _const_flow(first, second):
    # spatially constant flow that differs between clips: the FloLPIPS weights become uniform
    return first.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 2, *first.shape[-2:]).clone()


def test_flolpips_identical_clips_is_zero_last_frame_nan(lpips_model):
    a, _ = _pair(seed=5, shape=(2, 3, 3, 64, 64), dtype=torch.float32)
    out = flolpips(a, a.clone(), lpips_model=lpips_model, random_weights=True)
    assert out.shape == (2, 3)
    assert torch.isnan(out[:, -1]).all()
    assert out[:, :-1].abs().max().item() == 0.0


def test_flolpips_uniform_flow_difference_reduces_to_lpips_of_frame_t(lpips_model):
    a, b = _pair(seed=6, shape=(2, 4, 3, 32, 32), noise=0.2, dtype=torch.float32)
    out = flolpips(a, b, lpips_model=lpips_model, flow_model=_const_flow)
    want = lpips(a, b, model=lpips_model)[:, :-1]
    assert torch.allclose(out[:, :-1], want, rtol=1e-4, atol=1e-7)


def test_flolpips_weights_follow_flow_difference(lpips_model):
    # flow differs only on the left half: the score is the LPIPS map averaged over that half, so corrupting
    # only the right half of the generated frame leaves it far below corrupting only the left half
    def left_half_flow(first, second):
        flow = torch.zeros(first.shape[0], 2, *first.shape[-2:])
        flow[:, 0, :, : first.shape[-1] // 2] = first.mean(dim=(1, 2, 3)).view(-1, 1, 1) * 10
        return flow

    a, _ = _pair(seed=7, shape=(1, 2, 3, 64, 64), dtype=torch.float32)
    noise = 0.3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(9))
    right, left = a.clone(), a.clone()
    right[..., 40:] = (a + noise)[..., 40:].clamp(0, 1)
    left[..., :24] = (a + noise)[..., :24].clamp(0, 1)
    score_right = flolpips(a, right, lpips_model=lpips_model, flow_model=left_half_flow)[0, 0]
    score_left = flolpips(a, left, lpips_model=lpips_model, flow_model=left_half_flow)[0, 0]
    assert score_left > 2 * score_right > 0


def test_flolpips_with_random_pwcnet_is_finite(lpips_model):
    a, b = _pair(seed=8, shape=(1, 3, 3, 48, 40), noise=0.2, dtype=torch.float32)
    out = flolpips(a, b, lpips_model=lpips_model, random_weights=True)
    assert out.shape == (1, 3) and torch.isfinite(out[:, :-1]).all() and (out[:, :-1] > 0).all()
    with pytest.raises(ValueError, match="at least 2 frames"):
        flolpips(a[:, :1], b[:, :1], lpips_model=lpips_model, random_weights=True)


def test_real_pair_carphone_pinned(sample_videos):
    # carphone_distorted is a compressed copy of carphone_pristine (176x144); frames 0, 2, ..., 14
    real = load_clip(sample_videos["carphone_pristine"], num_frames=8, sample_rate=2)[None]
    gen = load_clip(sample_videos["carphone_distorted"], num_frames=8, sample_rate=2)[None]
    assert real.shape == (1, 8, 3, 144, 176)
    s, p = ssim(real, gen), psnr(real, gen)
    assert torch.isfinite(s).all() and torch.isfinite(p).all()
    assert s.mean().item() == pytest.approx(0.71514, abs=2e-3)
    assert p.mean().item() == pytest.approx(23.568, abs=0.05)
    # the batched implementation agrees with scikit-image on real content too
    x, y = real[0, 3].double().numpy(), gen[0, 3].double().numpy()
    assert s[0, 3].item() == pytest.approx(_skimage_ssim(x, y), abs=1e-6)


# --- the chunked, threaded float64 SSIM / PSNR against straightforward float64 definitions ---------------------

def _plain_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Textbook SSIM in float64: full 11x11 window (no separable passes), five moment maps, valid region."""
    r = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(r**2) / (2 * 1.5**2))
    win = (torch.outer(g, g) / torch.outer(g, g).sum()).view(1, 1, 11, 11)
    x, y = a.double().flatten(0, 2).unsqueeze(1), b.double().flatten(0, 2).unsqueeze(1)
    f = lambda img: torch.nn.functional.conv2d(img, win)  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cov = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return m.mean(dim=(1, 2, 3)).view(a.shape[:3]).mean(dim=-1)


def _plain_psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a.double() - b.double()).pow(2).mean(dim=(2, 3, 4))
    return torch.where(mse < 1e-10, torch.full_like(mse, 100.0), 10 * torch.log10(1 / mse))


# float32 inputs are differenced in float32 (psnr.py): each squared term is off by at most 2^-23 relative
PSNR_BOUND = 10 * math.log10(1 + 2**-23) + 1e-12  # 5.2e-7 dB


def _adversarial_pairs():
    """Odd sizes, flat and bright constant regions, tiny differences, several dtypes."""
    a, b = _pair(seed=11, shape=(2, 3, 3, 23, 37), noise=0.05, dtype=torch.float32)
    yield "odd float32", a, b
    a, b = _pair(seed=12, shape=(1, 2, 2, 11, 13), noise=0.3)
    yield "one window row float64", a, b
    bright = torch.ones(1, 2, 3, 29, 31)
    yield "bright constant vs near", bright, bright - 2**-12
    yield "bright constant, mse under the cap", bright, bright - 2**-20
    flat = bright.clone() * 0.999
    flat[..., 10:20, 5:25] = 0.25  # flat regions with a hard edge
    yield "flat regions", flat, (flat + 1e-3 * torch.randn(flat.shape, generator=torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(13)
    u8 = torch.randint(0, 256, (1, 3, 3, 19, 27), dtype=torch.uint8, generator=g)
    v8 = (u8.int() + torch.randint(-3, 4, u8.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    yield "uint8 values", u8, v8
    yield "float16", u8.half() / 255, v8.half() / 255


@pytest.mark.parametrize("name", [n for n, _, _ in _adversarial_pairs()])
def test_ssim_psnr_equal_plain_float64_definitions(name):
    a, b = next((x, y) for n, x, y in _adversarial_pairs() if n == name)
    s, p = ssim(a, b), psnr(a, b)
    assert s.dtype == p.dtype == torch.float64 and s.shape == p.shape == a.shape[:2]
    assert (s - _plain_ssim(a, b)).abs().max().item() <= 1e-9
    assert (p - _plain_psnr(a, b)).abs().max().item() <= PSNR_BOUND


def test_psnr_float32_difference_worst_case_stays_within_bound():
    # true difference 0.5 + 2.5 ulp(0.5) + a little: float32 rounds it by almost half an ulp, on every pixel
    x = torch.full((1, 2, 3, 8, 8), 0.5 + 3 * 2**-24)
    y = torch.full((1, 2, 3, 8, 8), 2**-25 * (1 - 2**-10))
    err = (psnr(x, y) - _plain_psnr(x, y)).abs().max().item()
    assert 0.9 * (PSNR_BOUND - 1e-12) < err <= PSNR_BOUND < 1e-6  # the bound is tight and inside the 1e-6 target
    assert (psnr(x.double(), y.double()) - _plain_psnr(x, y)).abs().max().item() <= 1e-12  # float64 inputs: exact


def test_ssim_psnr_real_clip_odd_crop_equal_plain(sample_videos):
    real = load_clip(sample_videos["carphone_pristine"], num_frames=3)[None, :, :, 3:140, 1:174]  # 137x173
    gen = load_clip(sample_videos["carphone_distorted"], num_frames=3)[None, :, :, 3:140, 1:174]
    assert (ssim(real, gen) - _plain_ssim(real, gen)).abs().max().item() <= 1e-9
    assert (psnr(real, gen) - _plain_psnr(real, gen)).abs().max().item() <= PSNR_BOUND


def test_ssim_psnr_chunking_and_threads_do_not_change_values(monkeypatch):
    import importlib

    a, b = _pair(seed=14, shape=(2, 5, 3, 40, 44), noise=0.1, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one thread: chunks run in order in the caller
        s1, p1 = ssim(a, b), psnr(a, b)
        torch.set_num_threads(2)  # a pool of two threads: same chunks, same values bit for bit
        s2, p2 = ssim(a, b), psnr(a, b)
        assert torch.get_num_threads() == 2  # the pool's one-thread setting stays in its own threads
    finally:
        torch.set_num_threads(before)
    assert torch.equal(s1, s2) and torch.equal(p1, p2)
    # other chunkings (several planes per chunk; frames cut into uneven pieces) agree to rounding
    ssim_mod = importlib.import_module("opensora_vae.metrics.ssim")
    psnr_mod = importlib.import_module("opensora_vae.metrics.psnr")
    monkeypatch.setitem(ssim_mod._CHUNK_VALUES, "cpu", 7 * 40 * 44)
    monkeypatch.setitem(psnr_mod._CHUNK_VALUES, "cpu", 1000)
    assert (ssim(a, b) - s1).abs().max().item() <= 1e-12
    assert (psnr(a, b) - p1).abs().max().item() <= 1e-12
    assert (psnr(a, b) - _plain_psnr(a, b)).abs().max().item() <= PSNR_BOUND


def test_ssim_psnr_accept_inference_tensors_and_non_contiguous_views():
    a, b = _pair(seed=15, shape=(1, 4, 3, 30, 32), dtype=torch.float32)
    want_s, want_p = _plain_ssim(a, b), _plain_psnr(a, b)
    with torch.inference_mode():
        ai, bi = a.clone(), b.clone()
        assert (ssim(ai, bi) - want_s).abs().max().item() <= 1e-9
        assert (psnr(ai, bi) - want_p).abs().max().item() <= PSNR_BOUND
    at, bt = a.transpose(-1, -2).contiguous().transpose(-1, -2), b.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert (ssim(at, bt) - want_s).abs().max().item() <= 1e-9
    assert (psnr(at, bt) - want_p).abs().max().item() <= PSNR_BOUND


def test_map_chunks_keeps_order_and_raises_errors_from_helper_threads():
    from opensora_vae.metrics.chunks import map_chunks

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = []

        def fn(c, scratch):
            seen.append(torch.get_num_threads())  # every chunk runs with one intra-op thread
            scratch.setdefault("n", 0)
            scratch["n"] += 1
            return c * c

        assert map_chunks(fn, list(range(40)), torch.device("cpu")) == [c * c for c in range(40)]
        assert set(seen) == {1} and torch.get_num_threads() == 2

        def bad(c, scratch):
            if c == 17:
                raise RuntimeError("chunk 17 failed")
            return c

        with pytest.raises(RuntimeError, match="chunk 17 failed"):
            map_chunks(bad, list(range(40)), torch.device("cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
