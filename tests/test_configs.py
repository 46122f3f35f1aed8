"""The shipped configs carry the published settings; tiny configs build; --cfg-options parsing."""
import pytest

from opensora_vae import build_model
from opensora_vae.config import load_config, parse_cfg_options

from helpers import ROOT

CFG = ROOT / "configs" / "vae"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_published_stage_settings(stage):
    cfg = load_config(CFG / "train" / f"stage{stage}.py", job="train")
    assert cfg.dataset.image_size == (256, 256) and cfg.dataset.type == "VideoTextDataset"
    assert (cfg.dtype, cfg.grad_checkpoint, cfg.lr, cfg.batch_size, cfg.grad_clip) == ("bf16", True, 1e-5, 1, 1.0)
    assert (cfg.perceptual_loss_weight, cfg.kl_loss_weight) == (0.1, 1e-6)
    assert cfg.model.type == "OpenSoraVAE_V1_2" and cfg.model.freeze_vae_2d == (stage == 1)
    switches = (cfg.use_real_rec_loss, cfg.use_z_rec_loss, cfg.use_image_identity_loss)
    assert switches == {1: (False, True, True), 2: (False, True, False), 3: (True, False, False)}[stage]
    assert cfg.model.micro_frame_size is None  # one chunk per clip in every stage, as the reference configs
    assert (cfg.learn_logvar, cfg.logvar_init, cfg.sampler_seed, cfg.seed) == (False, 0.0, 0, 42)
    if stage < 3:
        assert cfg.dataset.num_frames == 17
        assert (cfg.mixed_strategy, cfg.mixed_image_ratio) == ("mixed_video_image", 0.2)
    else:
        assert cfg.dataset.num_frames == 33
        assert cfg.mixed_strategy == "mixed_video_random"


def test_inference_configs():
    video = load_config(CFG / "inference" / "video.py", job="inference")
    assert (video.model.micro_frame_size, video.model.micro_batch_size, video.dtype) == (17, 4, "auto")
    assert (video.sample_posterior, video.crf, video.fps, video.num_samples) == (False, 18, None, None)
    image = load_config(CFG / "inference" / "image.py", job="inference")
    assert image.dataset.num_frames == 1 and image.model.type == "OpenSoraVAE_V1_2"


@pytest.mark.parametrize("name, frames", [("published_eval.py", 17), ("published_eval_image.py", 1)])
def test_published_evaluation_protocol_configs(name, frames):
    """Open-Sora 1.2's inference configs and script: sampled posteriors, x264's default CRF 23, 24 fps, 100 rows,
    256x256, one chunk, bf16."""
    cfg = load_config(CFG / "inference" / name, job="inference")
    assert (cfg.sample_posterior, cfg.crf, cfg.fps, cfg.num_samples) == (True, 23, 24, 100)
    assert cfg.dataset.image_size == (256, 256) and cfg.dataset.num_frames == frames
    assert cfg.dataset.frame_interval == 1 and cfg.dataset.get("image_frames", "repeat") == "repeat"
    assert cfg.dataset.get("crop", "center") == "center" and not cfg.dataset.get("antialias", False)
    assert (cfg.model.type, cfg.model.micro_frame_size, cfg.model.micro_batch_size, cfg.dtype) == (
        "OpenSoraVAE_V1_2", None, 4, "bf16")


@pytest.mark.parametrize("name", ["model.py", "inference.py", "stage1.py", "stage2.py", "stage3.py"])
def test_tiny_configs_build_offline(name):
    cfg = load_config(CFG / "tiny" / name, job="train" if name.startswith("stage") else None)
    model = build_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    assert list(model.shift.flatten()) == pytest.approx([-0.10, 0.34, 0.27, 0.98])


def test_cfg_options_parse_literals_and_dotted_keys(tmp_path):
    opts = parse_cfg_options(["lr=2e-5", "model.from_pretrained=none", "dataset.image_size=(64, 64)",
                              "grad_checkpoint=False", "outputs=runs/x"])
    assert opts == {"lr": 2e-5, "model.from_pretrained": None, "dataset.image_size": (64, 64),
                    "grad_checkpoint": False, "outputs": "runs/x"}
    cfg = load_config(CFG / "train" / "stage2.py", ["model.from_pretrained=/ckpt/model", "lr=2e-5"])
    assert cfg.model.from_pretrained == "/ckpt/model" and cfg.lr == 2e-5 and cfg.model.freeze_vae_2d is False
    with pytest.raises(ValueError, match="key=value"):
        parse_cfg_options(["lr"])
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(tmp_path / "nope.py")


def test_every_declared_key_is_documented():
    import dataclasses

    from opensora_vae.config import JOBS

    text = (ROOT / "docs" / "config.md").read_text()
    missing = {f.name for job in JOBS.values() for f in dataclasses.fields(job) if f"`{f.name}`" not in text}
    assert not missing, f"keys missing from docs/config.md: {sorted(missing)}"


def test_decoder_fine_tuning_config():
    cfg = load_config(CFG / "train" / "finetune_decoder.py", job="train")
    assert cfg.model.from_pretrained == "hpcai-tech/OpenSora-VAE-v1.2" and cfg.model.micro_frame_size == 17
    assert (cfg.trainable, cfg.discriminator.type, cfg.discriminator_start) == ("decoder", "NLayerDiscriminator", 0)
    assert (cfg.generator_loss_type, cfg.discriminator_loss_type, cfg.generator_factor) == ("hinge", "hinge", 0.5)
    assert cfg.use_real_rec_loss and (cfg.ema_decay, cfg.on_nonfinite) == (0.999, "skip")
