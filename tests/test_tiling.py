"""Tiling's low-memory path (opensora_vae.models.speed.tiling, `recompute=True`): one tile == untiled, tiled ~=
untiled on a real clip (seams included; the mid-block per tile too), exact blending, whole-frame GroupNorm
statistics, odd sizes, streamed frames == whole, the bounded decode's whole-frame tensors, the CLI flag."""
import sys

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from opensora_vae.data import read_video
from opensora_vae import build_model
from opensora_vae.models.speed import tiling, winograd
from opensora_vae.models.speed.frame_attention import frame_attention

from helpers import ROOT, tiny_pipeline


def psnr(a, b, peak=2.0):
    return (10 * torch.log10(peak**2 / (a - b).square().mean())).item()


@pytest.fixture(scope="module")
def clip(sample_videos):
    """3 real frames, 64x80 (not a multiple of the test tiles), in [-1, 1]."""
    video, _ = read_video(sample_videos["bikes"])
    x = video[:3, :, 40:104, 200:280].permute(1, 0, 2, 3)[None].float() / 127.5 - 1
    return x.contiguous()


@pytest.fixture(scope="module")
def model():
    return tiny_pipeline(seed=1)


@pytest.mark.parametrize("tile_mid_block", [False, True])
def test_one_tile_and_disabled_give_untiled_exactly(model, clip, tile_mid_block):
    x = clip[..., :32, :48]
    with torch.no_grad():
        z = model.encode(x, sample_posterior=False)
        y = model.decode(z, num_frames=x.shape[2])
        model.enable_tiling(tile_size=64, overlap=16, temporal_tile_size=32, temporal_overlap=4,
                            tile_mid_block=tile_mid_block, recompute=True)
        try:
            assert torch.equal(model.encode(x, sample_posterior=False), z)
            assert torch.equal(model.decode(z, num_frames=x.shape[2]), y)
        finally:
            model.disable_tiling()
        model.enable_tiling(tile_size=32, overlap=0, temporal_tile_size=8, temporal_overlap=0)
        model.disable_tiling()
        assert torch.equal(model.encode(x, sample_posterior=False), z)
        assert torch.equal(model.decode(z, num_frames=x.shape[2]), y)


def _seam_mask(size, bounds, width):
    mask = torch.zeros(size, dtype=torch.bool)
    for b in bounds:
        mask[max(0, b - width):b + width] = True
    return mask


@pytest.mark.parametrize("part", ["spatial", "temporal"])
def test_tiled_close_to_untiled_on_a_real_clip_with_seams(model, clip, part):
    """Encode and decode of each VAE, tiled with whole-frame statistics vs untiled: globally and on the seams."""
    vae = model.spatial_vae if part == "spatial" else model.temporal_vae
    with torch.no_grad():
        x_z = model.spatial_vae.encode(clip, sample_posterior=False)
        if part == "spatial":
            enc = lambda: vae.encode(clip, sample_posterior=False)  # noqa: E731
            dec = lambda: vae.decode(x_z)  # noqa: E731
        else:
            z = vae.encode(x_z).mode()
            enc = lambda: vae.encode(x_z).mode()  # noqa: E731
            dec = lambda: vae.decode(z, num_frames=x_z.shape[2])  # noqa: E731
        plain = enc(), dec()
        vae.enable_tiling(tile_size=48, overlap=16, temporal_tile_size=24, temporal_overlap=8, recompute=True)
        naive = None
        try:
            tiled = enc(), dec()
            vae.enable_tiling(tile_size=48, overlap=16, temporal_tile_size=24, temporal_overlap=8, exact_norms=0)
            naive = enc(), dec()
        finally:
            vae.disable_tiling()
    # PSNR (dB) against untiled, globally and on the seams: measured (62.8, 58.7), (48.0, 41.4), (34.1, 29.6),
    # (32.9, 28.5); floors about 1 dB (spatial) / 0.5 dB (temporal) below. A merge of the tiles' statistics that
    # forgets the spread between tiles measured (54.2, 54.4) and (44.4, 41.0) for the spatial VAE, one that averages
    # tiles of different sizes as equals 33.1 and 31.8 for the temporal one: each fails a floor.
    floor = {("spatial", "encode"): (61.5, 57.5), ("spatial", "decode"): (47, 40.5),
             ("temporal", "encode"): (33.6, 29.2), ("temporal", "decode"): (32.4, 28)}
    for name, a, b, c in zip(("encode", "decode"), plain, tiled, naive):
        assert a.shape == b.shape
        g = psnr(a, b)
        assert g > floor[part, name][0], (name, g)
        assert g > psnr(a, c) + 3, (name, g, psnr(a, c))  # whole-frame statistics beat per-tile ones
        # The seams: output rows/columns within 2 pixels of the tile boundaries. Tiles are cut in the tiled
        # part's input: pixels (spatial encode), latent pixels (spatial decode: tile 48 / 2; temporal).
        tile, halo, align, ratio = {("spatial", "encode"): (48, 8, 2, 0.5), ("spatial", "decode"): (24, 4, 1, 2),
                                    ("temporal", "encode"): (24, 4, 1, 1),
                                    ("temporal", "decode"): (24, 4, 1, 1)}[part, name]
        h, w = a.shape[-2:]
        rows, cols = ([int(sp.core[0] * ratio) for sp in tiling.spans(int(n / ratio), tile, halo, align)[1:]]
                      for n in (h, w))
        assert rows or cols, "the test frame must be split"
        seam = _seam_mask(h, rows, 2)[:, None] | _seam_mask(w, cols, 2)[None, :]
        # What is left on the seams is the convolutions' context beyond the overlap: small, and far below the
        # per-tile statistics' seams.
        s, s_naive = psnr(a[..., seam], b[..., seam]), psnr(a[..., seam], c[..., seam])
        assert s > floor[part, name][1] and s > s_naive + 3, (name, s, s_naive, g)


