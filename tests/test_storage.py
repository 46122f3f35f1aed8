"""storage.py and the jobs on object storage, against a real S3 API on localhost (moto's server, over HTTP through
s3fs): training from an s3:// CSV, encoding to s3:// killed and resumed, inference to s3://, evaluation of two s3://
folders, and the one-line errors (missing object or bucket, denied access, a server that stops answering)."""
import json
import os
import subprocess
import sys

import pytest
import s3fs
import torch
from PIL import Image

from opensora_vae import storage
from opensora_vae.config import ConfigError, load_config
from opensora_vae.data import LatentDataset, read_frames, read_video
from opensora_vae.data.latents import read_index, read_shard_records
from opensora_vae.encode import ShardWriter, stored_shards
from opensora_vae.errors import run_main
from opensora_vae.metrics.evaluate import evaluate

from helpers import EXACT, ROOT, TINY, error_line, metrics, run_in_process, tiny_pipeline
from s3server import SECRET, s3_server

sys.path.insert(0, str(ROOT / "scripts"))
import encode_latents  # noqa: E402
import inference_vae  # noqa: E402

ENCODE = TINY / "latents.py"
INFERENCE = TINY / "inference.py"
CLIPS = ("carphone_pristine", "carphone_distorted", "bikes")
EXPECTED = ["0/5x32x32", "1/5x32x32", "2/5x32x32", "3/1x32x32"]  # three clips, then the image (one frame)


@pytest.fixture(scope="module")
def s3():
    with pytest.MonkeyPatch.context() as mp, s3_server(mp) as server:
        yield server


@pytest.fixture(scope="module")
def data(s3, sample_videos, tmp_path_factory):
    """s3://data: clips/, images/still.png and train.csv (rows relative to the CSV, one an absolute URL)."""
    local = tmp_path_factory.mktemp("s3data")
    Image.new("RGB", (50, 40), (200, 30, 30)).save(local / "still.png")
    fs = s3fs.S3FileSystem()
    fs.mkdir("data")
    for name in CLIPS:
        fs.put_file(str(sample_videos[name]), f"data/clips/{name}.mp4")
    fs.put_file(str(local / "still.png"), "data/images/still.png")
    rows = ["clips/carphone_pristine.mp4,a phone call", "clips/carphone_distorted.mp4,", "s3://data/clips/bikes.mp4,bikes",
            "images/still.png,a red still"]
    fs.pipe("data/train.csv", ("path,text\n" + "\n".join(rows) + "\n").encode())
    return "s3://data"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_pipeline(seed=2).save_pretrained(path)
    return path


def encode_args(ckpt, csv, save_dir):
    return [str(ENCODE), "--ckpt-path", str(ckpt), "--data-path", csv, "--save-dir", str(save_dir), "--cfg-options",
            "buckets=[(5,32,32)]", "shard_size_mb=0.001"]  # a shard per clip


def shard_keys(save_dir):
    return [r["key"] for shard in stored_shards(save_dir) for r in read_shard_records(shard)]


# ----- storage.py itself ----------------------------------------------------------------------------------------
def test_names_and_redaction():
    assert storage.redact("https://user:pw@host/a.mp4?X-Amz-Signature=abc&part=1") == \
        "https://***@host/a.mp4?X-Amz-Signature=***&part=1"
    assert storage.redact("/local/a.mp4") == "/local/a.mp4"
    assert storage.resolve("s3://b/sets", "../clips/x.mp4") == "s3://b/clips/x.mp4"
    assert storage.resolve("s3://b/sets", "gs://c/y.mp4") == "gs://c/y.mp4"
    assert storage.resolve("/data", "clips/x.mp4") == "/data/clips/x.mp4"
    assert storage.join("s3://b/out", "shards", "a") == "s3://b/out/shards/a"
    assert storage.dirname("s3://b/sets/train.csv") == "s3://b/sets" and storage.basename("s3://b/x.mp4") == "x.mp4"
    assert not storage.is_url("file:///tmp/x") and storage.is_url("hf://datasets/a/b")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_committed_is_complete_or_absent(where, s3, data, tmp_path):
    url = f"{data}/commit/x.bin" if where == "s3" else str(tmp_path / "commit" / "x.bin")
    with pytest.raises(RuntimeError, match="writer died"):
        with storage.committed(url) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            assert not storage.exists(url)  # nothing at the final name while it is written
            raise RuntimeError("writer died")
    assert not storage.exists(url)
    storage.write_bytes(url, b"whole")
    assert storage.read_bytes(url) == b"whole" and storage.listdir(storage.dirname(url)) == ["x.bin"]


