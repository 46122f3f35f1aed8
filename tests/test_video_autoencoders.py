"""models/autoencoders.py and models/build.py: one interface over tiny random diffusers video VAEs (Wan, CogVideoX,
LTX-Video) and this project's tiny pipeline. Posteriors and decodes are the models' own bit for bit, evaluation
padding keeps the start of a clip, the encoder / decoder split covers every parameter once, decoder-only training
keeps latents, saved folders load with the class's own from_pretrained, frame rules and spec errors in one line."""
from __future__ import annotations

import copy
from pathlib import Path

import diffusers
import pytest
import torch

from helpers import TINY_DIFFUSERS, tiny_model_cfg, tiny_pipeline
from opensora_vae.errors import UserError
from opensora_vae.models.autoencoders import FrameRule
from opensora_vae.models.build import as_autoencoder, build_autoencoder, load_autoencoder, parse_vae_spec
from opensora_vae.models.pipeline import VideoAutoencoderPipeline

TINY = TINY_DIFFUSERS
CLASSES = list(TINY)
# class -> (valid frame count, a frame count the rule refuses, frame rule, temporal, spatial compression)
GEOMETRY = {
    "AutoencoderKLWan": (5, 6, "4k+1", 4, 8),
    "AutoencoderKLCogVideoX": (9, 5, "8k+1", 4, 8),
    "AutoencoderKLLTXVideo": (9, 5, "8k+1", 8, 32),
    "opensora": (6, None, "any", 4, 2),
}
ALL = CLASSES + ["opensora"]


def clip(t, h, w, seed=0):
    return torch.rand(1, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def valid_clip(name, seed=0):
    t, _, _, _, spatial = GEOMETRY[name]
    return clip(t, spatial * 2, spatial * 2, seed)


@pytest.fixture(scope="module")
def vaes():
    """name -> VideoAutoencoder: the diffusers models built from config dicts, the pipeline wrapped."""
    out = {}
    for name, config in TINY.items():
        torch.manual_seed(0)
        out[name] = build_autoencoder(dict(type=f"diffusers:{name}", config=config))
    out["opensora"] = as_autoencoder(tiny_pipeline(0))
    return out


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, UserError), text
    return text


