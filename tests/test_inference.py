"""scripts/inference_vae.py: the three output folders, images, stats, bad rows, no overwrite, several ranks."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from opensora_vae.data import probe_video, read_video
from opensora_vae.errors import run_main
from opensora_vae.inference import output_names

from helpers import ROOT, error_line, tiny_pipeline

sys.path.insert(0, str(ROOT / "scripts"))
import inference_vae  # noqa: E402

CONFIG = ROOT / "configs" / "vae" / "tiny" / "inference.py"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_pipeline(seed=2).save_pretrained(path)
    return path


@pytest.fixture
def csv(tmp_path, sample_videos):
    img = tmp_path / "still.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(img)
    rows = [sample_videos["carphone_pristine"], sample_videos["bikes"], img]
    path = tmp_path / "in.csv"
    path.write_text("path\n" + "\n".join(map(str, rows)) + "\n")
    return path


def run(*args):
    inference_vae.main([str(CONFIG), *map(str, args)])


@pytest.mark.parametrize("layout", ["published", "trainer"])
def test_writes_ori_rec_spatial_that_decode_back(tmp_path, csv, ckpt, sample_videos, layout):
    if layout == "trainer":  # a training checkpoint folder holds the published format under model/
        tiny_pipeline(seed=2).save_pretrained(tmp_path / "epoch0-global_step1" / "model")
        ckpt = tmp_path / "epoch0-global_step1"
    run("--ckpt-path", ckpt, "--data-path", csv, "--save-dir", tmp_path / "out", "--num-frames", 9,
        "--image-size", 32, 48)
    for kind in ("ori", "rec", "spatial"):
        folder = tmp_path / f"out_{kind}"
        # as the reference, an image in a video run is repeated to num_frames: a static clip, written as video
        assert sorted(p.name for p in folder.iterdir()) == ["bikes.mp4", "carphone_pristine.mp4", "still.mp4"]
        for name in ("bikes.mp4", "carphone_pristine.mp4"):
            frames, fps = read_video(folder / name)
            assert tuple(frames.shape) == (9, 3, 32, 48)
            assert fps == pytest.approx(probe_video(sample_videos[name[:-4]]).fps, rel=1e-3)
        assert tuple(read_video(folder / "still.mp4")[0].shape) == (9, 3, 32, 48)
    still, _ = read_video(tmp_path / "out_ori" / "still.mp4")
    assert (still.float() - still[:1].float()).abs().max() <= 3  # static up to video coding
    ori, _ = read_video(tmp_path / "out_ori" / "carphone_pristine.mp4")
    rec, _ = read_video(tmp_path / "out_rec" / "carphone_pristine.mp4")
    assert not torch.equal(ori, rec)  # an untrained VAE changes the clip


def test_matches_the_pipeline_on_the_same_input(tmp_path, sample_videos, ckpt):
    """What lands in _rec is the pipeline's reconstruction of what lands in _ori (up to video coding)."""
    path = tmp_path / "one.csv"
    path.write_text(f"path\n{sample_videos['carphone_pristine']}\n")
    run("--ckpt-path", ckpt, "--data-path", path, "--save-dir", tmp_path / "o", "--num-frames", 5, "--cal-stats")
    from opensora_vae.data import VideoTextDataset

    item = VideoTextDataset(path, num_frames=5, image_size=(64, 64)).load_row(0)
    model = tiny_pipeline(seed=2)
    with torch.no_grad():
        out = model(item["video"][None], sample_posterior=False)
    stats = json.loads((tmp_path / "o_latent_stats.json").read_text())
    z = out.z.double()
    assert stats["mean"] == pytest.approx(z.mean(dim=(0, 2, 3, 4)).tolist(), rel=1e-5, abs=1e-6)
    assert stats["std"] == pytest.approx(z.std(dim=(0, 2, 3, 4), unbiased=False).tolist(), rel=1e-5, abs=1e-6)
    assert stats["num_videos"] == 1
    rec, _ = read_video(tmp_path / "o_rec" / "carphone_pristine.mp4")
    expected = ((out.x_rec[0].clamp(-1, 1) + 1) * 127.5).permute(1, 0, 2, 3)
    source = ((item["video"] + 1) * 127.5).permute(1, 0, 2, 3)
    # H.264 (4:2:0) is lossy on an untrained VAE's noisy output, but the file is far closer to it than to the input.
    err = (rec.float() - expected).abs().mean()
    assert err < 0.5 * (rec.float() - source).abs().mean(), err


