"""scripts/encode_latents.py and LatentDataset: shards, index, bad rows, kill + resume, read back, decode."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from opensora_vae.data import LatentDataset, VideoTextDataset
from opensora_vae import build_model
from opensora_vae.data.latents import read_index, read_meta
from opensora_vae.encode import parse_buckets
from opensora_vae.errors import run_main

from helpers import ROOT, error_line, tiny_pipeline

sys.path.insert(0, str(ROOT / "scripts"))
import encode_latents  # noqa: E402

CONFIG = ROOT / "configs" / "vae" / "tiny" / "latents.py"
BUCKETS = "buckets=[(5,32,32),(9,32,48)]"
TEXTS = ["a phone call", "broken", "a red still, on white", "bikes\nriding", ""]


@pytest.fixture(scope="module")
def job(tmp_path_factory, sample_videos):
    """A checkpoint and a CSV with a bad row (row 1), an image (row 2) and a blank text (row 4)."""
    root = tmp_path_factory.mktemp("encode")
    tiny_pipeline(seed=2).save_pretrained(root / "ckpt")
    Image.new("RGB", (50, 40), (200, 30, 30)).save(root / "still.png")
    (root / "broken.mp4").write_bytes(os.urandom(2048))
    paths = [sample_videos["carphone_pristine"], root / "broken.mp4", root / "still.png", sample_videos["bikes"],
             sample_videos["carphone_distorted"]]
    import pandas as pd

    pd.DataFrame({"path": [str(p) for p in paths], "text": TEXTS}).to_csv(root / "in.csv", index=False)
    return root


def args(job, save_dir, *extra):
    return [str(CONFIG), "--ckpt-path", str(job / "ckpt"), "--data-path", str(job / "in.csv"), "--save-dir",
            str(save_dir), "--cfg-options", BUCKETS, *map(str, extra)]


@pytest.fixture
def one_thread():
    """The torchrun ranks run with one thread each: the same kernels give the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def whole(job):
    """One uninterrupted 1-rank run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encode_latents.main(args(job, job / "whole"))
    finally:
        torch.set_num_threads(threads)
    return job / "whole"


def stored_keys(save_dir):
    keys = []
    for shard in sorted((save_dir / "shards").glob("*.safetensors")):
        keys += [k[:-5] for k in load_file(str(shard)) if k.endswith("/mean")]
    return keys


def tensors(save_dir):
    out = {}
    for shard in (save_dir / "shards").glob("*.safetensors"):
        out.update(load_file(str(shard)))
    return out


EXPECTED = ["0/5x32x32", "0/9x32x48", "2/1x32x32", "2/1x32x48", "3/5x32x32", "3/9x32x48", "4/5x32x32", "4/9x32x48"]


def test_index_meta_and_bad_row(whole, job):
    index = read_index(whole)
    assert list(index["key"]) == EXPECTED  # row 1 is bad; the image is one 1-frame clip per size
    assert sorted(stored_keys(whole)) == EXPECTED
    assert list(index["text"]) == [TEXTS[r] for r in index["row"]]
    row0 = index[index["key"] == "0/9x32x48"].iloc[0]
    assert (row0["num_frames"], row0["height"], row0["width"]) == (9, 32, 48)
    assert (row0["source_height"], row0["source_width"]) == (144, 176)
    assert len(row0["frame_indices"]) == 9 and row0["latent_shape"] == [4, 3, 16, 24]
    meta = json.loads((whole / "meta.json").read_text())
    model = tiny_pipeline(seed=2)
    assert meta["checkpoint"] == str(job / "ckpt") and meta["buckets"] == [[5, 32, 32], [9, 32, 48]]
    assert meta["shift"] == model.shift.flatten().tolist() and meta["scale"] == model.scale.flatten().tolist()
    assert meta["dtype"] == "float32" and meta["save_dtype"] == "fp32" and meta["package_version"]


def test_two_ranks_killed_then_one_rank_resumes_bit_for_bit(whole, job, tmp_path, one_thread):
    save = tmp_path / "latents"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "encode_killed_after_shards.py"), "2", *args(job, save)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, "the test hook should have killed the run"
    # each rank's second clip is a bad row (row 1 at each bucket); the hook kills a rank after its second shard
    assert "skipping" in proc.stderr and "broken.mp4" in proc.stderr
    first = stored_keys(save)
    assert 1 <= len(first) < len(EXPECTED), proc.stderr[-3000:]
    assert not (save / "index.csv").exists()
    (save / "shards" / "run000-rank001-000001.safetensors.tmp").write_bytes(b"half a shard")

    encode_latents.main(args(job, save))
    assert not list((save / "shards").glob("*.tmp"))
    keys = stored_keys(save)
    assert sorted(keys) == EXPECTED  # every good clip exactly once
    assert set(first) <= set(keys) and len(keys) == len(set(keys))
    assert list(read_index(save)["key"]) == EXPECTED
    resumed, reference = tensors(save), tensors(whole)
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k

    before = sorted(p.name for p in (save / "shards").iterdir())
    encode_latents.main(args(job, save))  # nothing left: nothing written
    assert sorted(p.name for p in (save / "shards").iterdir()) == before


def test_latent_dataset_and_decode(whole, job, one_thread):
    ds = LatentDataset(whole)
    assert len(ds) == len(EXPECTED)
    source = VideoTextDataset(job / "in.csv", num_frames=9, image_size=(32, 48))
    model = tiny_pipeline(seed=2)
    i = [r["key"] for _, r in ds.index.iterrows()].index("0/9x32x48")
    item = ds[i]
    assert item["text"] == TEXTS[0] and item["row"] == 0 and item["num_frames"] == 9
    x = source.load_row(0)["video"][None]
    assert torch.equal(item["frame_indices"], source.load_row(0)["frame_indices"])
    with torch.no_grad():
        z = model.encode(x, sample_posterior=False)
        assert torch.equal(item["latent"], z[0]) and torch.equal(item["mean"], z[0])
        expected = model.decode(z, num_frames=9)
        assert torch.equal(model.decode(item["latent"][None], num_frames=9), expected)
        loaded = build_model(read_meta(whole)["model"]).eval()
        assert torch.equal(loaded.decode(item["latent"][None], num_frames=9), expected)
    assert (item["std"] > 0).all()

    image = ds[[r["key"] for _, r in ds.index.iterrows()].index("2/1x32x32")]
    assert image["latent"].shape[1] == 1 and image["text"] == TEXTS[2]

    sampled = LatentDataset(whole, sample=True, seed=3)
    a = sampled[i]["latent"]
    assert torch.equal(a, LatentDataset(whole, sample=True, seed=3)[i]["latent"])
    assert not torch.equal(a, LatentDataset(whole, sample=True, seed=4)[i]["latent"])
    noise = (a - item["mean"]) / item["std"]  # mean + std * N(0, 1)
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
    # DataLoader workers read the same items (one bucket per batch shape)
    one = LatentDataset(whole, sample=True, seed=3, buckets=["5x32x32"])
    batches = list(DataLoader(one, batch_size=2, num_workers=2))
    assert [t for b in batches for t in b["text"]] == [one[j]["text"] for j in range(len(one))]
    direct = torch.stack([one[j]["latent"] for j in range(len(one))])
    assert torch.equal(torch.cat([b["latent"] for b in batches]), direct)


def test_other_checkpoint_is_refused(whole, job, tmp_path):
    tiny_pipeline(seed=5).save_pretrained(tmp_path / "other")
    argv = args(job, whole)
    argv[argv.index("--ckpt-path") + 1] = str(tmp_path / "other")
    with pytest.raises(ValueError, match="another job"):
        encode_latents.main(argv)


def test_parse_buckets():
    assert parse_buckets([(17, 256, 256), (33, 256, 256)], num_frames=9) == [(9, 256, 256)]
    assert parse_buckets([(17, 256, 256)], image_size=(128, 96)) == [(17, 128, 96)]
    with pytest.raises(ValueError):
        parse_buckets([(17, 256)])


def test_a_stop_signal_keeps_what_was_encoded_and_a_rerun_completes_it(whole, job, tmp_path, monkeypatch, one_thread):
    import signal

    from opensora_vae.models.autoencoders import OpenSoraAutoencoder
    from opensora_vae.signals import EXIT_PREEMPTED

    encode, calls = OpenSoraAutoencoder.encode, []

    def signalled(self, x):  # SIGTERM while the third clip is encoding: that clip is finished and written
        calls.append(x.shape)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return encode(self, x)

    monkeypatch.setattr(OpenSoraAutoencoder, "encode", signalled)
    assert encode_latents.main(args(job, tmp_path / "out")) == EXIT_PREEMPTED
    assert len(stored_keys(tmp_path / "out")) == 3
    monkeypatch.undo()
    assert encode_latents.main(args(job, tmp_path / "out")) == 0
    assert sorted(stored_keys(tmp_path / "out")) == EXPECTED
    assert list(read_index(tmp_path / "out")["key"]) == EXPECTED
    mine, ref = tensors(tmp_path / "out"), tensors(whole)
    assert all(torch.equal(mine[k], ref[k]) for k in ref)


def small_job(job, tmp_path, rows, *extra):
    """argv of an encode job over `rows` (paths) with the config's one bucket (5x32x32) unless `extra` sets others."""
    csv = tmp_path / "rows.csv"
    csv.write_text("path\n" + "".join(f"{p}\n" for p in rows))
    return [str(CONFIG), "--ckpt-path", str(job / "ckpt"), "--data-path", str(csv), "--save-dir",
            str(tmp_path / "latents"), *map(str, extra)]