def test_reads_ranges_with_a_bounded_read_ahead(s3, data, sample_videos, monkeypatch):
    """A video on S3 is read by byte ranges: the first frames fetch a small part of the file, a whole decode keeps
    at most MAX_BLOCKS blocks, and the frames are those of the local file."""
    monkeypatch.setattr(storage, "BLOCK_SIZE", 16 << 10)
    monkeypatch.setattr(storage, "MAX_BLOCKS", 4)
    url = f"{data}/clips/carphone_pristine.mp4"
    size = storage.info(url)[0]
    seen = []
    opened = storage.open_read

    def spy(path, *a, **k):
        f = opened(path, *a, **k)
        close = f.close

        def record():
            cache = f.cache
            seen.append((cache.total_requested_bytes, cache._fetch_block_cached.cache_info().currsize))
            close()
        f.close = record
        return f

    monkeypatch.setattr(storage, "open_read", spy)
    assert torch.equal(read_frames(url, [0, 1], seek=False), read_frames(sample_videos["carphone_pristine"], [0, 1],
                                                                          seek=False))
    fetched, _ = seen[-1]
    assert fetched < size / 4, (fetched, size)
    frames, _ = read_video(url)
    assert torch.equal(frames, read_video(sample_videos["carphone_pristine"])[0])
    fetched, held = seen[-1]
    assert fetched >= size and held <= 4, (fetched, held)


class _Unreachable(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        raise storage.StorageError("cannot read s3://data/x.mp4: the server does not answer")


def test_a_storage_error_in_a_loader_worker_stays_one_line():
    with pytest.raises(storage.StorageError) as err:
        next(iter(torch.utils.data.DataLoader(_Unreachable(), num_workers=1)))
    assert str(err.value) == "cannot read s3://data/x.mp4: the server does not answer"


# ----- jobs on S3 -----------------------------------------------------------------------------------------------
def test_train_three_steps_from_s3(data, tmp_path):
    run_dir, _ = run_in_process(TINY / "stage1.py", f"{data}/train.csv", tmp_path / "out",
                                **{**EXACT, "max_steps": 3, "ckpt_every": 0, "log_samples": True, "epochs": 1})
    records = metrics(run_dir)
    rows = [r for m in records for step in m.get("rows", {}).values() for r in step[0]]
    assert len([m for m in records if "loss" in m]) == 3 and len(rows) == 3 and set(rows) <= {0, 1, 2, 3}, records
    assert SECRET not in "".join(p.read_text(errors="ignore") for p in run_dir.rglob("*") if p.is_file()
                                 and p.suffix in (".py", ".json", ".jsonl"))


def test_outputs_on_a_url_refused_in_one_line(data, capsys):
    with pytest.raises(ConfigError, match="config key outputs='s3://data/runs'.*local or mounted folder"):
        load_config(TINY / "stage1.py", {"outputs": "s3://data/runs"}, job="train")
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_vae

    assert run_main(train_vae.main, [str(TINY / "stage1.py"), "--data-path", f"{data}/train.csv", "--outputs",
                                     "s3://data/runs"]) == 2
    assert "outputs='s3://data/runs'" in error_line(capsys)


def test_encode_to_s3_killed_then_resumed_stores_every_row_once(data, ckpt, tmp_path):
    save = f"{data}/latents"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "encode_killed_after_shards.py"), "2",
                           *encode_args(ckpt, f"{data}/train.csv", save)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    first = shard_keys(save)  # every shard listed is complete: its header parses
    assert len(first) == 2 and not storage.exists(f"{save}/index.parquet") and not storage.exists(f"{save}/index.csv")

    encode_latents.main(encode_args(ckpt, f"{data}/train.csv", save))
    keys = shard_keys(save)
    assert sorted(keys) == EXPECTED and set(first) <= set(keys)  # every row exactly once
    assert list(read_index(save)["key"]) == EXPECTED
    meta = json.loads(storage.read_text(f"{save}/meta.json"))
    assert meta["data_path"] == f"{data}/train.csv" and SECRET not in json.dumps(meta)
    ds = LatentDataset(save, normalize=False)
    item = ds[list(ds.index["key"]).index("2/5x32x32")]
    assert item["path"] == f"{data}/clips/bikes.mp4" and item["latent"].shape == (4, 2, 16, 16)


