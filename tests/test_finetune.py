"""Fine-tuning options: decoder-only training keeps the latents, the EMA of the weights, non-finite steps skipped
in lockstep (tiny configs, CPU, gloo)."""
import json
import subprocess

import pytest
import torch

from opensora_vae.config import load_config
from opensora_vae.data import read_frames
from opensora_vae.models import VideoAutoencoderPipeline
from opensora_vae.train import NonFiniteLossError, Trainer
from opensora_vae.train.checkpoint import latest_checkpoint

from helpers import EXACT, ROOT, TINY, metrics, options, poison_loss, run_in_process, torchrun, torchrun_env


def weights(path):
    return VideoAutoencoderPipeline.from_pretrained(path).state_dict()


def clip(sample_videos):
    x = read_frames(sample_videos["bikes"], list(range(9)))[:, :, :32, :32].float() / 127.5 - 1
    return x.permute(1, 0, 2, 3)[None]  # (1, C, T, H, W)


def test_decoder_only_training_changes_the_decoders_and_keeps_every_latent(tmp_path, clip_csv, sample_videos):
    opts = {**EXACT, "dataset.num_frames": 9, "max_steps": 3, "ckpt_every": 0, "trainable": "decoder"}
    first, start = run_in_process(TINY / "stage3.py", clip_csv, tmp_path / "a", max_steps=1, ckpt_every=0,
                                  **{k: v for k, v in opts.items() if k not in ("max_steps", "ckpt_every")})
    _, end = run_in_process(TINY / "stage3.py", clip_csv, tmp_path / "b", **opts,
                            **{"model.from_pretrained": str(start / "model")})
    before, after = VideoAutoencoderPipeline.from_pretrained(start), VideoAutoencoderPipeline.from_pretrained(end)
    encoders = {id(p) for m in before.encoder_modules() for p in m.parameters()}
    changed = {n for (n, a), b in zip(before.named_parameters(), after.parameters()) if not torch.equal(a, b)}
    frozen = {n for n, p in before.named_parameters() if id(p) in encoders}
    assert frozen and not changed & frozen  # both encoders bit-identical
    assert any(n.startswith("temporal_vae.decoder") for n in changed)
    assert any(n.startswith("spatial_vae.module.decoder") for n in changed)
    x = clip(sample_videos)
    with torch.no_grad():
        assert torch.equal(before.encode(x, sample_posterior=False), after.encode(x, sample_posterior=False))


def test_ema_equals_the_hand_computed_average_and_resumes_exactly(tmp_path, clip_csv):
    decay = 0.8
    opts = {**EXACT, "max_steps": 4, "ckpt_every": 1, "ema_decay": decay}
    cfg = load_config(TINY / "stage1.py", {"dataset.data_path": str(clip_csv), "outputs": str(tmp_path / "a"), **opts})
    trainer = Trainer(cfg, config_name="ema")
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    try:
        trainer.train()
    finally:
        trainer.close()
    average = {n: start[n].float() for n in trained}
    for step in range(1, 5):
        ckpt = next(trainer.run_dir.glob(f"epoch*-global_step{step}"))
        w, ema = weights(ckpt), weights(ckpt / "ema")
        for n in trained:
            average[n] = decay * average[n] + (1 - decay) * w[n].float()
            torch.testing.assert_close(ema[n], average[n], rtol=1e-6, atol=1e-7)
        frozen = [n for n in w if n not in trained]
        assert frozen and all(torch.equal(ema[n], w[n]) for n in frozen)  # the frozen spatial VAE as it is
    # stopped after step 2 and resumed: the same average, bit for bit
    run_dir, _ = run_in_process(TINY / "stage1.py", clip_csv, tmp_path / "b", **{**opts, "max_steps": 2})
    run_in_process(TINY / "stage1.py", clip_csv, tmp_path / "b", load="auto", **opts)
    full, resumed = weights(latest_checkpoint(trainer.run_dir) / "ema"), weights(latest_checkpoint(run_dir) / "ema")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_a_nan_on_one_rank_is_skipped_on_both_and_counted(tmp_path, clip_csv):
    opts = {**EXACT, "max_steps": 5, "ckpt_every": 1, "on_nonfinite": "skip", "max_nonfinite_in_a_row": 2}
    cmd = [__import__("sys").executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "train_with_nan.py"), "1", "3", str(TINY / "stage1.py"), "--data-path", str(clip_csv),
           "--outputs", str(tmp_path), "--cfg-options", *options(opts)]
    proc = subprocess.run(cmd, env=torchrun_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    rows = metrics(run_dir)
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 1, 1]
    assert "non-finite loss at step 3" in proc.stderr and "update skipped (1 in a row, 1 in all)" in proc.stderr
    step2, step3, step4 = (weights(next(run_dir.glob(f"epoch*-global_step{s}"))) for s in (2, 3, 4))
    assert all(torch.equal(step2[k], step3[k]) for k in step2)  # no update at step 3, on either rank
    assert any(not torch.equal(step3[k], step4[k]) for k in step3)  # training went on after it


