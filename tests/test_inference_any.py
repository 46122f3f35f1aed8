"""scripts/inference_vae.py with diffusers' video VAEs (tiny random AutoencoderKLWan, AutoencoderKLCogVideoX,
AutoencoderKLLTXVideo given by spec string): _ori and _rec (no _spatial, said once), the reconstruction is the class's
own of the _ori clip (compared in memory, before video coding), --tiling is the model's own tiling, what was built is
recorded, and misfits end in one line before any folder."""
from __future__ import annotations

import logging
import sys

import diffusers
import pytest
import torch

from helpers import ROOT, error_line
from opensora_vae.config import load_config
from opensora_vae.errors import run_main
from test_encode_any import TINY, save_tiny

sys.path.insert(0, str(ROOT / "scripts"))
import inference_vae  # noqa: E402

CONFIG = ROOT / "configs" / "vae" / "tiny" / "inference.py"
CLASSES = list(TINY)
# class -> (num_frames its rule takes, height, width, a length it refuses)
CLIPS = {
    "AutoencoderKLWan": (5, 16, 24, 6),
    "AutoencoderKLCogVideoX": (9, 16, 16, 5),
    "AutoencoderKLLTXVideo": (9, 32, 32, 5),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference_any")
    for name in CLASSES:
        save_tiny(name, root / name)
    return root


@pytest.fixture
def csv(tmp_path, sample_videos):
    path = tmp_path / "in.csv"
    path.write_text(f"path\n{sample_videos['carphone_pristine']}\n{sample_videos['bikes']}\n")
    return path


def spec(models, name, **options):
    return f"diffusers:{name}={models / name}" + "".join(f",{k}={v}" for k, v in options.items())


@pytest.fixture
def written(monkeypatch):
    """(folder name, clip name) -> the video the job handed to the writer, in memory (before video coding)."""
    import opensora_vae.inference as inference

    seen, write = {}, inference._write

    def spy(folder, name, video, fps, crf):
        seen[(folder.name, name)] = video.clone()
        return write(folder, name, video, fps, crf)

    monkeypatch.setattr(inference, "_write", spy)
    return seen


@pytest.mark.parametrize("name", CLASSES)
def test_writes_ori_and_rec_the_class_own_reconstruction(models, csv, tmp_path, written, caplog, name):
    from opensora_vae.inference import reconstruct_dataset

    caplog.set_level(logging.INFO)
    t, h, w, _ = CLIPS[name]
    cfg = load_config(CONFIG, {"model.from_pretrained": spec(models, name), "dataset.data_path": str(csv),
                               "dataset.num_frames": t, "dataset.image_size": (h, w), "save_dir": str(tmp_path / "o"),
                               "crf": 0})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = reconstruct_dataset(cfg)
        assert len(report.written) == 2 and report.skipped == {}
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o_")) == ["o_ori", "o_rec"]
        for kind in ("ori", "rec"):
            assert sorted(p.name for p in (tmp_path / f"o_{kind}").iterdir()) == ["bikes.mp4", "carphone_pristine.mp4"]
        said = [r.getMessage() for r in caplog.records if "no spatial-only path" in r.getMessage()]
        assert len(said) == 1 and "no _spatial" in said[0], said
        model = getattr(diffusers, name).from_pretrained(str(models / name)).eval()
        for clip in ("bikes", "carphone_pristine"):
            ori, rec = written[("o_ori", clip)], written[("o_rec", clip)]
            assert tuple(ori.shape) == (3, t, h, w)
            with torch.no_grad():
                own = model.decode(model.encode(ori[None]).latent_dist.mode()).sample[0]
            assert torch.equal(rec, own), (name, clip)
    finally:
        torch.set_num_threads(threads)
    assert report.model == {"type": f"diffusers:{name}", "from_pretrained": str(models / name)}


def test_tiling_is_the_model_own(models, tmp_path):
    from opensora_vae.jobs import job_model

    name = "AutoencoderKLWan"
    plain = job_model({"type": f"diffusers:{name}", "from_pretrained": str(models / name)}, "cpu", torch.float32)
    assert not plain.model.use_tiling
    tiled = job_model({"type": f"diffusers:{name}", "from_pretrained": str(models / name), "tiling": {}}, "cpu",
                      torch.float32)
    assert tiled.model.use_tiling
    sized = job_model({"type": f"diffusers:{name}", "from_pretrained": str(models / name),
                       "tiling": {"tile_size": 64, "overlap": 16}}, "cpu", torch.float32)
    assert (sized.model.tile_sample_min_height, sized.model.tile_sample_stride_width) == (64, 48)
    cog = job_model(f"diffusers:AutoencoderKLCogVideoX={models / 'AutoencoderKLCogVideoX'}", "cpu", torch.float32)
    assert not cog.model.use_tiling
    # the flag: --tiling --tile-size on the Open-Sora inference config with a diffusers checkpoint
    from opensora_vae.cli import ArgumentParser, add_clip_arguments, add_job_arguments, job_config

    parser = ArgumentParser()
    add_job_arguments(parser, "inference")
    add_clip_arguments(parser, "")
    cfg = job_config(parser.parse_args([str(CONFIG), "--ckpt-path", spec(models, "AutoencoderKLCogVideoX"),
                                        "--tiling", "--tile-size", "96", "--tile-overlap", "32"]), "inference")
    vae = job_model(cfg.model, "cpu", torch.float32, log=False)
    assert vae.model.use_tiling and vae.model.tile_sample_min_width == 96
    assert vae.model.tile_overlap_factor_height == pytest.approx(1 / 3)




@pytest.mark.parametrize("case", ["unknown class", "frame count", "subfolder", "frame size", "tile option"])
def test_misfits_end_in_one_line_before_any_folder(models, csv, tmp_path, capsys, case):
    name = "AutoencoderKLLTXVideo"
    t, h, w, refused = CLIPS[name]
    ckpt, frames, size, extra = spec(models, name), t, (h, w), []
    if case == "unknown class":
        ckpt, expect = spec(models, "AutoencoderKLNope"), "AutoencoderKLNope"
    elif case == "frame count":
        frames, expect = refused, f"dataset.num_frames {refused}: "
    elif case == "subfolder":
        ckpt, expect = spec(models, name, subfolder="vae"), "no subfolder 'vae'"
    elif case == "frame size":
        size, expect = (48, 48), "multiples of 32"
    else:
        extra, expect = ["--tile-mid-block"], "tile_mid_block"
    argv = [str(CONFIG), "--ckpt-path", ckpt, "--data-path", str(csv), "--save-dir", str(tmp_path / "r"),
            "--num-frames", str(frames), "--image-size", *map(str, size), *extra]
    assert run_main(inference_vae.main, argv) != 0
    line = error_line(capsys)
    assert expect in line, line
    assert not list(tmp_path.glob("r_*"))
