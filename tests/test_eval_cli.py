"""eval/vae/eval_common_metric.py on tiny folders: pairing, frame sampling, JSON report, unavailable metrics."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from opensora_vae.data.video import write_video
from opensora_vae.metrics.pairs import ClipTooShortError, PairingError, load_clip, pair_videos, sample_indices
from opensora_vae.metrics.pwcnet import PWCNet
from opensora_vae.perceptual import build_lpips

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval" / "vae" / "eval_common_metric.py"
ARGS = ["--batch_size", "2", "--device", "cpu", "--sample_fps", "8", "--resolution", "64", "--crop_size", "64",
        "--num_frames", "5", "--sample_rate", "1"]


def _cli():
    spec = importlib.util.spec_from_file_location("eval_common_metric", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _clip(seed: int, t: int = 6, h: int = 64, w: int = 80) -> torch.Tensor:
    """A smooth pattern drifting right by 2 px per frame, uint8 (T, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(3, generator=g) * 6.28
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    frames = [
        torch.stack([torch.sin((xx - 2 * i) / (5 + c) + yy / 9 + phase[c]) for c in range(3)]) for i in range(t)
    ]
    return ((torch.stack(frames) + 1) * 127.5).round().to(torch.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """real/{a,b}.mp4 and generated/{a,b}.mkv: a is a noisy copy, b the identical file."""
    root = tmp_path_factory.mktemp("videos")
    real, gen = root / "real", root / "generated"
    for name, seed in (("a", 0), ("b", 1)):
        write_video(real / f"{name}.mp4", _clip(seed), fps=8)
    noisy = _clip(0).float() + 25 * torch.randn(6, 3, 64, 80, generator=torch.Generator().manual_seed(5))
    write_video(gen / "a.mkv", noisy.clamp(0, 255).round().to(torch.uint8), fps=8)
    shutil.copy(real / "b.mp4", gen / "b.mkv")
    return real, gen


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Random-valued stand-ins in the published formats: torchvision AlexNet features and sniklaus PWC-Net."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    net = build_lpips("alex", random_backbone=True).net
    alex = {"features." + k.split(".", 1)[1]: v for k, v in net.state_dict().items()}
    torch.save(alex, root / "alexnet.pth")
    pwc = {k.replace("net", "module"): v for k, v in PWCNet().state_dict().items()}
    torch.save(pwc, root / "network-default.pytorch")
    return root / "alexnet.pth", root / "network-default.pytorch"


def test_sample_indices_follow_reference_linspace():
    assert sample_indices(17, 17, 1) == list(range(17))
    assert sample_indices(40, 17, 2) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 33]
    assert sample_indices(12, 4, 3) == [0, 3, 7, 11]  # linspace(0, 11, 4) = 0, 3.67, 7.33, 11, truncated
    with pytest.raises(ValueError, match="needs 34 frames"):
        sample_indices(33, 17, 2)


def test_pairing_by_stem_and_errors(folders, tmp_path):
    real, gen = folders
    pairs = pair_videos(real, gen)
    assert [(p.name, p.real.name, p.generated.name) for p in pairs] == [("a", "a.mp4", "a.mkv"),
                                                                         ("b", "b.mp4", "b.mkv")]
    assert [p.name for p in pair_videos(real, gen, subset_size=1)] == ["a"]
    extra = tmp_path / "gen"
    shutil.copytree(gen, extra)
    (extra / "a.mkv").rename(extra / "zzz.mkv")
    (extra / "notes.txt").write_text("not a video")
    with pytest.raises(PairingError) as err:
        pair_videos(real, extra)
    assert "a.mp4" in str(err.value) and "zzz.mkv" in str(err.value) and "notes.txt" not in str(err.value)


def test_load_clip_range_shape_and_short_clip(folders):
    real, _ = folders
    x = load_clip(real / "a.mp4", num_frames=5, resolution=32, crop_size=32)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0
    with pytest.raises(ClipTooShortError, match="too short"):
        load_clip(real / "a.mp4", num_frames=4, sample_rate=2)


def test_cli_reports_missing_weights_and_runs_the_rest(folders, tmp_path):
    real, gen = folders
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "OPENSORA_VAE_PWCNET_WEIGHTS"}
    env["TORCH_HOME"] = str(tmp_path / "empty_torch_home")  # no backbone or PWC-Net weights cached there
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--real_video_dir", str(real), "--generated_video_dir", str(gen), *ARGS,
         "--metric", "ssim", "psnr", "lpips", "flolpips", "--output", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "unavailable" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report) == {"config", "videos", "metrics"}
    assert report["videos"] == ["a", "b"] and report["config"]["num_frames"] == 5
    m = report["metrics"]
    assert set(m) == {"ssim", "psnr", "lpips", "flolpips"}
    for name in ("lpips", "flolpips"):
        assert m[name]["available"] is False
    assert "alexnet-owt" in m["lpips"]["reason"] and "network-default.pytorch" in m["flolpips"]["reason"]
    for name in ("ssim", "psnr"):
        assert m[name]["available"] is True
        assert set(m[name]) == {"available", "mean", "std", "num_videos", "per_video"}
        assert set(m[name]["per_video"]) == {"a", "b"}
    assert m["ssim"]["per_video"]["b"] == pytest.approx(1.0, abs=1e-12)
    assert m["psnr"]["per_video"]["b"] == 100.0
    assert 0 < m["ssim"]["per_video"]["a"] < 0.99 and 10 < m["psnr"]["per_video"]["a"] < 40
    vals = np.array(list(m["psnr"]["per_video"].values()))
    assert m["psnr"]["mean"] == pytest.approx(vals.mean()) and m["psnr"]["std"] == pytest.approx(vals.std())


