"""Fine-tuning options: decoder-only training keeps the latents, the EMA of the weights, non-finite steps skipped
in lockstep (tiny configs, CPU, gloo)."""
import subprocess

import pytest
import torch

from opensora_vae.config import load_config
from opensora_vae.data import read_frames
from opensora_vae.models import VideoAutoencoderPipeline
from opensora_vae.train import NonFiniteLossError, Trainer
from opensora_vae.train.checkpoint import latest_checkpoint

from helpers import EXACT, ROOT, TINY, metrics, options, run_in_process, torchrun_env


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
    forward = trainer.loss_fn.forward

    def poisoned(x, out):
        terms = forward(x, out)
        if trainer.global_step >= 2:  # from the third step on
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    trainer.loss_fn.forward = poisoned
    try:
        with pytest.raises(NonFiniteLossError, match=r"step 5 .*3 in a row, max_nonfinite_in_a_row=3"):
            trainer.train()
    finally:
        trainer.close()
    assert latest_checkpoint(trainer.run_dir).name == "epoch0-global_step4"  # steps 3-4 skipped, then saved
    VideoAutoencoderPipeline.from_pretrained(latest_checkpoint(trainer.run_dir))
