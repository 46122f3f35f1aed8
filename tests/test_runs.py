"""Run folders know the config that made them: --load auto continues only a run of the same config, an explicit
--load of another config's run says so in one line; the saved config describes the model that was trained; a run
that cannot start leaves no folder behind; the progress bar, warnings and TensorBoard of a (resumed) run."""
import io
import json
import logging
import os
import runpy
from functools import partial

import pytest
from mmengine.config import Config

from opensora_vae.errors import UserError, run_main
from opensora_vae.models import VideoAutoencoderPipeline
from opensora_vae import build_model

from helpers import EXACT, ROOT, TINY, metrics, run_in_process

DEMO = ROOT / "configs" / "vae" / "demo"
QUICK = {**EXACT, "max_steps": 1, "ckpt_every": 1}


def runs(outputs):
    return sorted(p.name for p in outputs.iterdir())


def no_heavy_work(monkeypatch):
    """Nothing may be built after the check under test: building the model fails the test."""
    import opensora_vae.train.trainer as trainer

    def refused(*args, **kwargs):
        raise AssertionError("the model was built before the check")

    monkeypatch.setattr(trainer, "build_autoencoder", refused)


def test_load_auto_continues_only_a_run_of_the_same_config(tmp_path, clip_csv, caplog):
    caplog.set_level(logging.INFO, logger="opensora_vae.train")
    out = tmp_path / "out"
    tiny, _ = run_in_process(TINY / "stage3.py", clip_csv, out, load="auto", **QUICK)
    # configs/vae/demo/stage3.py has the same file name but another model: a new run, said once
    caplog.clear()
    demo, _ = run_in_process(DEMO / "stage3.py", clip_csv, out, load="auto", **QUICK)
    assert runs(out) == ["000-stage3", "001-stage3"] and demo.name == "001-stage3"
    said = [r.getMessage() for r in caplog.records if "--load auto" in r.getMessage()]
    assert len(said) == 1 and "000-stage3" in said[0] and "model.vae_2d.config.block_out_channels" in said[0]
    # the tiny config again, extended (max_steps, ckpt_every, num_workers are no part of the identity): it
    # continues its own run, not the newer demo one
    again, saved = run_in_process(TINY / "stage3.py", clip_csv, out, load="auto", **{**QUICK, "max_steps": 2,
                                                                                    "ckpt_every": 2})
    assert again == tiny and saved.name.endswith("global_step2") and [r["step"] for r in metrics(tiny)] == [1, 2]
    from opensora_vae.train.runs import IDENTITY_FILE

    assert json.loads((tiny / IDENTITY_FILE).read_text())["identity"]["model.vae_2d.config.block_out_channels"] \
        == [16, 32]


def test_explicit_load_of_another_configs_run_says_so_before_anything_is_built(tmp_path, clip_csv, monkeypatch,
                                                                                 caplog):
    out = tmp_path / "out"
    run_dir, saved = run_in_process(TINY / "stage3.py", clip_csv, out, **QUICK)
    with monkeypatch.context() as m:
        no_heavy_work(m)
        # a stage-1 config cannot resume a stage-3 run (the trainable tensors differ: AdamW's state does not fit)
        with pytest.raises(UserError, match=r"--load .*000-stage3.* another config .*model\.freeze_vae_2d") as err:
            run_in_process(TINY / "stage1.py", clip_csv, out, load=str(run_dir), **QUICK)
        assert "\n" not in str(err.value) and "--ckpt-path" in str(err.value)
        with pytest.raises(UserError, match="model.vae_2d.config.block_out_channels"):
            run_in_process(DEMO / "stage3.py", clip_csv, out, load=str(saved), **QUICK)
    assert runs(out) == ["000-stage3"]
    # another recipe, the same model: resumed, with one line naming what changed
    caplog.clear()
    resumed, _ = run_in_process(TINY / "stage3.py", clip_csv, out, load=str(run_dir),
                                **{**QUICK, "max_steps": 2, "lr": 5e-4})
    assert resumed == run_dir and [r["step"] for r in metrics(run_dir)] == [1, 2]
    said = [r.getMessage() for r in caplog.records if "another config" in r.getMessage()]
    assert len(said) == 1 and "lr" in said[0] and "max_steps" not in said[0]
    assert Config.fromfile(str(run_dir / "config.py")).lr == 5e-4  # what it runs now
    assert Config.fromfile(str(run_dir / "config.until_step1.py")).lr == 1e-3  # what it ran before


def test_a_run_folder_without_an_identity_record_is_judged_by_its_config_py(tmp_path, clip_csv):
    from opensora_vae.train.runs import IDENTITY_FILE

    run_dir, _ = run_in_process(TINY / "stage3.py", clip_csv, tmp_path, **QUICK)
    (run_dir / IDENTITY_FILE).unlink()  # as written before the record existed
    demo, _ = run_in_process(DEMO / "stage3.py", clip_csv, tmp_path, load="auto", **QUICK)
    assert demo != run_dir
    again, _ = run_in_process(TINY / "stage3.py", clip_csv, tmp_path, load="auto", **{**QUICK, "max_steps": 2})
    assert again == run_dir and [r["step"] for r in metrics(run_dir)] == [1, 2]


