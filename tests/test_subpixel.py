"""Sub-pixel upsampling (the spatial decoder's nearest-2x + 3x3 conv as folded 2x2 convolutions) against diffusers'."""
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D as DiffusersUpsample2D

from helpers import tiny_pipeline
from opensora_vae.models.speed import subpixel


def plain(x, w, b):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)


@pytest.mark.parametrize("n,c,k,h,w,bias", [(2, 5, 7, 9, 11, True), (1, 3, 4, 1, 1, False), (3, 8, 8, 6, 13, True)])
def test_upsample_conv_equals_interpolate_then_conv(n, c, k, h, w, bias):
    torch.manual_seed(0)
    x, wt = torch.randn(n, c, h, w), torch.randn(k, c, 3, 3)
    b = torch.randn(k) if bias else None
    got = subpixel.upsample_conv(x, subpixel.fold_weight(wt), b)
    assert got.shape == (n, k, 2 * h, 2 * w) and got.is_contiguous()
    torch.testing.assert_close(got, plain(x, wt, b), atol=1e-5, rtol=1e-5)
    # channels_last input: the strided interleave reads whatever layout the convolution returns
    got_cl = subpixel.upsample_conv(x.to(memory_format=torch.channels_last), subpixel.fold_weight(wt), b)
    torch.testing.assert_close(got_cl, got, atol=1e-5, rtol=1e-5)


def test_no_less_accurate_than_the_plain_path():
    # Fewer rounded products per output. Which path's single largest error is smaller depends on the oneDNN kernel
    # the CPU gets (one draw measured 1.70e-6 folded vs 1.58e-6 plain, others 1.4-1.5e-6 vs 1.6-1.9e-6), so no
    # strict order of two rounding errors: the RMS error over all outputs of four draws (stable; measured 0.78x the
    # plain path's) within 1.25x, and each draw's max error within 1.5x plus a floor of 1e-7 of the output's scale.
    rms, worst = {"plain": [], "sub": []}, []
    for seed in range(4):
        torch.manual_seed(seed)
        x, wt, b = torch.randn(2, 256, 12, 12), torch.randn(256, 256, 3, 3) / 48, torch.randn(256)
        exact = plain(x.double(), wt.double(), b.double())
        err = {"plain": (plain(x, wt, b).double() - exact).abs(),
               "sub": (subpixel.upsample_conv(x, subpixel.fold_weight(wt), b).double() - exact).abs()}
        for k, e in err.items():
            rms[k].append(e.square().mean())
        floor = 1e-7 * exact.abs().max()
        worst.append((err["sub"].max().item(), err["plain"].max().item(), floor.item()))
        assert err["sub"].max() <= 1.5 * err["plain"].max() + floor, worst[-1]
    rms = {k: torch.stack(v).mean().sqrt().item() for k, v in rms.items()}
    assert rms["sub"] <= 1.25 * rms["plain"], (rms, worst)


def test_gradients_equal_the_plain_path():
    torch.manual_seed(0)
    up = DiffusersUpsample2D(6, use_conv=True, out_channels=5)
    ref = DiffusersUpsample2D(6, use_conv=True, out_channels=5)
    ref.load_state_dict(up.state_dict())
    assert subpixel.use_subpixel(up) == 1 and type(up) is subpixel.Upsample2D
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 5, 10, 14)
    calls = []
    inner = subpixel.upsample_conv
    subpixel.upsample_conv = lambda *a: calls.append(1) or inner(*a)  # the spy: the folded path ran
    try:
        (up(x) * g).sum().backward()
    finally:
        subpixel.upsample_conv = inner
    assert calls == [1]
    (ref(x_ref) * g).sum().backward()
    assert "_subpixel_cache" not in up.conv.__dict__  # trainable weight: folded with autograd on each call
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(up.conv.weight.grad, ref.conv.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(up.conv.bias.grad, ref.conv.bias.grad, atol=1e-4, rtol=1e-5)


def test_cached_fold_follows_weight_updates_and_other_calls_fall_back():
    torch.manual_seed(0)
    up = DiffusersUpsample2D(4, use_conv=True)
    subpixel.use_subpixel(up)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        up(x)
        assert "_subpixel_cache" in up.conv.__dict__
        up.conv.weight.mul_(2)  # in place: the cached fold must not be reused
        torch.testing.assert_close(up(x), plain(x, up.conv.weight, up.conv.bias), atol=1e-5, rtol=1e-5)
        # an explicit output size is the parent's path, bit for bit
        ref = DiffusersUpsample2D.forward(up, x, output_size=(13, 11))
        assert torch.equal(up(x, output_size=(13, 11)), ref)
    assert subpixel.use_subpixel(up, enable=False) == 1
    assert type(up) is DiffusersUpsample2D and "_subpixel_cache" not in up.conv.__dict__


def test_pipeline_uses_it_by_default_and_can_turn_it_off():
    model = tiny_pipeline()
    ups = [m for m in model.spatial_vae.modules() if isinstance(m, DiffusersUpsample2D)]
    assert ups and all(type(m) is subpixel.Upsample2D for m in ups)
    keys = set(model.state_dict())
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.inference_mode():
        z = model.encode(x, sample_posterior=False)
        fast = model.decode(z, num_frames=9)
        assert all("_subpixel_cache" in m.conv.__dict__ for m in ups)  # each ran the folded path
        model.disable_subpixel()
        assert all(type(m) is DiffusersUpsample2D for m in ups)
        assert not any("_subpixel_cache" in m.__dict__ for m in model.modules())
        ref = model.decode(z, num_frames=9)
        model.enable_subpixel()
        again = model.decode(z, num_frames=9)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    assert torch.equal(again, fast)
    assert set(model.state_dict()) == keys


def test_build_model_option_turns_it_off():
    from helpers import tiny_model_cfg
    from opensora_vae import build_model

    model = build_model(dict(tiny_model_cfg(), subpixel=False))
    ups = [m for m in model.modules() if isinstance(m, DiffusersUpsample2D)]
    assert ups and all(type(m) is DiffusersUpsample2D for m in ups)
    assert all(type(m) is subpixel.Upsample2D for m in build_model(tiny_model_cfg()).modules()
               if isinstance(m, DiffusersUpsample2D))
    # an option a model cannot turn off is left alone; one it cannot turn on is an error
    build_model(dict(tiny_model_cfg()["vae_temporal"], subpixel=False, winograd=False))
    with pytest.raises(TypeError, match="enable_subpixel"):
        build_model(dict(tiny_model_cfg()["vae_temporal"], subpixel=True))
