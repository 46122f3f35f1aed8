"""`make demo` at tiny sizes: the stage chain, metrics.json, skipping and --force, a failing stage, --pretrained,
and one stage launched through torchrun with 2 gloo ranks."""
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from opensora_vae.demo import cli, data, stages
from opensora_vae.demo.stages import SPLITS, STAGES
from helpers import tiny_pipeline

ARGS = ["--steps", "2,1,1,1", "--image-size", "32", "--launcher", "inprocess"]


@pytest.fixture(scope="module")
def small_sources(sample_videos):
    """The two small carphone clips (one trains, one is held out) and two photos: the cache builds in seconds."""
    photos = data.sample_photos()
    if len(photos) < 2:
        pytest.skip(f"scikit-image's photographs are needed: {data.PHOTOS_INSTALL_HINT}")
    clips = {"carphone_pristine": sample_videos["carphone_pristine"],
             "carphone_distorted": sample_videos["carphone_distorted"]}
    return clips, dict(list(photos.items())[:2])


@pytest.fixture
def sources(small_sources, monkeypatch):
    clips, photos = small_sources
    monkeypatch.setattr(data, "sample_clips", lambda: clips)
    monkeypatch.setattr(data, "sample_photos", lambda: photos)
    monkeypatch.setattr(data, "EXCLUDED", ())  # the distorted twin stands in for a training clip


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_sources):
    """One full tiny run (random start, stages 0-3, scores, report), copied by the tests that change it."""
    clips, photos = small_sources
    out = tmp_path_factory.mktemp("demo") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "sample_clips", lambda: clips)
        mp.setattr(data, "sample_photos", lambda: photos)
        mp.setattr(data, "EXCLUDED", ())
        assert cli.main(["--out", str(out), *ARGS]) == 0
    return out


