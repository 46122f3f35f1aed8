"""Small builders shared by the tests (tiny models from the repo's tiny config)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from mmengine.config import Config

from opensora_vae import build_model

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
TINY_MODEL_CONFIG = ROOT / "configs" / "vae" / "tiny" / "model.py"


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
    return meta, load_file(str(DATA / "tiny_pipeline.safetensors")), load_file(str(DATA / "tiny_pipeline_io.safetensors"))
