"""Fine-tuning diffusers' video VAEs (AutoencoderKLWan, AutoencoderKLCogVideoX, AutoencoderKLLTXVideo; tiny random
models, real clips, CPU, gloo) with the trainer of the Open-Sora VAE: decoder-only training keeps every encoder tensor
and latent, checkpoints are the class's own format, resume is exact, clip lengths follow the model's rule, and what
only the Open-Sora pipeline trains with is refused in one line before any folder is made."""
from __future__ import annotations

import runpy

import diffusers
import pytest
import torch

from opensora_vae.config import load_config
from opensora_vae.data import apply_mixed_strategy, read_frames
from opensora_vae.errors import run_main
from opensora_vae.train import Trainer
from opensora_vae.train.checkpoint import latest_checkpoint
from opensora_vae.train.trainer import mixed_lengths

from helpers import ROOT, TINY, metrics, options, run_in_process, torchrun

TRAIN = ROOT / "configs" / "vae" / "train"
CONFIGS = {"AutoencoderKLWan": "finetune_wan", "AutoencoderKLCogVideoX": "finetune_cogvideox",
           "AutoencoderKLLTXVideo": "finetune_ltx"}
CLASSES = list(CONFIGS)
QUIET = {"trackers": []}


def real_clip(sample_videos, frames, size):
    x = read_frames(sample_videos["bikes"], list(range(frames)))[:, :, :size, :size].float() / 127.5 - 1
    return x.permute(1, 0, 2, 3)[None]  # (1, C, T, H, W)


def trained(config, csv, outputs, **opts):
    """(trainer after its run, its weights before the first step)."""
    cfg = load_config(config, {"dataset.data_path": str(csv), "outputs": str(outputs), **QUIET, **opts})
    trainer = Trainer(cfg, config_name=config.stem)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer, start


def test_the_templates_and_their_tiny_versions_load():
    hubs = {"finetune_wan": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "finetune_cogvideox": "THUDM/CogVideoX-2b"}
    for name, hub in hubs.items():
        full, decoder = (load_config(TRAIN / f"{n}.py", job="train") for n in (name, f"{name}_decoder"))
        assert (full.model.from_pretrained, full.model.subfolder) == (hub, "vae")
        assert full.use_real_rec_loss and not full.use_z_rec_loss and not full.use_image_identity_loss
        assert (full.trainable, full.discriminator, decoder.trainable) == ("all", None, "decoder")
        assert decoder.discriminator["type"] == "NLayerDiscriminator" and decoder.ema_decay == 0.999
    assert load_config(TRAIN / "finetune_wan.py", job="train").grad_checkpoint is False  # Wan has none in diffusers
    for name in ("finetune_wan", "finetune_wan_decoder", "finetune_cogvideox", "finetune_ltx"):
        cfg = load_config(TINY / f"{name}.py", job="train")
        assert cfg.model.type.startswith("diffusers:") and "config" in cfg.model and cfg.dtype == "fp32"


def test_mixed_video_random_draws_only_the_lengths_the_model_takes():
    from opensora_vae.models.build import build_autoencoder

    cfg = load_config(TINY / "finetune_wan.py", job="train")
    wan = build_autoencoder(cfg.model)
    assert mixed_lengths(cfg, wan, 9) == [1, 5, 9]
    g, video = torch.Generator().manual_seed(0), torch.zeros(1, 3, 9, 2, 2)
    drawn = {apply_mixed_strategy(video, "mixed_video_random", 0, g, [1, 5, 9]).shape[2] for _ in range(200)}
    assert drawn == {1, 5, 9}
    cog = build_autoencoder(load_config(TINY / "finetune_cogvideox.py", job="train").model)
    assert mixed_lengths(cfg, cog, 17) == [1, 9, 17]


@pytest.mark.parametrize("name", CLASSES)
def test_decoder_only_fine_tuning_keeps_the_encoder_and_the_model_folder_is_the_classs_own(
        name, tmp_path, clip_csv, sample_videos):
    config = TINY / f"{CONFIGS[name]}.py"
    trainer, start = trained(config, clip_csv, tmp_path, trainable="decoder", max_steps=3, ckpt_every=0)
    folder = latest_checkpoint(trainer.run_dir) / "model"
    cls = getattr(diffusers, name)
    saved = cls.from_pretrained(folder).eval()  # the class's own loader, nothing of this project
    end = saved.state_dict()
    encoder = {k for m in ("encoder", "quant_conv") for k in end if k.startswith(m + ".")}
    assert encoder and all(torch.equal(start[k], end[k]) for k in encoder)  # every encoder tensor bit-identical
    assert any(not torch.equal(start[k], end[k]) for k in end if k.startswith("decoder."))
    before = cls.from_config(saved.config)
    before.load_state_dict(start)
    before.eval()
    size = 32 if name == "AutoencoderKLLTXVideo" else 16
    x = real_clip(sample_videos, 9, size)
    model = trainer.model.eval()
    with torch.no_grad():
        z = before.encode(x).latent_dist
        z_after = saved.encode(x).latent_dist
        assert torch.equal(z.mean, z_after.mean) and torch.equal(z.std, z_after.std)  # a real clip's latents
        # the folder reconstructs the clip exactly as the trainer's model does
        assert torch.equal(saved(x).sample, model(x).sample)
        assert not torch.equal(before(x).sample, model(x).sample)


