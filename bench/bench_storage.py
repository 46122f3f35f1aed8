"""The data loader reading the same clips from local files and from an S3 server on localhost, side by side:

  local  VideoTextDataset over a CSV of local copies of the bundled clips (one file per row)
  s3     the same CSV and clips in a bucket of moto's S3 server (`python -m moto.server`, its own process), read
         over HTTP through s3fs with range reads (opensora_vae/storage.py)

Each variant runs in a fresh process, alternating (local, s3, local, s3, ...), and prints clips/s through a
DataLoader (batch 1) and the process's peak RSS, from which the RSS after the imports is subtracted: the loader's
own peak. Prints the medians and the s3/local time ratio (target: within 1.5x).

python bench/bench_storage.py --rows 24 --frames 17 --size 256 --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import provenance  # bench/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)


def measure(csv: str, frames: int, size: int, workers: int) -> dict:
    """One variant in this process: clips/s over every row, and the peak RSS above the imports."""
    import torch
    from torch.utils.data import DataLoader

    from opensora_vae.data import VideoTextDataset

    torch.set_num_threads(1)
    base = _rss_mib()
    ds = VideoTextDataset(csv, num_frames=frames, image_size=(size, size))
    loader = DataLoader(ds, batch_size=1, num_workers=workers, shuffle=False)
    start = time.perf_counter()
    n = sum(batch["video"].shape[0] for batch in loader)
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else 0.0
    return {"clips": n, "clips_per_s": n / seconds, "peak_mib": max(_rss_mib(), children) - base,
            "skipped": len(ds.bad_rows)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(env: dict) -> subprocess.Popen:
    port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto.server did not start")


def _stage(folder: Path, rows: int, env: dict) -> tuple[str, str]:
    """rows copies of the bundled clips, locally and in s3://bench/; a CSV of relative paths in each place."""
    from opensora_vae.data.samples import INSTALL_HINT, sample_clips

    clips = sorted(sample_clips().values())
    if not clips:
        raise SystemExit(f"needs the sample clips: {INSTALL_HINT}")
    names = []
    for i in range(rows):
        src = clips[i % len(clips)]
        names.append(f"clips/{i:03d}-{src.name}")
        (folder / names[-1]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / names[-1])
    (folder / "data.csv").write_text("path\n" + "\n".join(names) + "\n")
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    fs.put(str(folder) + "/", "bench/", recursive=True)
    return str(folder / "data.csv"), "s3://bench/data.csv"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes")
    p.add_argument("--repeat", type=int, default=3, help="runs of each variant, alternating")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # a child: measure this CSV and print JSON
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.frames, args.size, args.workers)))
        return
    provenance("cpu", threads=1)
    env = dict(CREDENTIALS, AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}")
    server = _start_server(env)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            csvs = dict(zip(("local", "s3"), _stage(Path(tmp), args.rows, env)))
            runs = {name: [] for name in csvs}
            for _ in range(args.repeat):
                for name, csv in csvs.items():
                    cmd = [sys.executable, __file__, "--measure", csv, "--frames", str(args.frames), "--size",
                           str(args.size), "--workers", str(args.workers)]
                    out = subprocess.run(cmd, env=dict(os.environ, **env, OMP_NUM_THREADS="1"), capture_output=True,
                                         text=True, check=True).stdout
                    runs[name].append(json.loads(out.strip().splitlines()[-1]))
    finally:
        server.terminate()
        server.wait()
    print(f"{args.rows} rows of {args.frames}x{args.size}x{args.size} clips (bundled clips, 176x144 to 1280x720), "
          f"batch 1, {args.workers} DataLoader workers, {args.repeat} runs each (medians)")
    rate = {}
    for name, results in runs.items():
        assert all(r["skipped"] == 0 and r["clips"] == args.rows for r in results), results
        rate[name] = statistics.median(r["clips_per_s"] for r in results)
        peak = statistics.median(r["peak_mib"] for r in results)
        print(f"  {name:<6} {rate[name]:7.2f} clips/s   loader peak RSS +{peak:6.0f} MiB")
    print(f"  s3 / local time: {rate['local'] / rate['s3']:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