def test_bad_rows_are_counted_as_rows_not_per_bucket(job, tmp_path, sample_videos, caplog):
    rows = [sample_videos["carphone_pristine"], job / "broken.mp4", job / "broken.mp4"]
    assert run_main(encode_latents.main, small_job(job, tmp_path, rows, "--cfg-options", BUCKETS)) == 0
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(summary) == 1 and summary[0].startswith("skipped 2 of 3 row(s)"), summary  # 4 clips: 2 rows x 2 buckets
    assert summary[0].count("[row 1]") == 1 and "5x32x32" in summary[0] and "9x32x48" in summary[0]
    assert stored_keys(tmp_path / "latents") == ["0/5x32x32", "0/9x32x48"]


def test_a_job_that_encodes_nothing_fails_in_one_line_and_leaves_no_folder(job, tmp_path, capsys):
    (tmp_path / "empty.mp4").write_bytes(b"")
    rows = [job / "broken.mp4", tmp_path / "empty.mp4"]
    assert run_main(encode_latents.main, small_job(job, tmp_path, rows)) == 1
    line = error_line(capsys)
    assert "nothing produced: 2 of 2 row(s) failed" in line, line
    assert not (tmp_path / "latents").exists()  # a rerun with a fixed CSV is not refused as another job's


def test_a_frame_size_the_model_cannot_take_is_refused_before_the_folder(job, tmp_path, sample_videos, capsys):
    argv = small_job(job, tmp_path, [sample_videos["carphone_pristine"]], "--image-size", 33, 48)
    assert run_main(encode_latents.main, argv) == 2
    assert "33x48" in error_line(capsys)
    assert not (tmp_path / "latents").exists()