@pytest.mark.parametrize("name", CLASSES)
def test_encode_and_decode_are_the_models_own(vaes, name):
    vae = vaes[name]
    x = valid_clip(name)
    with torch.no_grad():
        own = vae.model.encode(x).latent_dist
        posterior = vae.encode(x)
        assert torch.equal(posterior.mean, own.mean) and torch.equal(posterior.std, own.std)
        assert torch.equal(posterior.logvar, own.logvar)
        z = posterior.sample(torch.Generator().manual_seed(1))
        assert torch.equal(vae.decode(z, x.shape[2]), vae.model.decode(z).sample)
    t, _, _, temporal, spatial = GEOMETRY[name]
    assert tuple(posterior.mean.shape) == (1, vae.latent_channels, (t - 1) // temporal + 1, 2, 2)
    assert (vae.temporal_compression, vae.spatial_compression) == (temporal, spatial)


def test_pipeline_posterior_is_encode_posterior_before_its_shift_and_scale(vaes):
    vae, pipe = vaes["opensora"], vaes["opensora"].model
    x = valid_clip("opensora")
    with torch.no_grad():
        posterior = vae.encode(x)
        mean, std = pipe.encode_posterior(x)
        assert torch.equal(vae.normalize(posterior.mean), mean) and torch.equal(posterior.std / pipe.scale, std)
        assert torch.equal(vae.normalize(posterior.mode()), pipe.encode(x, sample_posterior=False))
        assert torch.equal(vae.decode(posterior.mode(), x.shape[2]), pipe(x, sample_posterior=False).x_rec)
        assert torch.allclose(vae.denormalize(vae.normalize(posterior.mean)), posterior.mean, atol=1e-6)
    norm = vae.latent_normalization
    assert norm["shift"] == pytest.approx([-0.10, 0.34, 0.27, 0.98]) and norm["scale"][0] == pytest.approx(3.85)


def test_latent_normalization_is_each_models_own():
    torch.manual_seed(0)
    ltx = build_autoencoder(dict(type="diffusers:AutoencoderKLLTXVideo", config=TINY["AutoencoderKLLTXVideo"]))
    ltx.model.latents_mean.copy_(torch.linspace(-1, 1, 8))  # LTX keeps its statistics as buffers
    ltx.model.latents_std.copy_(torch.linspace(0.5, 2, 8))
    norm = ltx.latent_normalization
    assert norm["shift"] == pytest.approx(torch.linspace(-1, 1, 8).tolist())
    assert norm["scale"] == pytest.approx((torch.linspace(0.5, 2, 8) / 0.5).tolist())
    z = torch.randn(1, 8, 2, 1, 1)
    # LTX-Video's pipeline: (z - mean) * scaling_factor / std
    mean, std = ltx.model.latents_mean.view(1, -1, 1, 1, 1), ltx.model.latents_std.view(1, -1, 1, 1, 1)
    assert torch.allclose(ltx.normalize(z), (z - mean) * 0.5 / std, atol=1e-6)
    assert torch.allclose(ltx.denormalize(ltx.normalize(z)), z, atol=1e-6)
    wan = as_autoencoder(diffusers.AutoencoderKLWan(**TINY["AutoencoderKLWan"]))
    assert wan.latent_normalization["shift"] == [0.1, -0.2, 0.3, 0.0]  # Wan's pipeline: (z - mean) / std
    assert wan.latent_normalization["scale"] == [1.5, 0.5, 2.0, 1.0]
    cog = as_autoencoder(diffusers.AutoencoderKLCogVideoX(**TINY["AutoencoderKLCogVideoX"]))
    assert cog.latent_normalization == dict(shift=[0.0] * 4, scale=[1 / 0.7] * 4, source=dict(scaling_factor=0.7))


def _replicate(x, t, h, w):
    """x padded by hand to t frames (last frame repeated) and h x w (edge pixels repeated)."""
    index = lambda n, size: torch.arange(size).clamp(max=n - 1)  # noqa: E731
    return x[:, :, index(x.shape[2], t)][:, :, :, index(x.shape[3], h)][..., index(x.shape[4], w)]


@pytest.mark.parametrize("name, t, fed", [("AutoencoderKLWan", 6, 9), ("AutoencoderKLCogVideoX", 5, 9),
                                          ("AutoencoderKLLTXVideo", 5, 9), ("opensora", 5, 5)])
def test_reconstruct_pads_then_keeps_the_start_of_the_clip(vaes, name, t, fed):
    vae = vaes[name]
    m = vae.spatial_compression
    x = clip(t, 2 * m - 1, m + 1, seed=2)  # neither size a multiple of the spatial compression
    assert vae.frames_needed(t) == fed
    padded = _replicate(x, fed, 2 * m, 2 * m)
    with torch.no_grad():
        if name == "opensora":
            own = vae.model.decode(vae.model.encode(padded, sample_posterior=False), fed)
        else:
            own = vae.model.decode(vae.model.encode(padded).latent_dist.mode()).sample
    rec = vae.reconstruct(x)
    assert rec.shape == x.shape and torch.equal(rec, own[:, :, :t, :2 * m - 1, :m + 1])


@pytest.mark.parametrize("name", ALL)
def test_encoder_and_decoder_sides_hold_every_parameter_once(vaes, name):
    vae = vaes[name]
    vae.check_sides()
    sides = [{id(p) for m in side for p in m.parameters()} for side in (vae.encoder_modules(), vae.decoder_modules())]
    assert not sides[0] & sides[1] and sides[0] | sides[1] == {id(p) for p in vae.model.parameters()}
    assert any(vae.last_decoder_weight() is p for m in vae.decoder_modules() for p in m.parameters())
    odd = copy.deepcopy(vae)
    odd.model.register_parameter("extra_gain", torch.nn.Parameter(torch.ones(1)))
    with pytest.raises(UserError, match="1 in neither side: extra_gain") as err:
        odd.freeze_encoder()
    one_line(err)


def test_last_decoder_weight_is_the_decoders_output_convolution(vaes):
    assert vaes["AutoencoderKLWan"].last_decoder_weight() is vaes["AutoencoderKLWan"].model.decoder.conv_out.weight
    assert vaes["AutoencoderKLLTXVideo"].last_decoder_weight() is \
        vaes["AutoencoderKLLTXVideo"].model.decoder.conv_out.conv.weight
    pipe = vaes["opensora"].model
    assert vaes["opensora"].last_decoder_weight() is pipe.temporal_vae.decoder.conv_out.conv.weight


@pytest.mark.parametrize("name", ALL)
def test_decoder_only_step_keeps_the_latents_and_changes_the_decoder(vaes, name):
    vae = copy.deepcopy(vaes[name])
    x = valid_clip(name, seed=3)
    with torch.no_grad():
        before = vae.encode(x)
    encoder = {k: v.clone() for m in vae.encoder_modules() for k, v in m.state_dict().items()}
    decoder = [p.detach().clone() for m in vae.decoder_modules() for p in m.parameters()]
    vae.freeze_encoder()
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    vae.train()
    out = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(4))
    loss = (out.reconstruction - x).abs().mean() + 1e-6 * out.posterior.kl().mean()
    loss.backward()
    optimizer.step()
    vae.eval()
    with torch.no_grad():
        after = vae.encode(x)
    assert torch.equal(after.mean, before.mean) and torch.equal(after.std, before.std)
    assert all(torch.equal(v, encoder[k]) for m in vae.encoder_modules() for k, v in m.state_dict().items())
    now = [p.detach() for m in vae.decoder_modules() for p in m.parameters()]
    assert sum(not torch.equal(a, b) for a, b in zip(now, decoder, strict=True)) > len(now) // 2


