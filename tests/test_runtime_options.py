"""Runtime options (opensora_vae.models.speed): one mechanism for every option, the same state from the model dict
or from build_model's keywords, False turns an option off, every enable_* has its disable_*, and round trips leave
the weights alone and give the plain path's outputs back bit for bit."""
import pytest
import torch

from helpers import tiny_model_cfg, tiny_pipeline
from opensora_vae import build_model
from opensora_vae.models import VAE_Temporal, VideoAutoencoderKL, VideoAutoencoderPipeline
from opensora_vae.models.speed import RUNTIME_OPTIONS, RuntimeOptionsMixin, TilingConfig, apply_runtime_options
from opensora_vae.models.speed import winograd
from opensora_vae.models.speed.subpixel import Upsample2D


def state(model):
    """What the runtime options change: each module's class, its convolution backends, tiling, micro-batching,
    gradient checkpointing and whether it is compiled."""
    return [(name, type(m), getattr(m, "backends", ()), getattr(m, "tiling", None),
             getattr(m, "micro_batch_size", None), getattr(m, "gradient_checkpointing", None),
             m._compiled_call_impl is not None) for name, m in model.named_modules()]


@pytest.fixture
def small_winograd(monkeypatch):
    # The tiny widths are below Winograd's shape rule: lower it so the tiny model's convolutions qualify.
    for name in ("MIN_CHANNELS", "MIN_REDUCTION", "MIN_TILES"):
        monkeypatch.setattr(winograd, name, 1)


VALUES = [("compile", True), ("compile", dict(parts="temporal", mode="default")), ("compile", False),
          ("winograd", True), ("winograd", False), ("subpixel", True), ("subpixel", False),
          ("tiling", True), ("tiling", dict(tile_size=128)), ("tiling", False),
          ("micro_batch_size", 2), ("micro_batch_size", False)]


@pytest.mark.parametrize("name, value", VALUES)
def test_keyword_and_dict_give_the_same_model(small_winograd, name, value):
    torch.manual_seed(0)
    by_keyword = build_model(tiny_model_cfg(), **{name: value})
    torch.manual_seed(0)
    by_dict = build_model(dict(tiny_model_cfg(), **{name: value}))
    assert state(by_keyword) == state(by_dict)
    sd = by_dict.state_dict()
    assert list(sd) == list(by_keyword.state_dict())
    assert all(torch.equal(v, sd[k]) for k, v in by_keyword.state_dict().items())


def test_keywords_win_over_the_dict():
    assert state(build_model(dict(tiny_model_cfg(), subpixel=True, tiling=True), subpixel=False, tiling=False)) == (
        state(build_model(tiny_model_cfg(), subpixel=False)))


def test_false_turns_off_an_option_that_is_on(small_winograd):
    model = build_model(tiny_model_cfg(), compile=True, winograd=True, tiling=dict(tile_size=64, overlap=16))
    assert all(net._compiled_call_impl is not None for net in model._compiled_parts())
    assert any("winograd" in getattr(m, "backends", ()) for m in model.modules())
    assert model.spatial_vae.tiling.tile_size == model.temporal_vae.tiling.tile_size == 64
    assert any(type(m) is Upsample2D for m in model.modules())  # on by default
    apply_runtime_options(model, compile=False, winograd=False, tiling=False, subpixel=False, micro_batch_size=False)
    assert all(net._compiled_call_impl is None for net in model._compiled_parts())
    assert not any("winograd" in getattr(m, "backends", ()) for m in model.modules())
    assert model.spatial_vae.tiling is None and model.temporal_vae.tiling is None
    assert (type(model.spatial_vae), type(model.temporal_vae)) == (VideoAutoencoderKL, VAE_Temporal)
    assert not any(type(m) is Upsample2D for m in model.modules())
    assert model.spatial_vae.micro_batch_size is None
    assert state(model) == state(build_model(tiny_model_cfg(), subpixel=False, micro_batch_size=False))
    # micro_batch_size as a runtime option proper (a pipeline's constructor does not take it)
    apply_runtime_options(model, micro_batch_size=3)
    assert model.spatial_vae.micro_batch_size == 3
    for bad in (0, True):
        with pytest.raises(ValueError, match="positive integer"):
            model.enable_micro_batching(bad)


@pytest.mark.parametrize("cls", [VideoAutoencoderPipeline, VideoAutoencoderKL, VAE_Temporal])
def test_every_enable_has_its_disable(cls):
    enables = {n[len("enable_"):] for n in dir(cls) if n.startswith("enable_")}
    assert set(RUNTIME_OPTIONS.values()) <= enables
    assert all(callable(getattr(cls, f"disable_{n}", None)) for n in enables), enables
    assert issubclass(cls, RuntimeOptionsMixin)