def test_blending_is_a_partition_of_unity():
    """Without GroupNorms, tiles of a pointwise map reproduce it: weights sum to one, crops line up."""
    x = torch.randn(2, 3, 37, 53)
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        for ratio, fn in (((1, 1), conv),
                          ((2, 1), lambda v: nn.functional.interpolate(conv(v), scale_factor=2, mode="nearest"))):
            want = fn(x)
            got = tiling.run_tiled(fn, conv, x, tile=16, halo=4, exact_norms=0, ratio=ratio)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        down = nn.AvgPool2d(2)  # ratio 1/2 with aligned tiles
        got = tiling.run_tiled(down, down, x[..., :36, :52], tile=16, halo=4, exact_norms=0, align=2, ratio=(1, 2))
        torch.testing.assert_close(got, down(x[..., :36, :52]), rtol=1e-5, atol=1e-5)


def test_exact_statistics_are_the_whole_frame_ones():
    """GroupNorms between pointwise maps: statistics recorded over the tile cores, norm by norm, equal the whole
    frame's, so tiles reproduce the untiled output."""
    net = nn.Sequential(nn.GroupNorm(2, 4), nn.Conv2d(4, 6, 1), nn.SiLU(), nn.GroupNorm(3, 6), nn.Conv2d(6, 3, 1))
    x = torch.randn(3, 4, 45, 61) * 3 + 1
    with torch.no_grad():
        got = tiling.run_tiled(net, net, x, tile=16, halo=2, exact_norms=None)
        torch.testing.assert_close(got, net(x), rtol=1e-4, atol=1e-4)
        naive = tiling.run_tiled(net, net, x, tile=16, halo=2, exact_norms=0)
        one = tiling.run_tiled(net, net, x, tile=16, halo=2, exact_norms=1)
        assert (one - net(x)).abs().max() > 1e-3
        assert (naive - net(x)).abs().max() > 1e-3  # the test can tell