@pytest.mark.parametrize("name", CLASSES)
def test_saved_folder_loads_with_the_class_own_from_pretrained(vaes, name, tmp_path):
    vae = vaes[name]
    x = valid_clip(name, seed=5)
    vae.save_pretrained(tmp_path / "model")
    loaded = getattr(diffusers, name).from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        own = loaded.decode(loaded.encode(x).latent_dist.mode()).sample
    assert torch.equal(own, vae.reconstruct(x))
    # other weights (an EMA's, keyed as the wrapper's state dict) go out in the same format
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in vae.state_dict().items()}
    vae.save_pretrained(tmp_path / "ema", state_dict=ema)
    again = getattr(diffusers, name).from_pretrained(tmp_path / "ema")
    assert all(torch.equal(v, ema["model." + k]) for k, v in again.state_dict().items())
    # the spec written for the folder, and the folder's plain path, load it back
    for spec in (vae.spec_for(tmp_path / "model"), str(tmp_path / "model")):
        assert torch.equal(load_autoencoder(spec).reconstruct(x), own)


def test_pipeline_saves_in_its_own_format(vaes, tmp_path):
    vae, x = vaes["opensora"], valid_clip("opensora", seed=6)
    vae.save_pretrained(tmp_path / "model")
    loaded = VideoAutoencoderPipeline.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x, sample_posterior=False), x.shape[2]), vae.reconstruct(x))
    # a trainer checkpoint folder (its model/ subfolder) as a plain path: the same weights
    own = vae.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in load_autoencoder(str(tmp_path)).state_dict().items())


@pytest.mark.parametrize("name", ALL)
def test_frame_rule_is_the_models_own_and_refuses_other_lengths_in_one_line(vaes, name):
    vae = vaes[name]
    valid, invalid, rule, _, spatial = GEOMETRY[name]
    assert str(vae.frame_rule) == rule
    vae.check_frames(valid)
    vae.check_frames(1)
    if invalid is None:
        assert all(vae.frame_rule.valid(t) for t in range(1, 20))
        return
    with pytest.raises(UserError, match=f"takes clips of {rule.replace('+', '[+]')} frames") as err:
        vae.check_frames(invalid)
    assert f"{invalid} frames does not fit" in one_line(err)
    # the rule is the model's: a length it refuses decodes to another frame count
    x = clip(invalid, spatial, spatial)
    with torch.no_grad(), pytest.raises(UserError, match=f"fed {invalid} frames .* got"):
        vae.decode(vae.encode(x).mode(), invalid)
    with torch.no_grad():
        assert vae.decode(vae.encode(clip(valid, spatial, spatial)).mode(), valid).shape[2] == valid