def test_bad_rows_skipped_and_existing_outputs_kept(tmp_path, csv, ckpt, caplog):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(os.urandom(2048))
    csv.write_text(csv.read_text() + f"{bad}\n")
    run("--ckpt-path", ckpt / "model.safetensors", "--data-path", csv, "--save-dir", tmp_path / "r",
        "--num-frames", 5)
    assert not (tmp_path / "r_rec" / "broken.mp4").exists()
    assert any("broken.mp4" in r.getMessage() and "skipped 1 of 4 row(s)" in r.getMessage() for r in caplog.records)
    target = tmp_path / "r_rec" / "bikes.mp4"
    before = target.stat().st_mtime_ns
    run("--ckpt-path", ckpt, "--data-path", csv, "--save-dir", tmp_path / "r", "--num-frames", 5)
    assert target.stat().st_mtime_ns == before
    run("--ckpt-path", ckpt, "--data-path", csv, "--save-dir", tmp_path / "r", "--num-frames", 5, "--overwrite")
    assert target.stat().st_mtime_ns != before


def test_two_ranks_split_the_csv(tmp_path, csv, ckpt):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "inference_vae.py"), str(CONFIG), "--ckpt-path", str(ckpt), "--data-path",
           str(csv), "--save-dir", str(tmp_path / "d"), "--num-frames", "5", "--cal-stats"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(list((tmp_path / "d_rec").iterdir())) == 3
    assert json.loads((tmp_path / "d_latent_stats.json").read_text())["num_videos"] == 3


def test_image_run_writes_images(tmp_path, csv, ckpt):
    run("--ckpt-path", ckpt, "--data-path", csv, "--save-dir", tmp_path / "i", "--num-frames", 1)
    assert Image.open(tmp_path / "i_rec" / "still.png").size == (64, 64)


def test_protocol_options_num_samples_crf_fps_and_sampling(tmp_path, csv, ckpt):
    common = ["--ckpt-path", ckpt, "--data-path", csv, "--num-frames", 5, "--num-samples", 1, "--fps", 24]
    run(*common, "--save-dir", tmp_path / "a", "--crf", 23, "--sample-posterior")
    run(*common, "--save-dir", tmp_path / "b", "--crf", 23, "--sample-posterior", "--cfg-options", "seed=7")
    run(*common, "--save-dir", tmp_path / "c", "--crf", 0)
    assert [p.name for p in (tmp_path / "a_rec").iterdir()] == ["carphone_pristine.mp4"]  # the first row only
    a, fps = read_video(tmp_path / "a_rec" / "carphone_pristine.mp4")
    b, _ = read_video(tmp_path / "b_rec" / "carphone_pristine.mp4")
    assert fps == pytest.approx(24)
    assert not torch.equal(a, b)  # sampled posteriors: another seed, another reconstruction
    # the written quality follows --crf: near-lossless CRF 0 takes several times the bytes of CRF 23
    size = {k: (tmp_path / f"{k}_ori" / "carphone_pristine.mp4").stat().st_size for k in "ac"}
    assert size["c"] > 2 * size["a"], size


def test_output_names_are_unique():
    assert output_names(["/a/x.mp4", "/b/x.mp4", "/c/y.mp4"]) == ["x-0", "x-1", "y"]


def test_a_stop_signal_ends_after_the_current_clip_and_a_rerun_writes_the_rest(tmp_path, csv, ckpt, monkeypatch):
    import signal

    from opensora_vae.models import VideoAutoencoderPipeline
    from opensora_vae.signals import EXIT_PREEMPTED

    forward = VideoAutoencoderPipeline.forward

    def signalled(self, *args, **kwargs):  # the scheduler's SIGTERM arrives while the first clip is running
        os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(VideoAutoencoderPipeline, "forward", signalled)
    argv = [str(CONFIG), "--ckpt-path", str(ckpt), "--data-path", str(csv), "--save-dir", str(tmp_path / "r"),
            "--num-frames", "5"]
    assert inference_vae.main(argv) == EXIT_PREEMPTED
    assert [len(list((tmp_path / f"r_{k}").iterdir())) for k in ("ori", "rec", "spatial")] == [1, 1, 1]
    monkeypatch.undo()
    assert inference_vae.main(argv) == 0
    assert sorted(p.stem for p in (tmp_path / "r_rec").iterdir()) == ["bikes", "carphone_pristine", "still"]




def test_a_job_whose_every_row_fails_exits_non_zero_and_leaves_no_folders(tmp_path, ckpt, capsys):
    for name in ("broken.mp4", "empty.mp4"):
        (tmp_path / name).write_bytes(os.urandom(2048) if name == "broken.mp4" else b"")
    path = tmp_path / "bad.csv"
    path.write_text(f"path\n{tmp_path / 'broken.mp4'}\n{tmp_path / 'empty.mp4'}\n")
    argv = [str(CONFIG), "--ckpt-path", str(ckpt), "--data-path", str(path), "--save-dir", str(tmp_path / "r"),
            "--num-frames", "5"]
    assert run_main(inference_vae.main, argv) == 1
    line = error_line(capsys)
    assert "nothing produced: 2 of 2 row(s) failed" in line and "broken.mp4 [row 0]" in line, line
    assert not list(tmp_path.glob("r_*"))


