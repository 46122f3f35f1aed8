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


# ----- ranges: declared with the type (config.Range), checked when the config loads ------------------------------
@pytest.mark.parametrize("option, key, expected", [
    ("max_steps=0", "max_steps=0", "int >= 1 or None"),
    ("max_steps=-3", "max_steps=-3", "int >= 1 or None"),
    ("epochs=0", "epochs=0", "int >= 1"),
    ("ckpt_every=-1", "ckpt_every=-1", "int >= 0"),
    ("log_every=0", "log_every=0", "int >= 1"),
    ("batch_size=0", "batch_size=0", "int >= 1"),
    ("warmup_steps=-1", "warmup_steps=-1", "int >= 0"),
    ("num_workers=-2", "num_workers=-2", "int >= 0"),
    ("lr=0", "lr=0", "float > 0"),
    ("lr=-1e-05", "lr=-1e-05", "float > 0"),
    ("keep_last=0", "keep_last=0", "int >= 1 or None"),
    ("mixed_image_ratio=1.5", "mixed_image_ratio=1.5", "float in [0, 1]"),
    ("lr_schedule=dict(type='cosine', min_ratio=2.0)", "lr_schedule.min_ratio=2.0", "float in [0, 1]"),
    ("dataset.num_frames=0", "dataset.num_frames=0", "int >= 1"),
    ("dataset.frame_interval=0", "dataset.frame_interval=0", "int >= 1"),
    ("dataset.image_size=0", "dataset.image_size=0", "int >= 1"),
    ("dataset.image_size=(32, -32)", "dataset.image_size=(32, -32)", "int >= 1"),
    ("model.micro_frame_size=0", "model.micro_frame_size=0", "int >= 1"),
    ("model.micro_batch_size=0", "model.micro_batch_size=0", "int >= 1"),
])
def test_out_of_range_values_are_refused_naming_key_value_and_range(option, key, expected):
    from opensora_vae.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(CFG / "tiny" / "stage1.py", [option], job="train")
    message = str(err.value)
    assert f"config key {key} is out of range: expected " in message and expected in message, message


@pytest.mark.parametrize("job, config, option, key, expected", [
    ("inference", "inference.py", "crf=-1", "crf=-1", "int in [0, 51]"),
    ("inference", "inference.py", "num_samples=0", "num_samples=0", "int >= 1 or None"),
    ("inference", "inference.py", "fps=0", "fps=0", "float > 0 or None"),
    ("encode", "latents.py", "buckets=[(0, 32, 32)]", "buckets=[(0, 32, 32)]", "int >= 1"),
    ("encode", "latents.py", "shard_size_mb=0", "shard_size_mb=0", "float > 0"),
    ("inference", "inference.py", "model.tiling=dict(tile_size=0)", "model.tiling.tile_size=0", "int >= 16"),
])
def test_out_of_range_values_of_other_jobs(job, config, option, key, expected):
    from opensora_vae.config import ConfigError

    with pytest.raises(ConfigError, match="out of range") as err:
        load_config(CFG / "tiny" / config, [option], job=job)
    assert f"config key {key} is out of range" in str(err.value) and expected in str(err.value)


def test_a_word_for_a_size_names_the_key_the_value_and_what_is_expected():
    from opensora_vae.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(CFG / "tiny" / "stage1.py", ["dataset.image_size=thirty"], job="train")
    assert str(err.value) == ("config key dataset.image_size='thirty' has the wrong type: expected int >= 1 or "
                              "(int >= 1, int >= 1)")


def test_the_edges_of_each_range_are_accepted():
    cfg = load_config(CFG / "tiny" / "stage1.py", ["ckpt_every=0", "warmup_steps=0", "max_steps=1", "epochs=1",
                                                   "mixed_image_ratio=1.0", "dataset.image_size=[16, 16]",
                                                   "model.micro_batch_size=False", "max_steps=None"], job="train")
    assert (cfg.ckpt_every, cfg.max_steps, cfg.dataset.image_size) == (0, None, [16, 16])


def test_no_run_folder_is_made_for_a_non_positive_count(tmp_path):
    from opensora_vae.config import ConfigError
    from opensora_vae.train import Trainer

    for option in ({"max_steps": 0}, {"epochs": 0}, {"ckpt_every": -1}):
        cfg = load_config(CFG / "tiny" / "stage1.py", {"dataset.data_path": "x.csv", "outputs": str(tmp_path / "o"),
                                                      **option})
        with pytest.raises(ConfigError, match="out of range"):
            Trainer(cfg, config_name="stage1")
        assert not (tmp_path / "o").exists()


def _documented_types():
    """`key` -> the type cells of the rows of docs/config.md that document it."""
    import re

    cells = {}
    for line in (ROOT / "docs" / "config.md").read_text().splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(parts) >= 3:
            for key in re.findall(r"`([a-z_0-9.]+)`", parts[0]):
                cells.setdefault(key.split(".")[-1], []).append(parts[1])
    return cells


def test_every_declared_range_is_in_the_docs():
    """The doc tables show each key's range as config.py declares it (the same words as the error)."""
    from opensora_vae.config import declared_ranges

    documented = _documented_types()
    ranged = declared_ranges()
    assert {"max_steps", "lr", "ckpt_every", "num_frames", "image_size", "micro_frame_size"} <= set(ranged)
    wrong = {key: (words, documented.get(key)) for key, words in ranged.items()
             if not any(all(w in cell for w in words) for cell in documented.get(key, []))}
    assert not wrong, f"docs/config.md does not show these ranges: {wrong}"