def _copy(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def _records(out):
    return {s: json.loads((out / "stages" / s / "trained.json").read_text()) for s in STAGES}


def test_chain_writes_metrics_and_report(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert list(metrics) == list(STAGES)
    for stage in STAGES:
        assert set(metrics[stage]) == set(SPLITS)
        for split in SPLITS:
            assert set(metrics[stage][split]) == {"ssim", "psnr"}
            assert 0 < metrics[stage][split]["psnr"] < 100 and -1 <= metrics[stage][split]["ssim"] <= 1
    for name in ("report.html", "report.md", "loss.png", "frames.png"):
        assert (finished / name).is_file(), name
    width = Image.open(finished / "frames.png").width
    assert 512 <= width <= 1280
    page = (finished / "report.html").read_text()
    assert "<table>" in page and page.count("unavailable: weights not found") <= 2
    # Each stage loaded the previous one's checkpoint; the step counts are the ones asked for.
    records = _records(finished)
    assert [records[s]["steps"] for s in stages.TRAIN_STAGES] == [2, 1, 1, 1]
    for before, after in zip(STAGES, STAGES[1:]):
        assert records[after]["previous"] == records[before]["checkpoint"]
    # Stage 0 trains the spatial VAE only: the temporal VAE keeps its random start.
    init = load_file(str(finished / records["init"]["checkpoint"] / "model.safetensors"))
    stage0 = load_file(str(finished / records["stage0"]["checkpoint"] / "model.safetensors"))
    assert all(torch.equal(init[k], stage0[k]) for k in init if k.startswith("temporal_vae."))
    assert any(not torch.equal(init[k], stage0[k]) for k in init if k.startswith("spatial_vae."))


def test_rerun_skips_finished_stages_and_force_redoes_them(finished, tmp_path, sources, capsys):
    out = _copy(finished, tmp_path)
    before = _records(out)
    assert cli.main(["--out", str(out), *ARGS]) == 0
    assert capsys.readouterr().out.count("already done") == len(STAGES)
    assert _records(out) == before
    assert cli.main(["--out", str(out), "--force", *ARGS]) == 0
    assert "already done" not in capsys.readouterr().out
    after = _records(out)
    assert all(after[s]["seconds"] != before[s]["seconds"] for s in STAGES)


def test_changed_steps_redo_that_stage_and_the_later_ones(finished, tmp_path, sources, capsys):
    out = _copy(finished, tmp_path)
    before = _records(out)
    assert cli.main(["--out", str(out), "--steps", "2,1,2,1", *ARGS[2:]]) == 0
    after = _records(out)
    assert [after[s] == before[s] for s in STAGES] == [True, True, True, False, False]
    assert after["stage2"]["steps"] == 2


def test_failing_stage_is_named_and_earlier_stages_are_kept(finished, tmp_path, sources, capsys):
    out = _copy(finished, tmp_path)
    before = _records(out)
    # Stage 2 must be redone (its record is gone) and cannot load stage 1's checkpoint (corrupt).
    shutil.rmtree(out / "stages" / "stage2")
    (out / before["stage1"]["checkpoint"] / "model.safetensors").write_bytes(b"not a checkpoint")
    assert cli.main(["--out", str(out), *ARGS]) == 1
    printed = capsys.readouterr().out
    assert "FAILED: stage2 failed while training" in printed
    after = {s: json.loads((out / "stages" / s / "trained.json").read_text()) for s in ("init", "stage0", "stage1")}
    assert after == {s: before[s] for s in after}
    assert not (out / "stages" / "stage2" / "trained.json").exists()


def test_next_stage_starts_while_the_last_is_scored_and_stops_if_scoring_fails(finished, tmp_path, sources, capsys,
                                                                                 monkeypatch):
    out = _copy(finished, tmp_path)
    shutil.rmtree(out / "stages" / "stage1")  # stage 1 trains again (torchrun) while stage 0 is scored
    (out / "stages" / "stage0" / "scores.json").unlink()
    launched = []

    def failing_scores(self, stage, checkpoint):
        if stage == "stage0":
            launched.append(self.running)
            raise stages.StageFailed(stage, "scoring", "test")
        return original(self, stage, checkpoint)

    original = stages.StageRunner.scores
    monkeypatch.setattr(stages.StageRunner, "scores", failing_scores)
    args = [a if a != "inprocess" else "torchrun" for a in ARGS] + ["--nproc", "1"]  # stage 0 stays done
    assert cli.main(["--out", str(out), *args]) == 1
    assert "FAILED: stage0 failed while scoring" in capsys.readouterr().out
    assert len(launched) == 1 and launched[0] is not None and launched[0].poll() is not None  # launched, stopped
    assert not (out / "stages" / "stage1" / "trained.json").exists()


def test_pretrained_weights_are_scored_beside_the_table(finished, tmp_path, sources):
    out = _copy(finished, tmp_path)
    published = tmp_path / "published"
    tiny_pipeline().save_pretrained(published)
    assert cli.main(["--out", str(out), "--pretrained", str(published), "--pretrained-size", "64", *ARGS]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == list(STAGES) + ["pretrained"]
    for split in SPLITS:
        assert 0 < metrics["pretrained"][split]["psnr"] < 100
    assert (out / "recon" / "pretrained" / "heldout_rec" / "carphone_pristine.mp4").is_file()
    assert "pretrained" in (out / "report.html").read_text()


def test_stage_through_torchrun_with_two_ranks(finished, tmp_path, sources):
    out = _copy(finished, tmp_path)
    settings = stages.default_settings(nproc=2)
    settings.image_size, settings.steps = 32, {"stage0": 1, "stage1": 1, "stage2": 1, "stage3": 1}
    cache = data.build_cache(out / "cache", 32)
    runner = stages.StageRunner(out, cache, settings)
    init = runner.checkpoint(_records(out)["init"])
    record = runner.start("stage0", init)()
    assert record["ranks"] == 2 and record["steps"] == 1
    assert (out / "stages" / "stage0" / "command.txt").read_text().count("--nproc_per_node=2") == 1
    assert (runner.checkpoint(record) / "model.safetensors").is_file()


def test_cache_csvs_give_each_videos_frame_count_and_fps(finished):
    import pandas as pd

    from opensora_vae.data import probe_video

    rows = pd.read_csv(finished / "cache" / "clips.csv")
    videos = rows[rows["path"].str.endswith(".mp4")]
    assert len(videos) and rows["num_frames"].isna().sum() == len(rows) - len(videos)  # images: empty
    for row in videos.drop_duplicates("path").itertuples():
        info = probe_video(row.path)
        assert (row.num_frames, row.fps) == (info.num_frames, pytest.approx(info.fps))


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_demo_stages_keep_the_published_recipe(stage):
    from opensora_vae.config import load_config

    demo, published = (load_config(stages.ROOT / "configs" / "vae" / d / f"{stage}.py") for d in ("demo", "train"))
    keys = ("use_real_rec_loss", "use_z_rec_loss", "use_image_identity_loss", "mixed_strategy", "mixed_image_ratio",
            "kl_loss_weight", "perceptual_loss_weight", "sample_posterior", "batch_size", "grad_clip")
    assert {k: demo.get(k) for k in keys} == {k: published.get(k) for k in keys}
    assert demo.model.freeze_vae_2d == published.model.freeze_vae_2d
    assert demo.model.micro_frame_size == published.model.micro_frame_size
    assert demo.dataset.num_frames == published.dataset.num_frames
    assert not demo.get("train_spatial_only", False)


def test_demo_stage0_fits_the_spatial_vae_with_the_pixel_losses():
    from opensora_vae.config import load_config

    cfg = load_config(stages.CONFIGS / "stage0.py")
    assert cfg.train_spatial_only and cfg.use_real_rec_loss and not cfg.use_z_rec_loss
    assert cfg.dataset.num_frames == 1 and cfg.model.freeze_vae_2d is False
    assert cfg.model.vae_2d.config.block_out_channels == [16, 32, 64]  # 4x per side