def test_too_many_nonfinite_steps_in_a_row_stop_with_the_last_checkpoint_intact(tmp_path, clip_csv):
    cfg = load_config(TINY / "stage1.py", {"dataset.data_path": str(clip_csv), "outputs": str(tmp_path), **EXACT,
                                           "max_steps": 8, "ckpt_every": 2, "on_nonfinite": "skip",
                                           "max_nonfinite_in_a_row": 3})
    trainer = Trainer(cfg, config_name="nan")
    poison_loss(trainer, lambda step: step >= 2)  # from the third step on
    try:
        with pytest.raises(NonFiniteLossError, match=r"step 5 .*3 in a row, max_nonfinite_in_a_row=3"):
            trainer.train()
    finally:
        trainer.close()
    assert latest_checkpoint(trainer.run_dir).name == "epoch0-global_step4"  # steps 3-4 skipped, then saved
    VideoAutoencoderPipeline.from_pretrained(latest_checkpoint(trainer.run_dir))


DISC = {"dataset.image_size": (32, 32), "discriminator": dict(type="NLayerDiscriminator", ndf=8, n_layers=2)}


def disc_weights(ckpt):
    return torch.load(ckpt / "discriminator.pt", weights_only=True)["model"]


def test_nothing_adversarial_acts_before_discriminator_start(tmp_path, clip_csv):
    opts = {**EXACT, **DISC, "max_steps": 3, "ckpt_every": 1, "discriminator_start": 2}
    run_dir, _ = run_in_process(TINY / "stage3.py", clip_csv, tmp_path / "adv", **opts)
    plain_opts = {k: v for k, v in opts.items() if k not in ("discriminator", "discriminator_start")}
    plain_dir, _ = run_in_process(TINY / "stage3.py", clip_csv, tmp_path / "plain", **plain_opts)
    rows, plain = metrics(run_dir), metrics(plain_dir)
    assert [("adversarial" in r, "disc_loss" in r) for r in rows] == [(False, False), (False, False), (True, True)]
    assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in plain[:2]]  # the same VAE steps as without it
    ckpts = [next(run_dir.glob(f"epoch*-global_step{s}")) for s in (1, 2, 3)]
    first, second, third = map(disc_weights, ckpts)
    assert all(torch.equal(first[k], second[k]) for k in first)  # untouched, BatchNorm statistics included
    assert any(not torch.equal(second[k], third[k]) for k in second)
    a, b = weights(ckpts[1]), weights(next(plain_dir.glob("epoch*-global_step2")))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_rank_adversarial_run_with_lecam_resumes_exactly(tmp_path, clip_csv):
    opts = {**EXACT, **DISC, "max_steps": 4, "ckpt_every": 2, "discriminator_start": 0, "lecam_loss_weight": 0.1,
            "shard_optimizer": True, "mixed_strategy": "mixed_video_random", "sample_posterior": True,
            "dataset.num_frames": 9}
    torchrun(2, TINY / "stage3.py", "--data-path", clip_csv, "--outputs", tmp_path, "--cfg-options", *options(opts))
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    end = next(run_dir.glob("epoch*-global_step4"))
    first_disc, first_vae = disc_weights(end), weights(end)
    first_lecam = torch.load(end / "discriminator.pt", weights_only=True)["loss"]
    torchrun(2, TINY / "stage3.py", "--data-path", clip_csv, "--load", next(run_dir.glob("epoch*-global_step2")),
             "--cfg-options", *options(opts))
    lost = [json.loads(line) for line in (run_dir / "metrics.superseded.jsonl").read_text().splitlines()]
    resumed = metrics(run_dir)[2:]
    keys = ("loss", "adversarial", "d_weight", "disc_loss", "lecam", "frames_per_rank")
    assert [[r[k] for k in keys] for r in lost] == [[r[k] for k in keys] for r in resumed]
    assert all(r["lecam"] > 0 for r in resumed)
    again = disc_weights(end)
    assert all(torch.equal(first_disc[k], again[k]) for k in first_disc)
    assert all(torch.equal(v, torch.load(end / "discriminator.pt", weights_only=True)["loss"][k])
               for k, v in first_lecam.items())
    vae = weights(end)
    assert all(torch.equal(first_vae[k], vae[k]) for k in vae)


def test_the_decoder_fine_tuning_config_keeps_the_latents_and_trains_adversarially(tmp_path, clip_csv, sample_videos):
    start_dir, start = run_in_process(TINY / "stage3.py", clip_csv, tmp_path / "s", **{**EXACT, "max_steps": 1,
                                      "ckpt_every": 0, "dataset.image_size": (32, 32)})
    run_dir, end = run_in_process(TINY / "finetune_decoder.py", clip_csv, tmp_path / "f",
                                  **{"model.from_pretrained": str(start), "trackers": []})
    rows = metrics(run_dir)
    assert len(rows) == 4 and all("adversarial" in r and "disc_loss" in r for r in rows)
    x = clip(sample_videos)
    before, after = VideoAutoencoderPipeline.from_pretrained(start), VideoAutoencoderPipeline.from_pretrained(end)
    ema = VideoAutoencoderPipeline.from_pretrained(end / "ema")
    with torch.no_grad():
        z = before.encode(x, sample_posterior=False)
        assert torch.equal(z, after.encode(x, sample_posterior=False))
        assert torch.equal(z, ema.encode(x, sample_posterior=False))
        assert not torch.equal(before.decode(z, 9), after.decode(z, 9))