def test_some_bad_rows_exit_0_and_are_counted_once_each(tmp_path, csv, ckpt, caplog):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(os.urandom(2048))
    csv.write_text(csv.read_text() + f"{bad}\n{bad}\n")  # two bad rows (one file)
    argv = [str(CONFIG), "--ckpt-path", str(ckpt), "--data-path", str(csv), "--save-dir", str(tmp_path / "r"),
            "--num-frames", "5"]
    assert run_main(inference_vae.main, argv) == 0
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(summary) == 1 and summary[0].startswith("skipped 2 of 5 row(s)"), summary
    assert "[row 3]" in summary[0] and "[row 4]" in summary[0]


def test_a_frame_size_the_model_cannot_take_is_refused_before_any_folder(tmp_path, csv, ckpt, capsys):
    argv = [str(CONFIG), "--ckpt-path", str(ckpt), "--data-path", str(csv), "--save-dir", str(tmp_path / "r"),
            "--num-frames", "5", "--image-size", "33", "48"]
    assert run_main(inference_vae.main, argv) == 2
    line = error_line(capsys)
    assert "dataset.image_size 33x48" in line and "multiples of 2" in line and "--image-size 32 48" in line, line
    assert not list(tmp_path.glob("r_*"))


def test_ctrl_c_is_a_stop_signal_by_default(tmp_path, csv, ckpt, monkeypatch):
    import signal

    from opensora_vae.models import VideoAutoencoderPipeline
    from opensora_vae.signals import EXIT_PREEMPTED

    forward = VideoAutoencoderPipeline.forward

    def interrupted(self, *args, **kwargs):  # Ctrl-C while the first clip is running
        os.kill(os.getpid(), signal.SIGINT)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(VideoAutoencoderPipeline, "forward", interrupted)
    argv = [str(CONFIG), "--ckpt-path", str(ckpt), "--data-path", str(csv), "--save-dir", str(tmp_path / "r"),
            "--num-frames", "5"]
    try:
        code = inference_vae.main(argv)
    except KeyboardInterrupt:  # a regression must fail this test, not end the test session
        pytest.fail("Ctrl-C raised KeyboardInterrupt instead of stopping the job")
    assert code == EXIT_PREEMPTED
    assert [len(list((tmp_path / f"r_{k}").iterdir())) for k in ("ori", "rec", "spatial")] == [1, 1, 1]


def test_a_ctrl_c_outside_the_stop_signals_ends_in_one_line_with_exit_130(tmp_path, csv, ckpt, monkeypatch, capsys):
    import opensora_vae.inference

    def interrupted(*args, **kwargs):  # Ctrl-C while the model loads: no stop signal installed yet
        raise KeyboardInterrupt

    monkeypatch.setattr(opensora_vae.inference, "job_model", interrupted)
    argv = [str(CONFIG), "--ckpt-path", str(ckpt), "--data-path", str(csv), "--save-dir", str(tmp_path / "r")]
    try:
        code = run_main(inference_vae.main, argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped run_main")
    assert code == 130
    assert "interrupted" in error_line(capsys)


def test_an_unreachable_hub_fails_at_once_in_one_line_naming_the_model_and_the_offline_way(tmp_path, csv):
    """The README's command on a machine without network: no retries, no traceback."""
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, str(ROOT / "scripts" / "inference_vae.py"), str(ROOT / "configs/vae/inference/video.py"),
           "--ckpt-path", "hpcai-tech/OpenSora-VAE-v1.2", "--data-path", str(csv), "--save-dir", str(tmp_path / "r")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: hpcai-tech/OpenSora-VAE-v1.2 ") and "cannot be reached" in lines[0]
    assert "local folder" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert not list(tmp_path.glob("r_*"))


def test_the_published_spatial_vae_without_the_hub_fails_in_one_line(tmp_path, monkeypatch):
    """Training's published configs take the SDXL VAE from the hub: the same fast, one-line failure."""
    from huggingface_hub import constants

    from opensora_vae import build_model
    from opensora_vae.config import load_config
    from opensora_vae.errors import RunError
    from opensora_vae.models.spatial import SDXL_VAE_HUB_ID

    unreachable = "http://127.0.0.1:9"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        constants.HUGGINGFACE_CO_URL_TEMPLATE.replace(constants.ENDPOINT, unreachable))
    monkeypatch.setattr(constants, "ENDPOINT", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    model = load_config(ROOT / "configs" / "vae" / "train" / "stage1.py", job="train").model
    with pytest.raises(RunError, match=f"^{SDXL_VAE_HUB_ID} is no local path, the Hugging Face hub cannot be reached"):
        build_model(model)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline on purpose, nothing cached: the folder way
    with pytest.raises(RunError, match="hub access is off .* pass a local folder"):
        build_model(model)
