"""Small builders shared by the tests (tiny models from the repo's tiny config)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from mmengine.config import Config

from opensora_vae import build_model

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
TINY = ROOT / "configs" / "vae" / "tiny"
TINY_MODEL_CONFIG = TINY / "model.py"
# Deterministic training settings so runs can be compared number for number.
EXACT = {"mixed_strategy": None, "sample_posterior": False, "dataset.image_size": (16, 16),
         "dataset.num_frames": 5, "trackers": []}


def tiny_model_cfg(**overrides) -> dict:
    cfg = copy.deepcopy(Config.fromfile(str(TINY_MODEL_CONFIG)).to_dict()["model"])
    cfg.update(overrides)
    return cfg


def tiny_pipeline(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_model_cfg(**overrides)).eval()


def reference_fixture():
    from safetensors.torch import load_file

    meta = json.loads((DATA / "tiny_pipeline.json").read_text())
    return (meta, load_file(str(DATA / "tiny_pipeline.safetensors")),
            load_file(str(DATA / "tiny_pipeline_io.safetensors")))


# ----- training runs -------------------------------------------------------------------------------------------
def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def run_in_process(config, csv, outputs, load=None, **options):
    from opensora_vae.config import load_config
    from opensora_vae.train import Trainer

    cfg = load_config(config, {"dataset.data_path": str(csv), "outputs": str(outputs), **options})
    trainer = Trainer(cfg, config_name=Path(config).stem, load=load)
    try:
        saved = trainer.train()
    finally:
        trainer.close()
    return trainer.run_dir, saved


def torchrun_command(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(ROOT / "scripts" / "train_vae.py"), *map(str, args)]


def torchrun_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def torchrun(nproc, *args, timeout=300):
    proc = subprocess.run(torchrun_command(nproc, *args), env=torchrun_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def options(d):
    return [f"{k}={v!r}" if not isinstance(v, (int, float, type(None))) else f"{k}={v}" for k, v in d.items()]


def poison_loss(trainer, at) -> None:
    """Make the trainer's loss NaN at the steps where `at(trainer.global_step)` holds (0-based step index)."""
    forward = trainer.loss_fn.forward

    def poisoned(x, out):
        terms = forward(x, out)
        if at(trainer.global_step):
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    trainer.loss_fn.forward = poisoned


# Tiny diffusers video VAEs: tiny widths, the published compression (Wan 4x8x8, CogVideoX 4x8x8, LTX 8x32x32); each
# builds in well under a second. Wan's latent statistics and the scaling factors are not the identity, so a
# normalisation applied wrongly shows.
TINY_DIFFUSERS = {
    "AutoencoderKLWan": dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]),
    "AutoencoderKLCogVideoX": dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                   norm_num_groups=4, scaling_factor=0.7),
    "AutoencoderKLLTXVideo": dict(block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                  latent_channels=8, layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
                                  scaling_factor=0.5),
}


def error_line(capsys) -> str:
    """The one line a failed job printed (stderr of run_main), and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]