def test_tiled_mid_block_close_to_untiled_on_a_real_clip(model, clip, monkeypatch):
    """tile_mid_block: the spatial decoder's mid-block per tile too, its attention over the whole frame (keys and
    values recomputed key tile by key tile), context for its convolutions: the whole-frame mid-block's result."""
    vae = model.spatial_vae
    calls = []
    monkeypatch.setattr(tiling, "frame_attention", lambda *a, **k: calls.append(1) or frame_attention(*a, **k))
    with torch.no_grad():
        x_z = vae.encode(clip, sample_posterior=False)
        plain = vae.decode(x_z)
        got, encoded = {}, None
        for mid in (False, True):
            vae.enable_tiling(tile_size=48, overlap=16, tile_mid_block=mid, recompute=True)
            try:
                got[mid] = vae.decode(x_z)
                if mid:  # the encoder keeps its whole-frame mid-block
                    assert torch.equal(vae.encode(clip, sample_posterior=False), encoded)
                else:
                    encoded = vae.encode(clip, sample_posterior=False)
            finally:
                vae.disable_tiling()
    assert got[True].shape == plain.shape
    assert len(calls) >= 4  # the spy: the mid-block ran per tile (one call per tile and pass at least)
    assert psnr(plain, got[True]) > 45, psnr(plain, got[True])  # measured 48.0 (tile-local attention: 28.4)
    torch.testing.assert_close(got[True], got[False], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("key_tile", [100, 13, 5, 4])  # one part, whole rows, parts that do not divide the frame
def test_frame_attention_over_key_tiles_equals_the_attention_block(heads, key_tile):
    """Keys/values streamed key tile by key tile (online softmax), the frame's GroupNorm statistics replayed for
    each as tiled decoding does: the attention block's own whole-frame output, for any query tile."""
    torch.manual_seed(0)
    attn = Attention(32, heads=heads, dim_head=32 // heads, rescale_output_factor=2.0, eps=1e-6, norm_num_groups=4,
                     residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)
    x = torch.randn(2, 32, 13, 17) * 2 + 0.5
    tap = tiling._NormTap(attn)
    v = x.reshape(2, 4, -1)
    tap.use[0] = (v.mean(-1), v.var(-1, unbiased=False))

    def parts():
        for hs in tiling.spans(13, key_tile, 0):
            for ws in tiling.spans(17, key_tile, 0):
                with tap.nested(0):
                    yield x[..., hs.core[0]:hs.core[1], ws.core[0]:ws.core[1]]

    with torch.no_grad():
        want = attn(x)
        with tap.active():
            for rows, cols in ((slice(None), slice(None)), (slice(2, 9), slice(3, 11))):
                tap.seq = 0
                got = frame_attention(attn, x[..., rows, cols], parts(), score_elems=512)
                assert tap.seq == 1  # the key tiles' norm calls do not count in the outer forward
                torch.testing.assert_close(got, want[..., rows, cols], rtol=1e-5, atol=1e-5)


def test_exact_statistics_of_a_flattened_norm_at_a_lower_resolution():
    """An attention block's GroupNorm sees (N, C, H * W) at the tile's resolution / 2 (the encoder's mid-block):
    its statistics are recorded over the tile cores like the others', so tiles reproduce the untiled output."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool, self.norm, self.conv = nn.AvgPool2d(2), nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            x = self.pool(x)
            n, c, h, w = x.shape
            return self.conv(self.norm(x.reshape(n, c, h * w)).reshape(n, c, h, w))

    net = Net()
    x = torch.randn(2, 4, 44, 60) * 3 + 1
    with torch.no_grad():
        got = tiling.run_tiled(net, net, x, tile=16, halo=2, exact_norms=None, align=2, ratio=(1, 2))
        torch.testing.assert_close(got, net(x), rtol=1e-4, atol=1e-4)
        naive = tiling.run_tiled(net, net, x, tile=16, halo=2, exact_norms=0, align=2, ratio=(1, 2))
        assert (naive - net(x)).abs().max() > 1e-3


# (h, w) -> floors against untiled for per-tile statistics on the random tiny model: decode PSNR (measured 15.05,
# 16.40, 19.73 dB) and latent MSE relative to the latents' power (measured 0.077, 0.051, 0.038)
_ODD = {(64, 80): (14.5, 0.1), (16, 80): (15.8, 0.07), (64, 16): (19.2, 0.05)}


def test_odd_sizes_and_frames_smaller_than_a_tile(model, clip):
    with torch.no_grad():
        for (h, w), (floor, rel) in _ODD.items():
            x = clip[:, :, :3, :h, :w]
            z0 = model.encode(x, sample_posterior=False)
            plain = model.decode(z0, num_frames=3)
            model.enable_tiling(tile_size=48, overlap=16, temporal_tile_size=10, temporal_overlap=4, exact_norms=0)
            try:
                z = model.encode(x, sample_posterior=False)
                out = model.decode(z0, num_frames=3)
            finally:
                model.disable_tiling()
            assert list(z.shape[2:]) == model.get_latent_size([3, h, w]) and out.shape == x.shape
            err, dec = float(((z - z0) ** 2).mean() / (z0 ** 2).mean()), psnr(plain.clamp(-1, 1), out.clamp(-1, 1))
            assert err < rel and dec > floor, (h, w, err, dec)


def test_bounded_tiled_decode_holds_no_whole_frame_tensor_but_the_latents_and_output():
    """tile_mid_block: the only tensors made at a whole frame's H/W, at any of the decoder's resolutions, are the
    un-normalised latent chunk, the temporal VAE's output (kept frames only) and the output: everything else is
    tile-sized, so memory beyond these does not grow with the frame size (the values: the tests above)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny_pipeline(seed=1)
    frames, h, w = 2, 96, 112  # 3 x 3 tiles, key tiles smaller than the frame; 4 decoded frames, 2 kept
    z = torch.randn(1, 4, *model.get_latent_size([frames, h, w]), generator=torch.Generator().manual_seed(0))
    factor = model.spatial_vae.patch_size[1]
    whole = {(h >> k, w >> k) for k in range(factor.bit_length())}
    made = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and not func.overloadpacket.__name__.endswith("_"):  # in-place ops write in place
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t._base is None and tuple(t.shape[-2:]) in whole:
                        made.append(tuple(t.shape))
            return out

    model.enable_tiling(tile_size=48, overlap=16, tile_mid_block=True)
    with torch.inference_mode(), Allocations():
        model.decode(z, num_frames=frames)
    lat = tuple(z.shape[-2:])
    assert sorted(made) == sorted([z.shape, (1, 4, frames, *lat), (1, 3, frames, h, w)]), made


def test_bad_tiling_arguments_are_refused(model):
    with pytest.raises(ValueError, match="multiples of 16"):
        model.enable_tiling(tile_size=100)
    with pytest.raises(ValueError, match="no core"):
        model.enable_tiling(tile_size=64, overlap=32)
    with pytest.raises(ValueError, match="exact_norms"):
        model.enable_tiling(exact_norms=-1)


@pytest.mark.parametrize("micro", [1, 3, 4])
def test_streamed_micro_batches_equal_the_whole_batch(micro, clip):
    """Frames go through micro-batches into one preallocated output (also across videos of a batch)."""
    x = torch.cat([clip, clip.flip(-1)])[..., :16, :24]
    whole = tiny_pipeline(seed=4, micro_batch_size=None)
    chunked = tiny_pipeline(seed=4, micro_batch_size=micro)
    with torch.no_grad():
        a = whole.spatial_vae.encode(x, sample_posterior=False)
        b = chunked.spatial_vae.encode(x, sample_posterior=False)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chunked.spatial_vae.decode(a), whole.spatial_vae.decode(a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("script, entry", [("inference_vae", "reconstruct_dataset"),
                                           ("encode_latents", "encode_dataset"), ("train_vae", "Trainer")])
def test_tiling_compile_and_winograd_flags_reach_the_model(monkeypatch, script, entry):
    """Every CLI shares the runtime flags (opensora_vae.cli): each sets model.<option>, which build_model applies."""
    sys.path.insert(0, str(ROOT / "scripts"))
    module = __import__(script)

    seen = {}

    class Job:  # records the config the script would run with
        def __init__(self, cfg, *args, **kwargs):
            seen.update(cfg=cfg)

        train = close = lambda self: None
        preempted = None

    monkeypatch.setattr(module, entry, Job)
    config = ROOT / "configs" / "vae" / "tiny" / ("stage1.py" if script == "train_vae" else "inference.py")
    base = [str(config), "--data-path", "x.csv"] + ([] if script == "train_vae" else ["--save-dir", "out"])

    def model_of(**replace):  # the config's model dict, built (compile is left to tests/test_speed.py)
        return build_model(dict(seen["cfg"].model, from_pretrained=None, compile=None, **replace))

    run = module.main
    run(base)
    assert seen["cfg"].model.get("tiling") is None and not seen["cfg"].model.get("compile")
    run(base + ["--tiling", "--tile-size", "256", "--compile", "--winograd"])
    assert dict(seen["cfg"].model.tiling) == {"tile_size": 256} and seen["cfg"].model.compile is True
    assert seen["cfg"].model.winograd is True and seen["cfg"].model.get("subpixel") is None
    model = model_of()
    assert model.spatial_vae.tiling.tile_size == model.temporal_vae.tiling.tile_size == 256
    assert not model.spatial_vae.tiling.tile_mid_block
    run(base + ["--tile-mid-block"])
    assert dict(seen["cfg"].model.tiling) == {"tile_mid_block": True}
    assert model_of().spatial_vae.tiling.tile_mid_block
    assert model_of(tiling=None).spatial_vae.tiling is None
    for flags in (["--no-subpixel"], ["--cfg-options", "model.subpixel=False"]):
        run(base + flags)
        plain = model_of()
        assert not any(type(m).__module__ == "opensora_vae.models.speed.subpixel" for m in plain.modules())
    run(base + ["--tiling", "--no-tiling"])
    assert seen["cfg"].model.tiling is False and model_of().spatial_vae.tiling is None
    # options the flags do not set stay as the model dict says (tiny widths: lower Winograd's rule)
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_REDUCTION", 1)
    run(base + ["--cfg-options", "model.subpixel=False", "model.winograd=True"])
    own = model_of()
    assert not any(type(m).__module__ == "opensora_vae.models.speed.subpixel" for m in own.modules())
    assert any("winograd" in getattr(m, "backends", ()) for m in own.modules())