def test_the_saved_config_describes_the_model_the_checkpoint_gave(tmp_path, clip_csv, caplog):
    _, tiny = run_in_process(TINY / "stage3.py", clip_csv, tmp_path / "tiny", **QUICK)
    caplog.clear()
    run_dir, saved = run_in_process(DEMO / "stage3.py", clip_csv, tmp_path / "demo", **QUICK,
                                    **{"model.from_pretrained": str(tiny / "model")})
    said = [r.getMessage() for r in caplog.records if "checkpoint" in r.getMessage() and "differ" in r.getMessage()]
    assert len(said) == 1 and "model.vae_2d.config.block_out_channels" in said[0], said
    recorded = Config.fromfile(str(run_dir / "config.py")).model.to_dict()
    assert recorded["vae_2d"]["config"]["block_out_channels"] == [16, 32]  # what was trained, not [16, 32, 64]
    # the recorded model rebuilds the trained one without its checkpoint
    rebuilt = build_model(dict(recorded, from_pretrained=None)).state_dict()
    trained = VideoAutoencoderPipeline.from_pretrained(saved).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in trained.items()}
    # a checkpoint of the config's own model: nothing said, the config's own spelling kept
    caplog.clear()
    again_dir, _ = run_in_process(TINY / "stage3.py", clip_csv, tmp_path / "again", **QUICK,
                                  **{"model.from_pretrained": str(tiny / "model")})
    assert not [r for r in caplog.records if "differ" in r.getMessage()]
    assert Config.fromfile(str(again_dir / "config.py")).model.type == "OpenSoraVAE_V1_2"


def train_script(argv, capsys):
    """scripts/train_vae.py in this process: (exit code, stderr)."""
    main = runpy.run_path(str(ROOT / "scripts" / "train_vae.py"), run_name="train_vae")["main"]
    capsys.readouterr()
    code = run_main(main, [str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(err):
    lines = [line for line in err.splitlines() if line.strip() and "perceptual loss" not in line
             and not line.startswith(("  - ", "Copy the file"))]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_a_csv_of_only_bad_rows_ends_in_one_line_and_leaves_no_run_folder(tmp_path, capsys):
    corrupt, empty = tmp_path / "corrupt.mp4", tmp_path / "empty.mp4"
    corrupt.write_bytes(os.urandom(4096))
    empty.write_bytes(b"")
    csv = tmp_path / "bad.csv"
    csv.write_text(f"path\n{corrupt}\n{empty}\n")
    code, err = train_script([TINY / "stage1.py", "--data-path", csv, "--outputs", tmp_path / "out", "--cfg-options",
                              "max_steps=1", "dataset.image_size=(16,16)", "dataset.num_frames=5"], capsys)
    assert code != 0 and "unreadable" in one_line_error(err)
    assert not (tmp_path / "out").exists() or runs(tmp_path / "out") == []


def test_read_only_outputs_is_one_line_before_anything_is_built(tmp_path, clip_csv, capsys, monkeypatch):
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o555)
    real_access = os.access
    # root ignores the mode (as it does not on a read-only file system): say what such a mount says
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(out)) and mode & os.W_OK
                        else real_access(p, mode, **kw))
    no_heavy_work(monkeypatch)
    code, err = train_script([TINY / "stage1.py", "--data-path", clip_csv, "--outputs", out / "runs",
                              "--cfg-options", "max_steps=1"], capsys)
    assert code != 0 and "not writable" in one_line_error(err)
    assert not (out / "runs").exists()


def test_a_frame_size_the_model_cannot_take_is_refused_before_the_run_folder(tmp_path, clip_csv):
    with pytest.raises(ValueError, match="multiples of 2"):
        run_in_process(TINY / "stage1.py", clip_csv, tmp_path / "out", **{**QUICK, "dataset.image_size": (17, 17)})
    assert not (tmp_path / "out").exists() or runs(tmp_path / "out") == []


def test_the_progress_bar_shows_the_loss_of_the_step_it_counts(tmp_path, clip_csv, monkeypatch):
    import opensora_vae.train.logging as run_logging

    shown = io.StringIO()
    monkeypatch.setattr(run_logging, "tqdm", partial(run_logging.tqdm, file=shown, mininterval=0, ncols=200))
    run_dir, _ = run_in_process(TINY / "stage1.py", clip_csv, tmp_path, **{**QUICK, "max_steps": 3})
    frames = [f for f in shown.getvalue().replace("\r", "\n").splitlines() if "loss=" in f]
    logged = {r["step"]: f"{r['loss']:.4g}" for r in metrics(run_dir)}
    for step, loss in logged.items():
        at = [f for f in frames if f" {step}/3 " in f]
        assert at and all(f"loss={loss}]" in f for f in at), (step, loss, frames)


def test_tensorboard_keeps_one_value_per_step_after_a_resume(tmp_path, clip_csv, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from opensora_vae.train import Trainer

    opts = {**QUICK, "trackers": ["tensorboard"], "max_steps": 4, "ckpt_every": 2}
    with monkeypatch.context() as m:  # stopped after step 3: steps 1-3 logged, the checkpoint is at step 2
        m.setattr(Trainer, "_done", lambda self: self.global_step >= 3)
        run_dir, _ = run_in_process(TINY / "stage1.py", clip_csv, tmp_path, **opts)
    run_in_process(TINY / "stage1.py", clip_csv, tmp_path, load=str(run_dir / "epoch0-global_step2"), **opts)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in metrics(run_dir)])


def test_job_wide_warnings_are_printed_by_rank_0_only(monkeypatch, caplog, empty_hub):
    from opensora_vae.losses import VAELoss
    from opensora_vae.train.logging import setup_logging

    def build_and_use():
        caplog.clear()
        VAELoss(allow_missing_lpips=True, use_real_rec_loss=True)  # looks for the LPIPS weights as it is built
        return [r for r in caplog.records if "perceptual loss DISABLED" in r.getMessage()]

    try:
        setup_logging(1)
        assert build_and_use() == []
        logging.getLogger("opensora_vae.train").warning("rank 1's own news")  # a rank's own events still show
        assert "rank 1's own news" in caplog.text
        setup_logging(0)
        assert len(build_and_use()) == 1
    finally:
        setup_logging(0)
