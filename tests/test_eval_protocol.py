"""eval/vae/eval_vae.py: tiny random diffusers video VAEs (Wan, CogVideoX, LTX-Video) and this project's tiny
pipeline scored under one protocol file in one command; the protocol's validation and hash; the VAE adapters'
length rules; the shipped protocol files."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys

import diffusers
import pytest
import torch

from helpers import ROOT, tiny_pipeline
from opensora_vae.errors import UserError
from opensora_vae.models import FrameRule, load_autoencoder, parse_vae_spec
from opensora_vae.protocol import (FORMAT, ProtocolError, file_sha256, frame_indices, load_protocol,
                                   protocol_from_dict, resolve_clips)

SCRIPT = ROOT / "eval" / "vae" / "eval_vae.py"
EVAL_CONFIGS = ROOT / "configs" / "eval"
# Tiny widths: each builds in well under a second and reconstructs a 32x40 clip in about one.
TINY = {
    "AutoencoderKLWan": dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4,
                             latents_std=[1.0] * 4),
    "AutoencoderKLCogVideoX": dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                   norm_num_groups=4),
    "AutoencoderKLLTXVideo": dict(block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                  latent_channels=8, layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5),
}
T = 10  # not a valid length for any of the diffusers classes: each is padded differently


def _cli():
    spec = importlib.util.spec_from_file_location("eval_vae", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _protocol(**fields):
    return dict(dict(format=FORMAT, name="tiny", num_frames=T), **fields)


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """name -> spec of each tiny model, saved the way a user's would be (CogVideoX in a pipeline's vae/ folder)."""
    root = tmp_path_factory.mktemp("vaes")
    tiny_pipeline(0).save_pretrained(root / "opensora")
    torch.manual_seed(0)
    for cls, cfg in TINY.items():
        getattr(diffusers, cls)(**cfg).save_pretrained(root / cls / ("vae" if cls == "AutoencoderKLCogVideoX" else ""))
    return {
        "opensora": f"opensora:{root / 'opensora'},name=opensora",
        "wan": f"diffusers:AutoencoderKLWan={root / 'AutoencoderKLWan'},name=wan",
        "cog": f"diffusers:AutoencoderKLCogVideoX={root / 'AutoencoderKLCogVideoX'},subfolder=vae,name=cog",
        "ltx": f"diffusers:AutoencoderKLLTXVideo={root / 'AutoencoderKLLTXVideo'},name=ltx",
    }


@pytest.fixture(scope="module")
def run(vaes, sample_videos, tmp_path_factory):
    """One command: two real clips (one listed without its extension) and a missing one, four VAEs. FloLPIPS is
    left out: PWC-Net on CPU would take half of the test's time (its scorer is evaluate.py's, tested there)."""
    root = tmp_path_factory.mktemp("run")
    protocol = root / "protocol.json"
    protocol.write_text(json.dumps(_protocol(
        clips=["carphone_pristine.mp4", "bikes", "missing_clip.mp4"], resize_short_side=40, center_crop=[32, 40],
        metrics=["ssim", "psnr", "lpips"], notes="tiny test protocol")))
    out = root / "result.json"
    argv = ["--protocol", str(protocol), "--data-root", str(sample_videos["bikes"].parent), "--device", "cpu",
            "--random-weights", "--no-progress", "--output", str(out)]
    for spec in vaes.values():
        argv += ["--vae", spec]
    rc = _cli().main(argv)
    return rc, json.loads(out.read_text()), protocol


def test_one_command_scores_every_vae_with_throughput_and_memory(run):
    rc, result, _ = run
    assert rc == 0
    assert list(result["vaes"]) == ["opensora", "wan", "cog", "ltx"]
    for name, vae in result["vaes"].items():
        assert "error" not in vae, (name, vae.get("error"))
        assert vae["num_clips"] == 2 and vae["dtype"] == "float32" and vae["posterior"] == "mode"
        assert vae["throughput_clips_per_s"] > 0 and vae["reconstruct_seconds"] > 0
        assert vae["peak_memory_bytes"] > 0 and vae["peak_memory_kind"].startswith("process_peak_rss")
        metrics = vae["metrics"]
        assert list(metrics) == ["ssim", "psnr", "lpips"]
        for m, r in metrics.items():
            assert r["available"] and r["num_clips"] == 2 and set(r["per_clip"]) == {"carphone_pristine.mp4", "bikes"}
            values = list(r["per_clip"].values())
            assert all(math.isfinite(v) for v in values), (name, m, values)
            assert r["mean"] == pytest.approx(sum(values) / 2)
        assert all(-1 <= v <= 1 for v in metrics["ssim"]["per_clip"].values())
        assert all(0 < v <= 100 for v in metrics["psnr"]["per_clip"].values())
        assert all(v >= 0 for v in metrics["lpips"]["per_clip"].values())
    # random weights and different designs: the reconstructions differ
    assert len({v["metrics"]["psnr"]["mean"] for v in result["vaes"].values()}) == 4


def test_each_vae_is_fed_its_design_length_and_scored_on_the_clip_length(run):
    _, result, _ = run
    fed = {name: (v["frames_fed"], v["frame_rule"]) for name, v in result["vaes"].items()}
    assert fed == {"opensora": (10, "any"), "wan": (13, "4k+1"), "cog": (17, "8k+1"), "ltx": (17, "8k+1")}
    assert all(v["frames_scored"] == T for v in result["vaes"].values())
    assert result["vaes"]["ltx"]["spatial_multiple"] == 32  # 32x40 padded to 32x64 and cropped back
    assert result["vaes"]["cog"]["options"] == {"subfolder": "vae"}
    for clip in result["clips"][:2]:
        assert clip["indices"] == list(range(T)) and clip["size"] == [32, 40]


def test_report_records_protocol_hash_versions_and_clip_hashes(run, sample_videos):
    _, result, protocol = run
    content = result["protocol"]["content"]
    hashed = {k: v for k, v in content.items() if k not in ("description", "notes")}
    expected = hashlib.sha256(json.dumps(hashed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert result["protocol"]["sha256"] == expected == load_protocol(protocol).sha256
    assert (content["dtype"], content["posterior"], content["sample_stride"]) == ("fp32", "mode", 1)  # defaults
    packages = result["environment"]["packages"]
    assert packages["torch"] == torch.__version__.split("+")[0] or packages["torch"] == torch.__version__
    assert packages["diffusers"] == diffusers.__version__ and packages["opensora_vae"]
    clips = {c["name"]: c for c in result["clips"]}
    assert clips["bikes"]["sha256"] == hashlib.sha256(sample_videos["bikes"].read_bytes()).hexdigest()
    assert clips["carphone_pristine.mp4"]["sha256"] == file_sha256(sample_videos["carphone_pristine"])
    assert len(result["clip_list_sha256"]) == 64


def test_a_missing_clip_is_reported_and_counted_not_fatal(run):
    _, result, _ = run
    assert result["num_clips_listed"] == 3 and result["num_clips_scored"] == 2
    assert list(result["skipped_clips"]) == ["missing_clip.mp4"]
    assert "file not found" in result["skipped_clips"]["missing_clip.mp4"]


def test_adapters_pad_to_the_valid_length_and_crop_back(vaes):
    want = {"opensora": {17: 17, 10: 10, 1: 1}, "wan": {17: 17, 10: 13, 1: 1},
            "cog": {17: 17, 10: 17, 9: 9}, "ltx": {17: 17, 10: 17, 9: 9}}
    for name, spec in vaes.items():
        vae = load_autoencoder(spec)
        assert {t: vae.frames_needed(t) for t in want[name]} == want[name], name
    x = torch.rand(1, 3, T, 16, 24) * 2 - 1
    assert load_autoencoder(vaes["wan"]).reconstruct(x).shape == x.shape
    # posterior="sample": one draw per seed, repeatable; the mode is another reconstruction
    sampled = load_autoencoder(vaes["ltx"], posterior="sample")
    a, b = (sampled.reconstruct(x, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, load_autoencoder(vaes["ltx"]).reconstruct(x))
    # a rule the model does not follow is an error, never a silent crop of shifted frames
    wrong = load_autoencoder(vaes["cog"] + ",frames=4k+1")
    with pytest.raises(ValueError, match=r"fed 13 frames .* got 16 frames"):
        wrong.reconstruct(x)


def test_frame_rules_and_vae_specs():
    assert [FrameRule.parse("4k+1").needed(t) for t in (1, 2, 5, 6, 17)] == [1, 5, 5, 9, 17]
    assert [FrameRule.parse("8k").needed(t) for t in (1, 8, 9)] == [8, 8, 16]
    assert FrameRule.parse("any").needed(10) == 10 and str(FrameRule.parse("6k+1")) == "6k+1"
    with pytest.raises(ValueError, match="not a length rule"):
        FrameRule.parse("4n+1")
    spec = parse_vae_spec("diffusers:AutoencoderKLWan=Wan-AI/Wan2.1-T2V-1.3B-Diffusers,subfolder=vae")
    assert (spec.kind, spec.class_name, spec.source, spec.options) == (
        "diffusers", "AutoencoderKLWan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", {"subfolder": "vae"})
    assert spec.name == "AutoencoderKLWan:Wan2.1-T2V-1.3B-Diffusers"
    assert parse_vae_spec("opensora:hpcai-tech/OpenSora-VAE-v1.2,micro_frame_size=null").name == \
        "opensora:OpenSora-VAE-v1.2"
    for bad, message in (("vq:foo", "unknown kind"), ("diffusers:org/repo", "CLASS=PATH_OR_ID"),
                         ("opensora:x,oops", "not key=value"), ("opensora:", "no path"),
                         ("opensora:x,frames=5", "not a length rule")):
        with pytest.raises(ValueError, match=message):
            parse_vae_spec(bad)
    with pytest.raises(ValueError, match="no autoencoder class 'AutoencoderKLNope'"):
        load_autoencoder("diffusers:AutoencoderKLNope=x")


@pytest.mark.parametrize("fields, message", [
    (dict(num_frames=0), "field 'num_frames' must be an integer >= 1, got 0"),
    (dict(num_frame=17), "unknown field 'num_frame' (did you mean num_frames?)"),
    (dict(dtype="fp8"), "field 'dtype' must be one of fp32, bf16, fp16"),
    (dict(metrics=["psnr", "fid"]), "field 'metrics' must be a list of distinct names"),
    (dict(center_crop=[256]), "field 'center_crop' must be null, an integer >= 1 or [height, width]"),
    (dict(round_output_uint8="yes"), "field 'round_output_uint8' must be true or false"),
    (dict(clips=["a.mp4"], clips_csv="x.csv"), "give 'clips' or 'clips_csv', not both"),
    (dict(clips=["a.mp4", "a.mp4"]), "lists 'a.mp4' more than once"),
    (dict(format="v2"), "field 'format' must be the string"),
])
def test_protocol_validation_names_the_field(fields, message):
    with pytest.raises(ProtocolError) as err:
        protocol_from_dict(_protocol(**fields), "p.json")
    assert message in str(err.value) and str(err.value).startswith("protocol p.json: ")
    with pytest.raises(ProtocolError, match="field 'name' is missing"):
        protocol_from_dict({"format": FORMAT, "num_frames": 17})


def test_protocol_hash_names_the_setting_not_the_prose():
    base = protocol_from_dict(_protocol(clips=["a.mp4"]))
    same = protocol_from_dict(dict(reversed(list(_protocol(clips=["a.mp4"], notes="other words", sample_stride=1,
                                                             center_crop=None, dtype="fp32").items()))))
    assert same.sha256 == base.sha256
    assert protocol_from_dict(_protocol(clips=["a.mp4"], num_frames=17)).sha256 != base.sha256
    assert protocol_from_dict(_protocol(clips=["a.mp4"], round_input_uint8=False)).sha256 != base.sha256
    assert protocol_from_dict(_protocol(clips=["a.mp4"], center_crop=8)).crop == (8, 8)


def test_frame_sampling_resamples_to_the_protocol_fps():
    p = protocol_from_dict(_protocol(num_frames=5, fps=30))
    assert frame_indices(100, 60.0, p) == [0, 2, 4, 6, 8]  # frames dropped
    assert frame_indices(100, 24.0, p) == [0, 0, 1, 2, 3]  # frames repeated, never blended
    assert frame_indices(100, 30.0, p) == [0, 1, 2, 3, 4]
    p = protocol_from_dict(_protocol(num_frames=4, sample_stride=2, start_frame=3))
    assert frame_indices(100, 0.0, p) == [3, 5, 7, 9]  # fps null: the file's own rate, known or not
    with pytest.raises(ValueError, match="needs frame index 9 .* has 9 frames"):
        frame_indices(9, 25.0, p)
    with pytest.raises(ValueError, match="frame rate unknown"):
        frame_indices(100, 0.0, protocol_from_dict(_protocol(fps=30)))


def test_shipped_protocol_files():
    from mmengine.config import Config

    protocols = {p.stem: load_protocol(p) for p in sorted(EVAL_CONFIGS.glob("*.json"))}
    assert set(protocols) == {"published_opensora_v1_2", "mcl_jcv_17x256", "davis_17x256", "webvid_val_17x256"}
    assert len({p.sha256 for p in protocols.values()}) == 4
    for p in protocols.values():
        assert (p.num_frames, p.sample_stride, p.resize_short_side, p.crop) == (17, 1, 256, (256, 256))
    mcl = protocols["mcl_jcv_17x256"]
    assert mcl.clips == [f"videoSRC{i:02d}" for i in range(1, 31)] and mcl.fps == 30
    for name in ("davis_17x256", "webvid_val_17x256"):  # no invented clip names: the user's CSV
        assert protocols[name].clips is None and protocols[name].clips_csv is None
        assert "--clips-csv" in protocols[name].notes
    pub = protocols["published_opensora_v1_2"]
    ref = Config.fromfile(str(ROOT / "configs" / "vae" / "inference" / "published_eval.py"))
    assert pub.num_frames == ref.dataset.num_frames and tuple(pub.crop) == tuple(ref.dataset.image_size)
    assert pub.sample_stride == ref.dataset.frame_interval and pub.max_clips == ref.num_samples
    assert pub.dtype == ref.dtype and (pub.posterior == "sample") == ref.sample_posterior
    assert pub.metrics == ["ssim", "psnr", "lpips", "flolpips"]


def test_clip_lists_from_a_csv(make_csv, tmp_path):
    davis = load_protocol(EVAL_CONFIGS / "davis_17x256.json")
    (tmp_path / "bear.mp4").write_bytes(b"")
    csv = make_csv([{"path": "bear.mp4"}, {"path": "nope.mp4"}], name="davis.csv")
    entries, used = resolve_clips(davis, None, clips_csv=csv)  # data root: the CSV's folder
    assert used == csv and [e.name for e in entries] == ["bear.mp4", "nope.mp4"]
    assert entries[0].path == tmp_path / "bear.mp4" and entries[1].path is None
    with pytest.raises(UserError, match="lists no clips: pass --clips-csv"):
        resolve_clips(davis, tmp_path)
    with pytest.raises(UserError, match="fixes its own clip list"):
        resolve_clips(load_protocol(EVAL_CONFIGS / "mcl_jcv_17x256.json"), tmp_path, clips_csv=csv)


def test_a_bad_protocol_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_protocol(clips=["a.mp4"], sample_stride=-1)))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--protocol", str(bad), "--data-root", str(tmp_path),
                           "--vae", "opensora:nowhere"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [f"error: protocol {bad}: field 'sample_stride' must be an integer >= 1, got -1"], proc.stderr


def test_rfvd_and_temporal_scores_under_the_protocol(vaes, sample_videos, tmp_path):
    """rFVD over the clips (a random I3D) and the seam/flicker scores, with seams only where the VAE has chunks."""
    protocol = tmp_path / "protocol.json"
    protocol.write_text(json.dumps(_protocol(
        clips=["carphone_pristine.mp4", "bikes"], num_frames=17, resize_short_side=40, center_crop=[32, 40],
        metrics=["psnr", "fvd", "temporal"])))
    out = tmp_path / "result.json"
    argv = ["--protocol", str(protocol), "--data-root", str(sample_videos["bikes"].parent), "--device", "cpu",
            "--random-weights", "--no-progress", "--no-clip-hashes", "--output", str(out),
            "--vae", vaes["opensora"].replace(",name=", ",micro_frame_size=8,name="), "--vae", vaes["wan"]]
    assert _cli().main(argv) == 0
    result = json.loads(out.read_text())
    ours, wan = result["vaes"]["opensora"]["metrics"], result["vaes"]["wan"]["metrics"]
    for m in (ours, wan):
        assert m["fvd"]["available"] and m["fvd"]["mean"] > 0 and m["fvd"]["num_clips"] == 2
        assert m["temporal_consistency"]["available"] and m["temporal_consistency"]["mean"] > 0
    assert ours["seam_psnr"]["available"] and ours["seam_psnr"]["num_clips"] == 2  # boundaries at 8 and 16
    assert "seam_psnr" not in wan and wan["seam_dip_db"]["mean"] == 0.0  # no chunks in time: flat
    assert ours["fvd"]["mean"] != wan["fvd"]["mean"]


def test_two_ranks_give_the_report_of_one(vaes, sample_videos, tmp_path):
    """Three clips split 2 + 1 over two gloo ranks: every score, rFVD and the seam scores included, as one rank."""
    protocol = tmp_path / "protocol.json"
    protocol.write_text(json.dumps(_protocol(
        clips=["carphone_pristine.mp4", "bikes.mp4", "carphone_distorted.mp4"], num_frames=17,
        resize_short_side=40, center_crop=[32, 40], metrics=["ssim", "psnr", "fvd", "temporal"])))
    args = ["--protocol", str(protocol), "--data-root", str(sample_videos["bikes"].parent), "--device", "cpu",
            "--random-weights", "--no-progress", "--no-clip-hashes",
            "--vae", vaes["opensora"].replace(",name=", ",micro_frame_size=8,name="), "--vae", vaes["wan"]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    runs = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks{ranks}.json"
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
               if ranks > 1 else [sys.executable])
        proc = subprocess.run([*cmd, str(SCRIPT), *args, "--output", str(out)], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[ranks] = json.loads(out.read_text())
    for name in ("opensora", "wan"):
        one, two = runs[1]["vaes"][name], runs[2]["vaes"][name]
        assert (one["ranks"], two["ranks"], one["num_clips"], two["num_clips"]) == (1, 2, 3, 3)
        assert one["metrics"] == two["metrics"]
        assert list(two["metrics"]["psnr"]["per_clip"]) == ["carphone_pristine.mp4", "bikes.mp4",
                                                            "carphone_distorted.mp4"]
        assert two["throughput_clips_per_s"] > 0 and two["peak_memory_bytes"] > 0