@pytest.mark.parametrize("name", CLASSES)
def test_a_stopped_and_resumed_run_gives_the_losses_of_an_uninterrupted_one(name, tmp_path, clip_csv):
    config = TINY / f"{CONFIGS[name]}.py"
    opts = dict(QUIET, max_steps=4, ckpt_every=2, ema_decay=0.9, sample_posterior=True,
                mixed_strategy="mixed_video_random")
    full_dir, full = run_in_process(config, clip_csv, tmp_path / "full", **opts)
    part_dir, _ = run_in_process(config, clip_csv, tmp_path / "part", **{**opts, "max_steps": 2})
    _, resumed = run_in_process(config, clip_csv, tmp_path / "part", load="auto", **opts)
    keys = ("loss", "rec_nll", "kl", "frames", "grad_norm")
    assert [[r[k] for k in keys] for r in metrics(full_dir)] == [[r[k] for k in keys] for r in metrics(part_dir)]
    assert len(metrics(full_dir)) == 4 and {r["frames"] for r in metrics(full_dir)} <= {1.0, 5.0, 9.0}
    cls = getattr(diffusers, name)
    for part in ("model", "ema"):  # the weights and their average, bit for bit
        a, b = cls.from_pretrained(full / part).state_dict(), cls.from_pretrained(resumed / part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_two_ranks_train_wan_adversarially_with_ema(tmp_path, clip_csv):
    opts = dict(QUIET, max_steps=2, ckpt_every=0, shard_optimizer=True)
    torchrun(2, TINY / "finetune_wan_decoder.py", "--data-path", clip_csv, "--outputs", tmp_path,
             "--cfg-options", *options(opts))
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    rows = metrics(run_dir)
    assert len(rows) == 2 and all(r["d_weight"] > 0 and "disc_loss" in r for r in rows)
    assert all(f in (1.0, 5.0, 9.0) for r in rows for f in r["frames_per_rank"])  # the same valid draw per step
    assert all(len(set(r["frames_per_rank"])) == 1 for r in rows)
    ckpt = latest_checkpoint(run_dir)
    model, ema = (diffusers.AutoencoderKLWan.from_pretrained(ckpt / p).state_dict() for p in ("model", "ema"))
    assert any(not torch.equal(model[k], ema[k]) for k in model if k.startswith("decoder."))
    assert all(torch.equal(model[k], ema[k]) for k in model if k.startswith(("encoder.", "quant_conv.")))
    assert (ckpt / "discriminator.pt").is_file()


@pytest.mark.parametrize("name", ["AutoencoderKLCogVideoX", "AutoencoderKLLTXVideo"])
def test_two_ranks_train_cogvideox_and_ltx(tmp_path, clip_csv, name):
    """Full fine-tuning (encoder and decoder) on 2 gloo ranks: every step on both ranks, a checkpoint per step in the
    class's own format, and the weights move between them."""
    opts = dict(QUIET, max_steps=2, ckpt_every=1, shard_optimizer=True)
    torchrun(2, TINY / f"{CONFIGS[name]}.py", "--data-path", clip_csv, "--outputs", tmp_path,
             "--cfg-options", *options(opts))
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and all(len(r["frames_per_rank"]) == 2 for r in rows)
    cls = getattr(diffusers, name)
    first, second = (cls.from_pretrained(run_dir / f"epoch{e}-global_step{s}" / "model").state_dict()
                     for e, s in ((0, 1), (0, 2)))
    for side in ("encoder.", "decoder."):
        assert any(not torch.equal(first[k], second[k]) for k in first if k.startswith(side)), side


@pytest.fixture(scope="module")
def train_main():
    return runpy.run_path(str(ROOT / "scripts" / "train_vae.py"), run_name="test")["main"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1).save_pretrained(
        root / "vae")
    return root


@pytest.mark.parametrize("opts, expected", [
    (["use_z_rec_loss=True"], "error: use_z_rec_loss=True is Open-Sora-only"),
    (["use_image_identity_loss=True"], "error: use_image_identity_loss=True is Open-Sora-only"),
    (["train_spatial_only=True"], "error: train_spatial_only=True is Open-Sora-only"),
    (["use_real_rec_loss=False"], "error: use_real_rec_loss=False: "),
    (["dataset.num_frames=8"], "error: dataset.num_frames=8: AutoencoderKLWan:random takes clips of 4k+1 frames "
                               "(1, 5, 9, 13, ...): 8 frames does not fit; use 5 or 9"),
    (["grad_checkpoint=True"], "error: grad_checkpoint=True: "),
    (["grad_checkpoint='temporal'"], "error: grad_checkpoint='temporal' names a VAE of the Open-Sora pipeline"),
    (["model.type='diffusers:AutoencoderKLNope'"], "AutoencoderKLNope"),
    (["model.from_pretrained='diffusers:AutoencoderKLWan={wan},subfolder=nope'"], "no subfolder 'nope'"),
])
def test_misfits_end_in_one_line_before_any_folder(opts, expected, tmp_path, clip_csv, capsys, train_main,
                                                    wan_folder):
    out = tmp_path / "out"
    argv = [str(TINY / "finetune_wan.py"), "--data-path", str(clip_csv), "--outputs", str(out),
            "--cfg-options", *[o.replace("{wan}", str(wan_folder)) for o in opts]]
    assert run_main(train_main, argv) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()
