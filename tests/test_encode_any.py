"""scripts/encode_latents.py with diffusers' video VAEs (tiny random AutoencoderKLWan, AutoencoderKLCogVideoX,
AutoencoderKLLTXVideo given by spec string): 1 and 2 ranks give identical shards, the stored mean and std are the
class's own `encode(x).latent_dist` of the same clip, `LatentDataset(normalize=True)` applies the pipelines' own
formulas, and misfits end in one line before any folder. Run under torchrun, this file encodes the argv lists of its
first argument (JSON) in one process group: one launch for every class."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import diffusers
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import ROOT, TINY_DIFFUSERS, error_line

sys.path.insert(0, str(ROOT / "scripts"))
import encode_latents  # noqa: E402

CONFIG = ROOT / "configs" / "vae" / "tiny" / "latents.py"
TINY = TINY_DIFFUSERS
CLASSES = list(TINY)
# class -> buckets (each length fits the class's rule: Wan 4k+1, CogVideoX and LTX 8k+1), a length it refuses
BUCKETS = {
    "AutoencoderKLWan": ([(5, 16, 16), (9, 16, 24)], 6),
    "AutoencoderKLCogVideoX": ([(9, 16, 16)], 5),
    "AutoencoderKLLTXVideo": ([(9, 32, 32)], 5),
}


def save_tiny(name, folder):
    torch.manual_seed(0)
    model = getattr(diffusers, name)(**TINY[name])
    if name == "AutoencoderKLLTXVideo":  # its statistics are (persistent) buffers, zeros and ones by default
        model.latents_mean.copy_(torch.linspace(-0.4, 0.3, 8))
        model.latents_std.copy_(torch.linspace(0.5, 2.0, 8))
    model.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def job(tmp_path_factory, sample_videos):
    """Each class saved in its own format (a pipeline repo's vae/ subfolder), and a CSV of two videos and an image."""
    root = tmp_path_factory.mktemp("encode_any")
    for name in CLASSES:
        save_tiny(name, root / name / "vae")
    Image.new("RGB", (50, 40), (200, 30, 30)).save(root / "still.png")
    rows = [sample_videos["carphone_pristine"], root / "still.png", sample_videos["bikes"]]
    (root / "in.csv").write_text("path,text\n" + "".join(f"{p},row {i}\n" for i, p in enumerate(rows)))
    return root


def spec(job, name, **options):
    extra = "".join(f",{k}={v}" for k, v in {"subfolder": "vae", **options}.items())
    return f"diffusers:{name}={job / name}{extra}"


def args(job, name, save_dir, ckpt=None):
    buckets = BUCKETS[name][0]
    return [str(CONFIG), "--ckpt-path", ckpt or spec(job, name), "--data-path", str(job / "in.csv"), "--save-dir",
            str(save_dir), "--cfg-options", f"buckets={buckets}"]


def tensors(save_dir):
    out = {}
    for shard in (save_dir / "shards").glob("*.safetensors"):
        out.update(load_file(str(shard)))
    return out


@pytest.fixture(scope="module")
def one_rank(job):
    """class -> the folder of one uninterrupted 1-rank run (one thread, as each torchrun rank)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in CLASSES:
            assert encode_latents.main(args(job, name, job / f"{name}-1")) == 0
    finally:
        torch.set_num_threads(threads)
    return {name: job / f"{name}-1" for name in CLASSES}


def test_one_and_two_ranks_give_identical_shards_and_resume(job, one_rank):
    runs = [args(job, name, job / f"{name}-2") + ["dist_timeout=60"] for name in CLASSES]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           json.dumps(runs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in CLASSES:
        one, two = tensors(one_rank[name]), tensors(job / f"{name}-2")
        assert len({p.name.split("-")[1] for p in (job / f"{name}-2" / "shards").iterdir()}) == 2  # both ranks wrote
        assert one.keys() == two.keys() and len(one) == 2 * 3 * len(BUCKETS[name][0])  # mean, std; 3 rows x buckets
        for key in one:
            assert torch.equal(one[key], two[key]), (name, key)
        from opensora_vae.data.latents import read_index

        assert list(read_index(one_rank[name])["key"]) == list(read_index(job / f"{name}-2")["key"])
        # resumable: a 1-rank rerun into the 2-rank folder is the same job (meta.json alike) and finds nothing to do
        shards = sorted(p.name for p in (job / f"{name}-2" / "shards").iterdir())
        assert encode_latents.main(args(job, name, job / f"{name}-2")) == 0
        assert sorted(p.name for p in (job / f"{name}-2" / "shards").iterdir()) == shards


@pytest.mark.parametrize("name", CLASSES)
def test_stored_mean_and_std_are_the_class_own_posterior(job, one_rank, name):
    from opensora_vae.data import VideoTextDataset
    from opensora_vae.data.latents import read_meta

    model = getattr(diffusers, name).from_pretrained(str(job / name), subfolder="vae").eval()
    stored = tensors(one_rank[name])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for row in (0, 1):  # a video and the image (a 1-frame clip)
            t, h, w = BUCKETS[name][0][-1]
            source = VideoTextDataset(job / "in.csv", num_frames=t, image_size=(h, w), image_frames="single")
            x = source.load_row(row)["video"][None]
            key = f"{row}/{1 if row == 1 else t}x{h}x{w}"
            with torch.no_grad():
                own = model.encode(x).latent_dist
            assert torch.equal(stored[f"{key}/mean"], own.mean[0]) and torch.equal(stored[f"{key}/std"], own.std[0])
    finally:
        torch.set_num_threads(threads)
    meta = read_meta(one_rank[name])
    assert meta["format"] == 2 and meta["model"]["type"] == f"diffusers:{name}"
    assert meta["model"]["from_pretrained"] == str(job / name) and meta["model"]["subfolder"] == "vae"
    assert meta["autoencoder"]["latent_channels"] == stored["0/" + "x".join(map(str, BUCKETS[name][0][0])) +
                                                           "/mean"].shape[0]


def pipeline_normalised(name, model, z):
    """The normalisation of diffusers' own pipelines, written out as they write it."""
    view = (1, -1, 1, 1, 1)
    if name == "AutoencoderKLWan":  # pipeline_wan_i2v.py: (z - latents_mean) * latents_std, where latents_std = 1 / std
        mean, std = torch.tensor(model.config.latents_mean), torch.tensor(model.config.latents_std)
        return (z - mean.view(view)) * (1.0 / std).view(view)
    if name == "AutoencoderKLLTXVideo":  # pipeline_ltx.py _normalize_latents: (z - mean) * scaling_factor / std
        return (z - model.latents_mean.view(view)) * model.config.scaling_factor / model.latents_std.view(view)
    return model.config.scaling_factor * z  # pipeline_cogvideox_video2video.py: scaling_factor * z


@pytest.mark.parametrize("name", CLASSES)
def test_latent_dataset_normalises_as_the_pipelines_do(job, one_rank, name):
    from opensora_vae.data import LatentDataset

    model = getattr(diffusers, name).from_pretrained(str(job / name), subfolder="vae")
    raw, normalised = LatentDataset(one_rank[name], normalize=False), LatentDataset(one_rank[name])
    stored = tensors(one_rank[name])
    assert len(raw) == len(normalised) == len(stored) // 2
    for i in range(len(raw)):
        a, b = raw[i], normalised[i]
        key = raw.index.iloc[i]["key"]
        assert torch.equal(a["mean"], stored[f"{key}/mean"]) and torch.equal(a["std"], stored[f"{key}/std"])
        want = pipeline_normalised(name, model, a["mean"][None])[0]
        assert torch.allclose(b["mean"], want, rtol=1e-5, atol=1e-6), (name, key)
        assert not torch.allclose(b["mean"], a["mean"], rtol=1e-3, atol=1e-3)  # not the identity
        # an affine map with a positive scale: the std is the distance it maps mean + std to
        want_std = pipeline_normalised(name, model, (a["mean"] + a["std"])[None])[0] - want
        assert torch.allclose(b["std"], want_std, rtol=1e-4, atol=1e-5), (name, key)
        assert torch.equal(b["latent"], b["mean"])  # no sampling asked


# ----- misfits: one line, no folder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["unknown class", "frame count", "subfolder", "image frame count"])
def test_misfits_end_in_one_line_before_any_folder(job, tmp_path, capsys, case):
    from opensora_vae.errors import run_main

    name = "AutoencoderKLWan"
    argv = args(job, name, tmp_path / "out")
    if case == "unknown class":
        argv[2] = argv[2].replace(name, "AutoencoderKLNope", 1)
        expect = "AutoencoderKLNope"
    elif case == "frame count":
        argv[-1] = f"buckets=[(5, 16, 16), ({BUCKETS[name][1]}, 16, 16)]"
        expect = "bucket num_frames 6: "
    elif case == "subfolder":
        argv[2] = spec(job, name, subfolder="nope").replace(",subfolder=vae", "")
        expect = "no subfolder 'nope'"
    else:  # a length rule that 1 frame does not fit: the CSV's image row
        argv[2] = spec(job, name, frames="4k")
        argv[-1] = "buckets=[(8, 16, 16)]"
        expect = "an image row's num_frames 1"
    assert run_main(encode_latents.main, argv) != 0
    line = error_line(capsys)
    assert expect in line, line
    assert not (tmp_path / "out").exists()


if __name__ == "__main__":  # under torchrun: encode each argv list of the first argument, in one process group
    from opensora_vae.distributed import close_distributed

    encode_latents.close_distributed = lambda: None  # gloo cannot form a second group in this process
    try:
        for argv in json.loads(sys.argv[1]):
            assert encode_latents.main(argv) == 0
    finally:
        close_distributed()
