"""The checked config (opensora_vae.config) and the scripts' user errors: one line naming the key or file and the
fix, a non-zero exit (2 for usage), no traceback, once per job, before any output folder is made."""
import os
import subprocess
import sys

import pytest

from opensora_vae.config import ConfigError, load_config, parse_cfg_options

from helpers import ROOT

CFG = ROOT / "configs" / "vae"
TINY = CFG / "tiny"


@pytest.mark.parametrize("job, config, option, message", [
    ("train", "stage1.py", "max_stepz=3", "unknown config key 'max_stepz' (did you mean max_steps?)"),
    ("train", "stage1.py", "lr_shedule=None", "'lr_shedule' (did you mean lr_schedule?)"),
    ("train", "stage1.py", "grad_clipp=1.0", "(did you mean grad_clip?)"),
    ("train", "stage1.py", "dtyp='bf16'", "(did you mean dtype?)"),
    ("train", "stage1.py", "max_steps=abc", "max_steps='abc' has the wrong type: expected int >= 1 or None"),
    ("train", "stage1.py", "ckpt_every=abc", "ckpt_every='abc' has the wrong type: expected int >= 0"),
    ("train", "stage1.py", "lr_schedule=dict(typ='cosine')", "'lr_schedule.typ' (did you mean lr_schedule.type?)"),
    ("train", "stage1.py", "lr_schedule=dict(type='linear')", "lr_schedule.type='linear' is not one of 'constant'"),
    ("train", "stage1.py", "dtype='bf61'", "dtype='bf61' is not one of 'auto' or 'fp32'"),
    ("train", "stage1.py", "warmup_step=100", "(did you mean warmup_steps"),
    ("train", "stage1.py", "model.micro_frame_sise=3", "'model.micro_frame_sise' (did you mean model.micro_frame_size"),
    ("train", "stage1.py", "dataset.num_frame=3", "'dataset.num_frame' (did you mean dataset.num_frames"),
    ("train", "stage1.py", "model.vae_temporal.filterz=3",
     "'model.vae_temporal.filterz' (did you mean model.vae_temporal.filters"),
    ("train", "stage1.py", "model.type='Nope'", "unknown model.type 'Nope'"),
    ("train", "stage1.py", "compile=True", "unknown config key 'compile' (it is now model.compile)"),
    ("train", "stage1.py", "model.tiling=dict(tile_sise=64)",
     "'model.tiling.tile_sise' (did you mean model.tiling.tile_size"),
    ("inference", "inference.py", "crff=40", "(did you mean crf?)"),
    ("inference", "inference.py", "crf=high", "crf='high' has the wrong type: expected int in [0, 51]"),
    ("encode", "latents.py", "save_dtype='int8'", "save_dtype='int8' is not one of"),
])
def test_a_misspelt_key_or_wrong_type_is_refused_naming_it(job, config, option, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY / config, [option], job=job)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_config_file_with_misspelt_keys_is_refused(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(f'_base_ = ["{TINY / "stage1.py"}"]\nckpt_evry = 2\n')
    with pytest.raises(ConfigError, match="'ckpt_evry' \\(did you mean ckpt_every"):
        load_config(bad, job="train")


def test_defaults_declared_once_and_filled_in():
    cfg = load_config(TINY / "stage1.py", job="train")
    assert (cfg.ckpt_every, cfg.lr, cfg.lr_schedule, cfg.optimizer) == (
        4, 1e-3, {"type": "constant", "min_ratio": 0.0}, {"fused": None, "foreach": None})
    assert cfg.perceptual_loss_weight == 0.1 and cfg.kl_loss_weight == 1e-6  # VAELoss's declared defaults
    assert not any(k.startswith("_") for k in cfg)  # the file's variables are not settings
    assert load_config(TINY / "stage1.py", ["lr_schedule=dict(type='cosine')"], job="train").lr_schedule == {
        "type": "cosine", "min_ratio": 0.0}


def test_reference_only_keys_warn_once_and_are_dropped(caplog, monkeypatch):
    from opensora_vae import config

    monkeypatch.setattr(config, "_warned", set())  # once per process: other tests may have warned already
    cfg = load_config(TINY / "inference.py", ["num_frames=3", "batch_size=1", "model.cal_loss=True"], job="inference")
    assert "num_frames" not in cfg and "batch_size" not in cfg
    warned = [r.getMessage() for r in caplog.records if "kept for reference configs" in r.getMessage()]
    assert any("num_frames" in w and "dataset.num_frames" in w for w in warned)
    assert any("model.cal_loss" in w for w in warned)
    load_config(TINY / "inference.py", ["num_frames=3"], job="inference")
    assert sum("num_frames" in r.getMessage() for r in caplog.records) == 1


def test_cfg_options_dicts_replace_and_literals_parse():
    assert parse_cfg_options(["a=dict(b=1, c=(2, 3))", "d=[dict(e='f')]"]) == {"a": {"b": 1, "c": (2, 3)},
                                                                               "d": [{"e": "f"}]}
    cfg = load_config(TINY / "inference.py", ["model.tiling=dict(tile_size=128)"], job="inference")
    assert cfg.model.tiling == {"tile_size": 128}
    with pytest.raises(ConfigError, match="not key=value"):
        parse_cfg_options(["lr"])


def _run(args, cwd=ROOT, **env):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env))


def _one_line_error(proc, code, *words):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), proc.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, proc.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