def test_frame_rule_text():
    assert [FrameRule.parse("4k+1").needed(t) for t in (1, 2, 5, 6, 17)] == [1, 5, 5, 9, 17]
    assert [FrameRule.parse("8k").needed(t) for t in (1, 8, 9)] == [8, 8, 16]
    assert FrameRule.parse("any").needed(10) == 10 and str(FrameRule.parse("6k+1")) == "6k+1"
    with pytest.raises(UserError, match="not a length rule"):
        FrameRule.parse("4n+1")


@pytest.fixture(scope="module")
def saved(vaes, tmp_path_factory):
    """A pipeline repo layout: the Wan VAE in vae/, and the tiny pipeline."""
    root = tmp_path_factory.mktemp("saved")
    vaes["AutoencoderKLWan"].save_pretrained(root / "wan" / "vae")
    vaes["AutoencoderKLWan"].save_pretrained(root / "checkpoint" / "model")  # a trainer checkpoint's layout
    vaes["opensora"].save_pretrained(root / "opensora")
    return root


def test_specs_load_each_kind(vaes, saved):
    x = valid_clip("AutoencoderKLWan", seed=7)
    wan = load_autoencoder(f"diffusers:AutoencoderKLWan={saved / 'wan'},subfolder=vae,name=w,frames=4k+1")
    assert (wan.name, str(wan.frame_rule), wan.info["rule_source"]) == ("w", "4k+1", "spec")
    assert torch.equal(wan.reconstruct(x), vaes["AutoencoderKLWan"].reconstruct(x))
    spec = parse_vae_spec(str(saved / "opensora"))  # a plain path: the project's own loader
    assert (spec.kind, spec.name) == ("opensora", "opensora:opensora")
    pipe = load_autoencoder(f"opensora:{saved / 'opensora'},micro_frame_size=null")
    assert pipe.model.micro_frame_size is None and pipe.has_spatial_path
    hub = parse_vae_spec("diffusers:AutoencoderKLWan=Wan-AI/Wan2.1-T2V-1.3B-Diffusers,subfolder=vae")
    assert (hub.kind, hub.class_name, hub.source, hub.options) == (
        "diffusers", "AutoencoderKLWan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", {"subfolder": "vae"})
    assert hub.name == "AutoencoderKLWan:Wan2.1-T2V-1.3B-Diffusers"
    checkpoint = parse_vae_spec(str(saved / "checkpoint"))  # a plain path holding a diffusers model/
    assert (checkpoint.kind, checkpoint.class_name, checkpoint.options) == (
        "diffusers", "AutoencoderKLWan", {"subfolder": "model"})
    tiled = load_autoencoder(f"diffusers:AutoencoderKLWan={saved / 'wan'},subfolder=vae", tiling=True)
    assert tiled.model.use_tiling and not wan.model.use_tiling
    by_dict = build_autoencoder(dict(type="diffusers:AutoencoderKLWan", from_pretrained=str(saved / "checkpoint"),
                                     subfolder="model", name="d"))
    own = vaes["AutoencoderKLWan"].state_dict()
    assert by_dict.name == "d" and all(torch.equal(v, own[k]) for k, v in by_dict.state_dict().items())


def test_toggles_are_the_models_own(vaes):
    cog = copy.deepcopy(vaes["AutoencoderKLCogVideoX"])
    cog.enable_gradient_checkpointing()
    assert cog.model.is_gradient_checkpointing
    with pytest.raises(UserError, match="AutoencoderKLWan has no gradient checkpointing") as err:
        vaes["AutoencoderKLWan"].enable_gradient_checkpointing()
    one_line(err)
    with pytest.raises(UserError, match="no spatial-only path"):
        vaes["AutoencoderKLWan"].spatial_reconstruction(None)


