"""Winograd F(4x4, 3x3) convolutions (fp32 CPU inference fast path) against PyTorch's own."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import tiny_model_cfg, tiny_pipeline
from opensora_vae import build_model
from opensora_vae.models import speed
from opensora_vae.models.speed import subpixel, winograd
from opensora_vae.models.temporal import CausalConv3d


def assert_close(got, ref, tol=2e-5):
    # F(4x4, 3x3) in fp32 rounds to a few 1e-6 of the output's scale (its transforms multiply by up to 25).
    assert got.shape == ref.shape
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, err


@pytest.mark.parametrize("n,c,k,h,w,bias", [(2, 5, 7, 9, 11, True), (1, 3, 4, 8, 8, False), (3, 16, 8, 13, 6, True),
                                            (2, 8, 8, 1, 1, True), (1, 4, 6, 40, 70, False)])
@pytest.mark.parametrize("cols", [4, 256])
def test_conv2d_equals_f_conv2d(n, c, k, h, w, bias, cols):
    torch.manual_seed(0)
    x, wt = torch.randn(n, c, h, w), torch.randn(k, c, 3, 3)
    b = torch.randn(k) if bias else None
    got = winograd.conv2d(x, winograd.transform_weight(wt), b, cols=cols)
    assert_close(got, F.conv2d(x, wt, b, padding=1))
    assert got.is_contiguous()


@pytest.mark.parametrize("n,c,k,f,kt,h,w", [(1, 5, 7, 6, 3, 9, 11), (2, 4, 3, 5, 3, 8, 8), (1, 6, 6, 4, 1, 12, 5),
                                            (1, 3, 5, 7, 2, 21, 4)])
@pytest.mark.parametrize("cols", [3, 256])
def test_conv3d_equals_f_conv3d(n, c, k, f, kt, h, w, cols):
    torch.manual_seed(0)
    x, wt, b = torch.randn(n, c, f, h, w), torch.randn(k, c, kt, 3, 3), torch.randn(k)
    got = winograd.conv3d(x, winograd.transform_weight(wt), b, cols=cols)
    assert_close(got, F.conv3d(x, wt, b, padding=(0, 1, 1)))


def test_channels_last_input_equals_f_conv2d():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 10, 9).to(memory_format=torch.channels_last)
    wt, b = torch.randn(5, 6, 3, 3), torch.randn(5)
    assert_close(winograd.conv2d(x, winograd.transform_weight(wt), b), F.conv2d(x, wt, b, padding=1))


def test_shape_rule():
    assert winograd.wins(nn.Conv2d(256, 256, 3, padding=1))
    assert winograd.wins(nn.Conv2d(256, 128, 3, padding=1))
    assert not winograd.wins(nn.Conv2d(128, 128, 3, padding=1))  # transforms cost more than they save
    assert not winograd.wins(nn.Conv2d(512, 8, 3, padding=1))
    assert not winograd.wins(nn.Conv2d(256, 256, 3, stride=2, padding=1))
    assert not winograd.wins(nn.Conv2d(256, 256, 1))
    assert not winograd.wins(nn.Conv2d(256, 256, 3, padding=0))
    assert winograd.wins(nn.Conv3d(128, 128, 3, padding=(0, 1, 1)))
    assert not winograd.wins(nn.Conv3d(128, 128, 3, stride=(2, 1, 1), padding=(0, 1, 1)))


def test_module_uses_cached_weights_and_sees_weight_updates():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    speed.use_backend(conv, "winograd", force=True)
    x = torch.randn(4, 8, 16, 16)  # 64 tiles: MIN_TILES
    with torch.no_grad():
        first = conv(x)
        assert "_winograd_cache" in conv.__dict__
        assert_close(first, F.conv2d(x, conv.weight, conv.bias, padding=1))
        conv.weight.mul_(2)  # in place: the cache must be recomputed
        assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
        conv.weight = nn.Parameter(torch.randn_like(conv.weight))
        assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_training_keeps_the_plain_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    plain = nn.Conv2d(8, 8, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    speed.use_backend(conv, "winograd", force=True)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    out = conv(x)
    assert "_winograd_cache" not in conv.__dict__  # grad mode: the plain convolution ran
    out.square().sum().backward()
    x2 = x.detach().requires_grad_()
    plain(x2).square().sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(conv.weight.grad, plain.weight.grad)


def test_small_calls_keep_the_plain_convolution():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    speed.use_backend(conv, "winograd", force=True)
    with torch.no_grad():
        conv(torch.randn(3, 8, 16, 16))  # 48 tiles
        assert "_winograd_cache" not in conv.__dict__
        conv(torch.randn(1, 8, 32, 29))  # 8 x 8 tiles
        assert "_winograd_cache" in conv.__dict__


def test_causal_conv3d_through_winograd_and_back():
    # The shape rule as shipped (128 channels), a latent as small as a 64x64 clip's: Conv3d calls need no MIN_TILES.
    torch.manual_seed(0)
    conv = CausalConv3d(128, 128, 3)
    x = torch.randn(1, 128, 5, 8, 8)
    with torch.no_grad():
        plain = conv(x)  # PyTorch's path (a bare CausalConv3d has no backend; its VAE turns oneDNN on)
        assert speed.use_backend(conv, "winograd") == 1 and isinstance(conv.conv, speed.Conv3d)
        fast = conv(x)
        assert "_winograd_cache" in conv.conv.__dict__
        assert_close(fast, plain)
        speed.use_backend(conv, "winograd", enable=False)
        assert torch.equal(conv(x), plain)
        speed.use_backend(conv, "winograd")
    out = conv(x.requires_grad_())  # grad mode: the plain path and its backward
    assert torch.equal(out.detach(), plain)
    out.sum().backward()
    assert x.grad is not None
    assert speed.use_backend(conv, "winograd", enable=False) == 1 and type(conv.conv) is nn.Conv3d
    assert "_winograd_cache" not in conv.conv.__dict__


@pytest.mark.parametrize("how", ["enable", "build_model"])
def test_pipeline_fast_path_on_equals_off(monkeypatch, how):
    # The tiny widths are below the shape rule's thresholds: lower them so the tiny model's convolutions qualify.
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_REDUCTION", 1)
    monkeypatch.setattr(winograd, "MIN_TILES", 1)
    if how == "enable":
        model = tiny_pipeline()
        model.enable_winograd()
    else:
        model = build_model(dict(tiny_model_cfg(), winograd=True)).eval()
        model.load_state_dict(tiny_pipeline().state_dict())
    swapped = [m for m in model.spatial_vae.modules() if "winograd" in getattr(m, "backends", ())]
    temporal = [m for m in model.temporal_vae.decoder.modules() if "winograd" in getattr(m, "backends", ())]
    assert swapped and temporal
    assert not any("winograd" in getattr(m, "backends", ()) for m in model.temporal_vae.encoder.modules())
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.inference_mode():
        fast = model.decode(model.encode(x, sample_posterior=False), num_frames=9)
        # every swapped conv ran through Winograd but the upsamplers', which the sub-pixel path replaces
        upsampler_convs = {m.conv for m in model.spatial_vae.modules() if isinstance(m, subpixel.Upsample2D)}
        assert all(("_winograd_cache" in m.__dict__) != (m in upsampler_convs) for m in swapped)
        assert all("_winograd_cache" in m.__dict__ for m in temporal)
        model.disable_winograd()
        plain = model.decode(model.encode(x, sample_posterior=False), num_frames=9)
    # Measured 1.7e-5 (outputs up to 2.9; every convolution of the tiny model through F(4x4, 3x3)).
    torch.testing.assert_close(fast, plain, atol=5e-5, rtol=0)
    assert set(model.state_dict()) == set(tiny_pipeline().state_dict())
    model.disable_winograd()
    assert not any("winograd" in getattr(m, "backends", ()) for m in model.modules())
    assert not any("_winograd_cache" in m.__dict__ for m in model.modules())
    with pytest.raises(TypeError, match="enable_winograd"):
        build_model(dict(tiny_model_cfg()["vae_temporal"], winograd=True))