def test_every_script_prints_user_errors_in_one_line(tmp_path, sample_videos):
    csv = tmp_path / "in.csv"
    csv.write_text(f"path\n{sample_videos['bikes']}\n")
    out = tmp_path / "out"
    proc = _run(["scripts/train_vae.py", TINY / "stage1.py", "--data-path", csv, "--outputs", out,
                 "--cfg-options", "max_stepz=3"])
    _one_line_error(proc, 2, "max_stepz", "max_steps")
    proc = _run(["scripts/train_vae.py", TINY / "stage1.py", "--data-path", tmp_path / "missing.csv",
                 "--outputs", out])
    _one_line_error(proc, 1, "missing.csv")
    proc = _run(["scripts/train_vae.py", TINY / "stage1.py", "--data-path", csv, "--outputs", out,
                 "--load", tmp_path / "nope" / "epoch0-global_step4"])
    _one_line_error(proc, 1, "--load", "no such folder")
    assert not (tmp_path / "nope").exists() and not out.exists()
    (tmp_path / "runs").mkdir()  # a relative path whose folder exists here is local, not a hub id: no download
    proc = _run([ROOT / "scripts" / "inference_vae.py", TINY / "inference.py", "--data-path", csv, "--save-dir",
                 out / "rec", "--ckpt-path", "runs/model"], cwd=tmp_path)
    _one_line_error(proc, 1, "runs/model", "not found")
    assert not out.exists()  # no empty _ori/_rec/_spatial folders
    proc = _run(["scripts/inference_vae.py", TINY / "inference.py", "--data-path", csv, "--bogus"])
    _one_line_error(proc, 2, "--bogus")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    proc = _run(["scripts/encode_latents.py", TINY / "latents.py", "--data-path", csv, "--save-dir", a_file / "x"])
    _one_line_error(proc, 2, "a_file is not a folder")
    proc = _run(["eval/vae/eval_common_metric.py", "--real_video_dir", tmp_path / "a", "--generated-video-dir",
                 tmp_path / "b", "--output", a_file / "r.json"])
    _one_line_error(proc, 2, "--output", "is not a folder")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    if not os.access(readonly, os.W_OK):  # root ignores the mode
        proc = _run(["scripts/encode_latents.py", TINY / "latents.py", "--data-path", csv, "--save-dir",
                     readonly / "x"])
        _one_line_error(proc, 2, "not writable")


def test_debug_shows_the_traceback(tmp_path):
    proc = _run(["scripts/train_vae.py", TINY / "stage1.py", "--data-path", "x.csv", "--debug",
                 "--cfg-options", "max_stepz=3"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_under_torchrun_a_config_error_is_printed_once(tmp_path):
    proc = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "scripts/train_vae.py",
                 TINY / "stage1.py", "--data-path", "x.csv", "--cfg-options", "max_stepz=3"], OMP_NUM_THREADS="1")
    assert proc.returncode != 0
    assert proc.stderr.count("error: unknown config key 'max_stepz'") == 1, proc.stderr
    assert "Traceback" not in proc.stderr.split("error: unknown")[0], proc.stderr


@pytest.mark.parametrize("job, config, other, hint", [
    ("train", CFG / "inference" / "video.py", "an inference or encoding config", "configs/vae/train/stage1.py"),
    ("train", CFG / "inference" / "latents.py", "an encoding config", "configs/vae/train/stage1.py"),
    ("inference", CFG / "train" / "stage1.py", "a training config", "configs/vae/inference/video.py"),
    ("encode", CFG / "train" / "stage3.py", "a training config", "configs/vae/inference/latents.py"),
    ("inference", TINY / "latents.py", "an encoding config", "configs/vae/inference/video.py"),
])
def test_another_jobs_config_is_named_as_such(job, config, other, hint):
    with pytest.raises(ConfigError) as err:
        load_config(config, job=job)
    message = str(err.value)
    assert f"{config.name} is {other}" in message and hint in message and "\n" not in message, message


def test_a_misspelt_key_is_still_a_misspelt_key_not_another_job():
    with pytest.raises(ConfigError) as err:
        load_config(TINY / "stage1.py", ["save_dir='x'", "max_stepz=3"], job="train")
    assert " config;" not in str(err.value)


def _script_help(path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("script, example", [
    ("train_vae.py", "configs/vae/train/stage1.py"),
    ("inference_vae.py", "configs/vae/inference/video.py"),
    ("encode_latents.py", "configs/vae/inference/latents.py"),
])
def test_each_scripts_help_shows_its_own_jobs_config(script, example, capsys):
    text = _script_help(ROOT / "scripts" / script, capsys)
    assert f"a Python config, e.g. {example}" in text, text
    others = {"configs/vae/train/stage1.py", "configs/vae/inference/video.py", "configs/vae/inference/latents.py"}
    assert not any(f"e.g. {o}" in text for o in others - {example}), text


def test_a_flag_set_to_zero_is_passed_on_not_dropped():
    from opensora_vae.cli import ArgumentParser, add_clip_arguments, add_job_arguments, clip_options

    parser = ArgumentParser()
    add_job_arguments(parser, "inference")
    add_clip_arguments(parser, "output")
    args = parser.parse_args([str(TINY / "inference.py"), "--num-frames", "0"])
    assert clip_options(args) == {"dataset.num_frames": 0}  # then refused by the config check, naming the key