def test_cli_all_metrics_with_weight_files(folders, weight_files, tmp_path, monkeypatch, capsys):
    real, gen = folders
    alex, pwc = weight_files
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.delenv("OPENSORA_VAE_PWCNET_WEIGHTS", raising=False)
    cli = _cli()
    base = ["--real_video_dir", str(real), "--generated_video_dir", str(gen), *ARGS, "--lpips-backbone", str(alex)]
    out = tmp_path / "all.json"
    assert cli.main([*base, "--pwcnet-weights", str(pwc), "--output", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert all(m[k]["available"] for k in ("ssim", "psnr", "lpips", "flolpips"))
    for name in ("lpips", "flolpips"):
        assert m[name]["per_video"]["b"] == 0.0
        assert m[name]["per_video"]["a"] > 0.0
    out2 = tmp_path / "no_pwc.json"
    assert cli.main([*base, "--pwcnet-weights", str(tmp_path / "missing.pytorch"), "--metric", "lpips", "flolpips",
                     "--output", str(out2)]) == 0
    m2 = json.loads(out2.read_text())["metrics"]
    assert m2["lpips"]["available"] and m2["lpips"]["per_video"] == m["lpips"]["per_video"]
    assert not m2["flolpips"]["available"] and "missing.pytorch" in m2["flolpips"]["reason"]
    assert "flolpips unavailable" in capsys.readouterr().out


def test_cli_fails_clearly(folders, tmp_path, capsys):
    real, gen = folders
    cli = _cli()
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(real / "a.mp4", lonely / "c.mp4")
    argv = ["--real_video_dir", str(real), "--generated_video_dir", str(lonely), *ARGS, "--metric", "psnr"]
    assert cli.main(argv) == 2
    assert "c.mp4" in capsys.readouterr().err
    args = ["--real_video_dir", str(real), "--generated_video_dir", str(gen), "--metric", "psnr"]
    assert cli.main([*args, "--num_frames", "7"]) == 2
    assert "too short" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main([*args, "--num_frames", "5", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_two_rank_eval_gives_the_scores_of_one_rank(tmp_path):
    """Five 17-frame pairs (batches of 2 split 2 + 1 between the ranks), every metric that needs no weights plus
    rFVD on a random-valued I3D file in the hub cache: the same report from one rank and from two."""
    from opensora_vae.metrics.fvd import load_i3d

    real, gen = tmp_path / "real", tmp_path / "gen"
    for i, name in enumerate("abcde"):
        clip = _clip(i, t=17)
        write_video(real / f"{name}.mp4", clip, fps=8)
        noisy = clip.float() + 20 * torch.randn(clip.shape, generator=torch.Generator().manual_seed(i))
        write_video(gen / f"{name}.mp4", noisy.clamp(0, 255).to(torch.uint8), fps=8)
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(load_i3d(random_weights=True).net.state_dict(), hub / "i3d_pretrained_400.pt")
    args = ["--real_video_dir", str(real), "--generated_video_dir", str(gen), "--batch_size", "2", "--device", "cpu",
            "--resolution", "64", "--crop_size", "64", "--num_frames", "17", "--metric", "ssim", "psnr", "fvd",
            "temporal", "--chunk_frames", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TORCH_HOME=str(tmp_path / "torch_home"))
    one = subprocess.run([sys.executable, str(SCRIPT), *args, "--output", str(tmp_path / "one.json")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(SCRIPT), *args, "--output", str(tmp_path / "two.json")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert (a["config"]["ranks"], b["config"]["ranks"]) == (1, 2)
    assert a["metrics"]["fvd"]["available"] and a["metrics"]["fvd"]["mean"] > 0
    assert a["metrics"] == b["metrics"] and a["seams"] == b["seams"]
    assert list(b["metrics"]["psnr"]["per_video"]) == list("abcde")


def test_temporal_scores_find_a_seam_in_the_report(tmp_path):
    from opensora_vae.metrics.evaluate import evaluate

    clip = _clip(3, t=40)
    seam = clip.clone()
    seam[17:] = (seam[17:].int() + 60).clamp(0, 255).to(torch.uint8)  # a jump where the second chunk starts
    write_video(tmp_path / "real" / "s.mp4", clip, fps=8, crf=0)
    write_video(tmp_path / "gen" / "s.mp4", seam, fps=8, crf=0)
    report = evaluate(tmp_path / "real", tmp_path / "gen", ["psnr", "temporal"], batch_size=1, num_frames=40,
                      resolution=None, crop_size=None, device="cpu", progress=False)
    m = report["metrics"]
    assert m["seam_jump_excess"]["mean"] > 5  # the mean over both boundaries: one jumps, one does not
    assert [b["boundary"] for b in report["seams"]["s"]] == [17, 34]
    jumps = {b["boundary"]: b["jump"] for b in report["seams"]["s"]}
    assert jumps[17] > 15 and jumps[17] - jumps[34] > 15  # only the first boundary jumps
    assert m["temporal_consistency"]["mean"] > 0 and m["psnr"]["available"]


@pytest.mark.parametrize("flag, value, expected", [
    ("--num_frames", "0", "int >= 1"), ("--num-frames", "-3", "int >= 1"), ("--batch_size", "0", "int >= 1"),
    ("--sample_rate", "0", "int >= 1"), ("--subset_size", "0", "int >= 1"), ("--resolution", "-1", "int >= 0"),
    ("--crop_size", "-1", "int >= 0"), ("--chunk_frames", "-1", "int >= 0"), ("--num_workers", "-1", "int >= 0"),
    ("--sample_fps", "0", "float > 0"), ("--num_frames", "seventeen", "int >= 1"),
])
def test_numeric_flags_are_range_checked_naming_the_flag(flag, value, expected, tmp_path, capsys):
    rc = _cli().main(["--real_video_dir", str(tmp_path / "a"), "--generated_video_dir", str(tmp_path / "b"),
                      flag, value])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: argument {flag.replace('-', '_').replace('__', '--')}") and value in err[0]
    assert expected in err[0], err


def test_help_shows_each_default_once():
    import re

    text = " ".join(_cli().build_parser().format_help().split())
    assert "(default: cuda if available)" in text and "(default: 17)" in text
    assert not re.search(r"\(default: [^)]*\) \(default:", text), text
    assert "(default: None)" not in text, text


def test_docs_list_every_metric_and_flag():
    docs = (ROOT / "docs" / "evaluation.md").read_text()
    row = next(line for line in docs.splitlines() if line.startswith("| `--metric`"))
    from opensora_vae.metrics.evaluate import METRICS

    assert all(f" {m}" in row.replace("`", " ") for m in METRICS), row
    flags = [a.option_strings[0] for a in _cli().build_parser()._actions if a.option_strings[0] != "-h"]
    missing = [f for f in flags if f"`{f}`" not in docs and f"`{f.replace('_', '-')}`" not in docs]
    assert not missing, missing


def test_protocol_table_prints_the_temporal_scores():
    """The JSON holds the temporal scores under their own names; the table prints them, not `temporal n/a`."""
    from opensora_vae.protocol import format_report
    from opensora_vae.metrics.temporal import SCORES

    scores = {name: {"available": True, "mean": 1.5 + i, "std": 0.0, "num_clips": 2, "per_clip": {}}
              for i, name in enumerate(SCORES) if name != "seam_psnr"}
    vae = {"frames_fed": 17, "throughput_clips_per_s": 2.0, "peak_memory_gib": 0.5,
           "metrics": {"psnr": {"available": True, "mean": 30.25, "std": 1.0, "num_clips": 2, "per_clip": {}},
                       **scores}}
    result = {"protocol": {"name": "p", "sha256": "0" * 64, "content": {"metrics": ["psnr", "temporal"]}},
              "num_clips_scored": 2, "num_clips_listed": 2, "vaes": {"wan": vae}}
    table = format_report(result)
    head, row = table.splitlines()[1:3]
    assert "n/a" not in row and "temporal " not in head, table
    for i, name in enumerate(SCORES):
        if name != "seam_psnr":
            assert name in head and f"{1.5 + i:.4f}" in row, table
    assert "30.2500" in row