def test_unknown_options_and_options_a_model_lacks_fail():
    model = tiny_pipeline()
    with pytest.raises(TypeError, match="no_such_option"):
        apply_runtime_options(model, no_such_option=True)
    with pytest.raises(TypeError, match="no_such_option"):
        build_model(tiny_model_cfg(), no_such_option=True)
    temporal = build_model(tiny_model_cfg()["vae_temporal"], subpixel=False, micro_batch_size=False, compile=False)
    with pytest.raises(TypeError, match="enable_micro_batching"):
        apply_runtime_options(temporal, micro_batch_size=2)
    with pytest.raises(ValueError, match="spatial"):
        model.enable_compile(parts="everything")


def test_directly_built_models_get_the_default_fast_paths(monkeypatch):
    """Built by their constructors: each temporal Conv3d call runs through oneDNN and each spatial upsampler through
    the sub-pixel fold (spies), giving PyTorch's own path's output to float rounding."""
    from opensora_vae.models.speed import onednn, subpixel

    torch.manual_seed(0)
    temporal = VAE_Temporal(filters=8, num_res_blocks=1, channel_multipliers=(1, 2), temporal_downsample=(True,),
                            num_groups=4)
    temporal_convs = [m for m in temporal.modules() if isinstance(m, torch.nn.Conv3d)]
    assert temporal_convs and all(getattr(m, "backends", ()) == ("onednn",) for m in temporal_convs)
    spatial = tiny_pipeline(micro_batch_size=None).spatial_vae  # one call per upsampler
    ups = [m for m in spatial.modules() if type(m) is Upsample2D]
    assert ups
    calls = {"onednn": 0, "subpixel": 0}
    fwd, fold = onednn.forward, subpixel.upsample_conv
    monkeypatch.setattr(onednn, "forward", lambda *a: calls.__setitem__("onednn", calls["onednn"] + 1) or fwd(*a))
    monkeypatch.setattr(subpixel, "upsample_conv",
                        lambda *a: calls.__setitem__("subpixel", calls["subpixel"] + 1) or fold(*a))
    x = torch.rand(1, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = temporal.decode(temporal.encode(x).mode(), num_frames=5), spatial.decode(x)
        seen = dict(calls)
        with torch.backends.mkldnn.flags(enabled=False):
            spatial.disable_subpixel()
            plain = temporal.decode(temporal.encode(x).mode(), num_frames=5), spatial.decode(x)
    assert seen == {"onednn": len(temporal_convs), "subpixel": len(ups)}  # each conv / upsampler once
    assert calls == seen  # the plain run used neither
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5)


def test_tiling_overlap_follows_the_tile_size():
    assert [TilingConfig(tile_size=t).overlap for t in (512, 256, 128, 64)] == [64, 32, 16, 0]
    assert TilingConfig(tile_size=128, overlap=32).overlap == 32
    model = tiny_pipeline()
    model.enable_tiling(tile_size=128)
    assert model.spatial_vae.tiling == model.temporal_vae.tiling == TilingConfig(tile_size=128, overlap=16)


ROUND_TRIPS = {  # option: (turn it on or change it, restore the start, max difference meanwhile; None: not run)
    "subpixel": (lambda m: m.disable_subpixel(), lambda m: m.enable_subpixel(), 1e-5),
    "winograd": (lambda m: m.enable_winograd(), lambda m: m.disable_winograd(), 5e-5),
    "tiling": (lambda m: m.enable_tiling(tile_size=48, overlap=16, temporal_tile_size=24, temporal_overlap=8),
               lambda m: m.disable_tiling(), float("inf")),  # seams at random weights: tests/test_tiling.py
    "tiling 128": (lambda m: m.enable_tiling(tile_size=128), lambda m: m.disable_tiling(), float("inf")),
    "micro_batching": (lambda m: m.disable_micro_batching(), lambda m: m.enable_micro_batching(4), 5e-5),
    "compile": (lambda m: m.enable_compile(), lambda m: m.disable_compile(), None),  # minutes: test_speed.py
    "gradient_checkpointing": (lambda m: m.enable_gradient_checkpointing(),
                               lambda m: m.disable_gradient_checkpointing(), 0),
}


@pytest.mark.parametrize("option", list(ROUND_TRIPS))
def test_round_trip_keeps_weights_and_gives_the_plain_outputs_back(small_winograd, option):
    model = tiny_pipeline(seed=2)
    x = torch.rand(1, 3, 9, 64, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = state(model)

    def run():
        with torch.inference_mode():
            z = model.encode(x, sample_posterior=False)
            return z, model.decode(z, num_frames=9)

    plain = run()
    on, off, atol = ROUND_TRIPS[option]
    on(model)
    assert state(model) != start and list(model.state_dict()) == list(before)
    if atol is not None:
        for a, b in zip(run(), plain):
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
    off(model)
    assert state(model) == start
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(run(), plain))