@pytest.mark.parametrize("spec, message", [
    ("diffusers:AutoencoderKLNope={wan}", "no autoencoder class 'AutoencoderKLNope'"),
    ("diffusers:AutoencoderKLWan={wan},subfolder=transformer",
     r"no subfolder 'transformer' in .* \(subfolders there: vae\)"),
    ("diffusers:AutoencoderKLWan={wan},subfolder=vae,tile=true", r"unknown option\(s\) \['tile'\]"),
    ("diffusers:AutoencoderKLWan={wan},subfolder=vae,tiling=yes", "tiling must be true or false"),
    ("diffusers:AutoencoderKLWan={wan},subfolder=vae,frames=4n", "not a length rule"),
    ("diffusers:AutoencoderKLCogVideoX={wan},subfolder=vae", "holds a AutoencoderKLWan, not a AutoencoderKLCogVideoX"),
    ("diffusers:AutoencoderKLWan={wan}/nowhere", "neither a folder here nor a hub id"),
    ("diffusers:{wan}", "CLASS=PATH_OR_ID"),
    ("vq:foo", "unknown kind 'vq'"),
    ("opensora:", "no path"),
    ("opensora:{opensora},oops", "not key=value"),
    ("opensora:{opensora},micro_frames=3", "unknown option"),
])
def test_misfits_end_in_one_line_before_any_weights_load(saved, monkeypatch, spec, message):
    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the spec was checked")

    for cls in TINY:
        monkeypatch.setattr(getattr(diffusers, cls), "from_pretrained", refuse)
    monkeypatch.setattr("opensora_vae.models.pipeline.read_state_dict", refuse)
    with pytest.raises(UserError, match=message) as err:
        load_autoencoder(spec.format(wan=saved / "wan", opensora=saved / "opensora"))
    one_line(err)


@pytest.mark.parametrize("cfg, message", [
    (dict(type="diffusers:AutoencoderKLWan", config=dict(base_dimm=8)), r"unknown config key\(s\) \['base_dimm'\]"),
    (dict(type="AutoencoderKLWan", config={}), "type='diffusers:AutoencoderKLWan'"),
    (dict(type="diffusers:AutoencoderKLWan"), "give either config"),
    (dict(type="diffusers:AutoencoderKLWan", config={}, decode_timestep=0.1), "needs a decoder with timestep"),
])
def test_config_dict_errors_are_one_line(cfg, message):
    with pytest.raises(UserError, match=message) as err:
        build_autoencoder(cfg)
    one_line(err)


def test_an_image_vae_runs_frame_by_frame():
    torch.manual_seed(0)
    vae = build_autoencoder(dict(type="diffusers:AutoencoderKL", config=dict(
        block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1)))
    x = clip(3, 8, 8, seed=8)
    with torch.no_grad():
        posterior = vae.encode(x)
        frames = vae.model.encode(x[0].transpose(0, 1)).latent_dist  # the 3 frames as a batch of images
        assert torch.equal(posterior.mean[0], frames.mean.transpose(0, 1))
        assert torch.equal(posterior.std[0], frames.std.transpose(0, 1))
        z = posterior.mode()
        assert torch.equal(vae.decode(z, 3)[0], vae.model.decode(z[0].transpose(0, 1)).sample.transpose(0, 1))
    assert (str(vae.frame_rule), vae.temporal_compression, vae.spatial_compression) == ("any", 1, 2)


# ----- one entry for every job: build_autoencoder(cfg.model) and the config check -----------------------------------
TINY_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vae" / "tiny"


def test_build_autoencoder_takes_every_form_of_model_entry(vaes, saved, caplog):
    """(a) a registered Open-Sora dict, exactly as build_model; (b) a spec string; (c) a diffusers dict; (d) a
    `from_pretrained` spec of another family replaces the entry, with one warning naming what no longer applies."""
    from opensora_vae import build_model

    pipe_cfg = dict(tiny_model_cfg(), from_pretrained=str(saved / "opensora"), micro_batch_size=2)
    a = build_autoencoder(pipe_cfg)
    assert isinstance(a.model, VideoAutoencoderPipeline) and a.model.spatial_vae.micro_batch_size == 2
    own = build_model(pipe_cfg).state_dict()
    assert all(torch.equal(v, own[k]) for k, v in a.model.state_dict().items())
    wan_spec = f"diffusers:AutoencoderKLWan={saved / 'wan'},subfolder=vae"
    wan = vaes["AutoencoderKLWan"].state_dict()
    b = build_autoencoder(wan_spec)
    c = build_autoencoder(dict(type="diffusers:AutoencoderKLWan", from_pretrained=str(saved / "wan"), subfolder="vae"))
    with caplog.at_level("WARNING"):
        d = build_autoencoder(dict(pipe_cfg, from_pretrained=wan_spec, tiling=False))
    for vae in (b, c, d):
        assert type(vae.model).__name__ == "AutoencoderKLWan"
        assert all(torch.equal(v, wan[k]) for k, v in vae.state_dict().items())
    warned = [r.getMessage() for r in caplog.records if "replaces the config's" in r.getMessage()]
    assert len(warned) == 1 and "model.micro_batch_size" in warned[0] and "model.tiling" not in warned[0], warned
    # the reverse: a pipeline checkpoint on a diffusers entry (its random-init config no longer applies)
    back = build_autoencoder(dict(type="diffusers:AutoencoderKLWan", config=TINY["AutoencoderKLWan"],
                                  from_pretrained=f"opensora:{saved / 'opensora'}"))
    assert isinstance(back.model, VideoAutoencoderPipeline)
    # a diffusers checkpoint of the entry's own class: its config.json is the structure, the entry's options stay
    same = build_autoencoder(dict(type="diffusers:AutoencoderKLWan", config=dict(base_dim=16), name="mine",
                                  from_pretrained=str(saved / "checkpoint")))
    assert same.name == "mine" and all(torch.equal(v, wan[k]) for k, v in same.state_dict().items())