def test_inference_to_s3_then_evaluate_two_s3_folders(data, ckpt, tmp_path):
    inference_vae.main([str(INFERENCE), "--ckpt-path", str(ckpt), "--data-path", f"{data}/train.csv", "--save-dir",
                        f"{data}/recon", "--num-frames", "5", "--image-size", "32", "32"])
    names = ["bikes.mp4", "carphone_distorted.mp4", "carphone_pristine.mp4", "still.mp4"]
    for kind in ("ori", "rec", "spatial"):
        assert storage.listdir(f"{data}/recon_{kind}") == names
    kw = dict(metrics=["ssim", "psnr"], num_frames=5, resolution=None, crop_size=None, device="cpu", progress=False)
    remote = evaluate(f"{data}/recon_ori", f"{data}/recon_rec", **kw)
    fs = s3fs.S3FileSystem()
    for kind in ("ori", "rec"):
        fs.get(f"data/recon_{kind}/", str(tmp_path / kind), recursive=True)
    local = evaluate(tmp_path / "ori", tmp_path / "rec", **kw)
    assert remote["videos"] == local["videos"] == [n[:-4] for n in names]
    assert remote["metrics"] == local["metrics"]
    assert remote["config"]["real_video_dir"] == f"{data}/recon_ori"


# ----- failures: one line naming the URL, credentials never shown ---------------------------------------------
def _encode_error(capsys, ckpt, csv, save_dir) -> str:
    assert run_main(encode_latents.main, encode_args(ckpt, csv, save_dir)) != 0
    line = error_line(capsys)
    assert SECRET not in line and "testing" not in line
    return line


def test_missing_object_bucket_and_denied_access(data, ckpt, tmp_path, capsys):
    line = _encode_error(capsys, ckpt, f"{data}/nope.csv", tmp_path / "a")
    assert line == "error: dataset CSV s3://data/nope.csv does not exist"
    line = _encode_error(capsys, ckpt, "s3://no-such-bucket/train.csv", tmp_path / "b")
    assert "s3://no-such-bucket/train.csv" in line and "bucket no-such-bucket does not exist" in line
    line = _encode_error(capsys, ckpt, f"{data}/train.csv", "s3://no-such-bucket/latents")
    assert "s3://no-such-bucket/latents" in line and "bucket no-such-bucket does not exist" in line

    fs = s3fs.S3FileSystem()
    fs.mkdir("locked")
    fs.pipe("locked/train.csv", b"path\nclip.mp4\n")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
                                                       "Resource": "arn:aws:s3:::locked/*"}]}
    fs.call_s3("put_bucket_policy", Bucket="locked", Policy=json.dumps(policy))
    line = _encode_error(capsys, ckpt, "s3://locked/train.csv", tmp_path / "c")
    assert "s3://locked/train.csv" in line and "access denied" in line


def test_server_that_stops_answering_mid_job_loses_nothing(s3, data, ckpt, monkeypatch, capsys):
    save = f"{data}/latents-cut"
    flush = ShardWriter.flush

    def flush_then_stop(self):
        flush(self)
        if self.shards == 1:
            s3.stop()

    monkeypatch.setattr(ShardWriter, "flush", flush_then_stop)
    try:
        line = _encode_error(capsys, ckpt, f"{data}/train.csv", save)
    finally:
        s3.start()
    assert "s3://data/" in line and "the server does not answer" in line, line
    assert len(shard_keys(save)) == 1  # the shard written before the server went is there, whole

    monkeypatch.setattr(ShardWriter, "flush", flush)
    encode_latents.main(encode_args(ckpt, f"{data}/train.csv", save))
    assert sorted(shard_keys(save)) == EXPECTED