def test_meta_json_reopens_from_any_folder(job, tmp_path, sample_videos, monkeypatch):
    """A checkpoint given relative to where the job started is recorded absolute: the latents decode elsewhere."""
    monkeypatch.chdir(job)
    argv = small_job(job, tmp_path, [sample_videos["carphone_pristine"]])
    argv[argv.index("--ckpt-path") + 1] = "ckpt"
    assert encode_latents.main(argv) == 0
    monkeypatch.chdir(tmp_path)
    meta = read_meta(tmp_path / "latents")
    assert meta["checkpoint"] == str(job / "ckpt") == meta["model"]["from_pretrained"]
    item = LatentDataset(tmp_path / "latents")[0]
    vae = build_model(LatentDataset(tmp_path / "latents").meta["model"]).eval()
    with torch.no_grad():
        assert vae.decode(item["latent"][None], num_frames=5).shape == (1, 3, 5, 32, 32)
    monkeypatch.chdir(job)
    meta_path = tmp_path / "latents" / "meta.json"  # as earlier versions wrote it: relative to the job's folder
    meta_path.write_text(json.dumps(dict(meta, checkpoint="ckpt", model=dict(meta["model"], from_pretrained="ckpt"))))
    assert encode_latents.main(argv) == 0  # the same job started there again: resumes, not "another job"


def test_folders_of_earlier_versions_read_as_before_and_are_not_resumed(whole, job, tmp_path, capsys):
    """Format 1 (earlier versions) stored the pipeline's normalised latents, with shift/scale in meta.json and no
    "format": LatentDataset gives what it gave (normalised by default, as this version's folders), or the posterior
    before normalisation; an encode job into it stops in one line."""
    import shutil

    from safetensors.torch import save_file

    from opensora_vae.data.latents import read_shard_records

    old = tmp_path / "old"
    shutil.copytree(whole, old)
    meta = read_meta(whole)
    shift, scale = (torch.tensor(meta[k]).reshape(-1, 1, 1, 1) for k in ("shift", "scale"))
    for shard in (old / "shards").glob("*.safetensors"):  # as encode_posterior wrote them
        records, stored = read_shard_records(shard), load_file(str(shard))
        normalised = {k: (v - shift) / scale if k.endswith("/mean") else v / scale for k, v in stored.items()}
        save_file(normalised, str(shard), metadata={"clips": json.dumps(records)})
    legacy = {k: v for k, v in meta.items() if k not in ("format", "normalization", "autoencoder")}
    (old / "meta.json").write_text(json.dumps(dict(legacy, latent_space="normalised")))

    new, before = LatentDataset(whole), LatentDataset(old)
    raw_new, raw_old = LatentDataset(whole, normalize=False), LatentDataset(old, normalize=False)
    assert (new.format, before.format) == (2, 1)
    for i in range(len(new)):
        a, b = new[i], before[i]
        assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["std"], b["std"]), i
        assert torch.allclose(raw_old[i]["mean"], raw_new[i]["mean"], rtol=1e-5, atol=1e-6)
        assert torch.allclose(raw_old[i]["std"], raw_new[i]["std"], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(raw_new[i]["mean"], a["mean"])  # shift / scale are not the identity
    assert run_main(encode_latents.main, args(job, old)) == 2
    assert "format 1" in error_line(capsys)