def test_a_config_takes_a_spec_string_and_a_ckpt_path_spec(saved, caplog):
    from opensora_vae.config import load_config

    wan_spec = f"diffusers:AutoencoderKLWan={saved / 'wan'},subfolder=vae"
    config = saved / "wan_inference.py"
    config.write_text(f"_base_ = [{str(TINY_CONFIGS / 'inference.py')!r}]\nmodel = {wan_spec!r}\n")
    cfg = load_config(config, ["model.name=w"], job="inference")
    assert cfg.model.to_dict() == dict(type="diffusers:AutoencoderKLWan", from_pretrained=str(saved / "wan"),
                                       subfolder="vae", name="w")
    assert build_autoencoder(cfg.model).name == "w"
    # --ckpt-path sets model.from_pretrained: a spec of another family is checked, the entry kept as the user wrote
    cfg = load_config(TINY_CONFIGS / "inference.py", {"model.from_pretrained": wan_spec}, job="inference")
    assert cfg.model.type == "OpenSoraVAE_V1_2" and cfg.model.from_pretrained == wan_spec
    assert type(build_autoencoder(cfg.model).model).__name__ == "AutoencoderKLWan"


@pytest.mark.parametrize("model, message", [
    ("dict(type='diffusers:AutoencoderKLWan', config=dict(base_dim=8), tile=True)",
     "unknown config key 'model.tile': diffusers:AutoencoderKLWan takes config, from_pretrained"),
    ("dict(type='diffusers:AutoencoderKLWan', config=dict(base_dim=8), compile=True)",
     "unknown config key 'model.compile': a runtime option of the Open-Sora pipeline"),
    ("dict(type='diffusers:AutoencoderKLNope', config=dict())", "no autoencoder class 'AutoencoderKLNope'"),
    ("dict(type='diffusers:AutoencoderKLWan', config=dict(base_dimm=8))", r"unknown config key\(s\) \['base_dimm'\]"),
    ("'diffusers:AutoencoderKLWan={wan},subfolder=transformer'", "config key model: .*no subfolder 'transformer'"),
    ("dict(type='OpenSoraVAE_V1_2', from_pretrained='diffusers:AutoencoderKLWan={wan},subfolder=nope')",
     "config key model.from_pretrained: .*no subfolder 'nope'"),
    ("dict(type='OpenSoraVAE_V1_2', from_pretrained='diffusers:AutoencoderKLNope={wan}')",
     "config key model.from_pretrained: .*no autoencoder class"),
])
def test_the_config_check_refuses_a_bad_model_entry_in_one_line_before_any_weights(saved, monkeypatch, model,
                                                                                    message):
    from opensora_vae.config import ConfigError, load_config

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded by the config check")

    for cls in TINY:
        monkeypatch.setattr(getattr(diffusers, cls), "from_pretrained", refuse)
    config = saved / "bad_model.py"
    # _delete_: the entry replaces the base config's, not merged onto it
    model = model.format(wan=saved / "wan").replace("dict(type=", "dict(_delete_=True, type=")
    config.write_text(f"_base_ = [{str(TINY_CONFIGS / 'inference.py')!r}]\nmodel = {model}\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(config, job="inference")
    one_line(err)
