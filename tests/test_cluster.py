"""Training on a cluster: preemption signals, requeue with --load auto, no orphaned workers, elastic resume on
another number of ranks, run folders that never collide, checkpoint retention (2 gloo ranks, tiny configs)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opensora_vae.train.checkpoint import latest_checkpoint
from opensora_vae.signals import EXIT_PREEMPTED
from opensora_vae.train.runs import new_run_dir

from helpers import EXACT, ROOT, TINY, metrics, options, run_in_process, torchrun, torchrun_command, torchrun_env

# Image and video steps drawn at random, posterior noise: a resume must replay every random stream.
RANDOM = {**EXACT, "mixed_strategy": "mixed_video_image", "mixed_image_ratio": 0.5, "sample_posterior": True}


def start(nproc, csv, outputs, opts, *extra, log=None):
    cmd = torchrun_command(nproc, TINY / "stage1.py", "--data-path", csv, "--outputs", outputs, *extra,
                           "--cfg-options", *options(opts))
    return subprocess.Popen(cmd, env=torchrun_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_for_steps(outputs: Path, n: int, proc, timeout=120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        files = list(outputs.glob("*/metrics.jsonl"))
        if files and len(files[0].read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "the run ended before it was signalled"
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps logged in {timeout} s")


def children(pid: int):
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # zombies are dead
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_sigterm_to_the_agent_checkpoints_and_the_same_command_continues_exactly(tmp_path, clip_csv):
    opts = {**RANDOM, "max_steps": 24, "ckpt_every": 0}
    torchrun(2, TINY / "stage1.py", "--data-path", clip_csv, "--outputs", tmp_path / "full", "--load", "auto",
             "--cfg-options", *options(opts))
    out = tmp_path / "preempted"
    with open(tmp_path / "log.txt", "w") as log:
        proc = start(2, clip_csv, out, opts, "--load", "auto", log=log)
        wait_for_steps(out, 3, proc)
        proc.send_signal(signal.SIGTERM)  # what a scheduler does to the launcher
        rc = proc.wait(timeout=120)
    text = (tmp_path / "log.txt").read_text()
    assert rc != 0, text[-3000:]  # torchrun reports the stop as a failure, so schedulers requeue
    run_dir = next(out.iterdir())
    stopped_at = metrics(run_dir)[-1]["step"]
    assert 3 <= stopped_at < 24
    assert latest_checkpoint(run_dir).name.endswith(f"global_step{stopped_at}"), text[-3000:]
    assert "SIGTERM: checkpoint" in text and "after the signal" in text

    torchrun(2, TINY / "stage1.py", "--data-path", clip_csv, "--outputs", out, "--load", "auto",
             "--cfg-options", *options(opts))  # the identical command, requeued
    assert [p.name for p in out.iterdir()] == [run_dir.name]
    resumed, full = metrics(run_dir), metrics(next((tmp_path / "full").iterdir()))
    assert [r["step"] for r in resumed] == list(range(1, 25))
    for a, b in zip(full, resumed):
        assert (a["loss"], a["frames_per_rank"]) == (b["loss"], b["frames_per_rank"]), (a, b)


@pytest.mark.parametrize("target", ["one worker", "every process"])
def test_a_stop_signal_stops_every_rank_at_the_same_step(tmp_path, clip_csv, target):
    """SIGUSR1 to one worker (the others learn it through the step's all-reduce), or SIGTERM to the agent, the
    workers and their data-loading processes at once (how SLURM signals a job step)."""
    out = tmp_path / "out"
    opts = {**EXACT, "max_steps": 400, "ckpt_every": 0, "num_workers": 1}
    with open(tmp_path / "log.txt", "w") as log:
        proc = start(2, clip_csv, out, opts, log=log)
        wait_for_steps(out, 2, proc)
        workers = children(proc.pid)
        assert len(workers) == 2
        if target == "one worker":
            os.kill(workers[1], signal.SIGUSR1)
        else:
            for pid in [proc.pid] + workers + [c for w in workers for c in children(w)]:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:  # a DataLoader process that ended with its epoch
                    pass
        rc = proc.wait(timeout=120)
    text = (tmp_path / "log.txt").read_text()
    assert rc != 0, text[-3000:]
    if target == "one worker":
        assert f"exitcode  : {EXIT_PREEMPTED}" in text, text[-3000:]
    else:
        assert "SIGTERM: checkpoint" in text and "DataLoader worker" not in text, text[-3000:]
    run_dir = next(out.iterdir())
    steps = [r["step"] for r in metrics(run_dir)]
    assert latest_checkpoint(run_dir).name.endswith(f"global_step{steps[-1]}") and steps[-1] < 400
    state = json.loads((latest_checkpoint(run_dir) / "running_states.json").read_text())
    assert state["global_step"] == steps[-1] and len(list((latest_checkpoint(run_dir) / "rng").iterdir())) == 2


@pytest.mark.parametrize("victim", ["agent", "peer"])
def test_killing_the_agent_or_a_peer_leaves_no_worker_alive(tmp_path, clip_csv, victim):
    """kill -9 of torchrun's agent: its workers die at once (parent-death signal), their data-loading processes
    within about 5 s (they poll their parent). kill -9 of one worker: the other fails on its next collective and
    the agent ends the job. Bound asserted: everything gone within 30 s."""
    out = tmp_path / "out"
    opts = {**EXACT, "max_steps": 5000, "ckpt_every": 0, "num_workers": 1}
    proc = start(2, clip_csv, out, opts, log=subprocess.DEVNULL)
    try:
        wait_for_steps(out, 2, proc)
        workers = children(proc.pid)
        for _ in range(100):  # each epoch's DataLoader starts its own process: catch both ranks' at once
            family = workers + [c for w in workers for c in children(w)]
            if len(family) >= 4:
                break
            time.sleep(0.05)
        assert len(workers) == 2 and len(family) >= 3, family  # two ranks and their DataLoader processes
        killed = time.monotonic()
        os.kill(proc.pid if victim == "agent" else workers[1], signal.SIGKILL)
        proc.wait(timeout=60)
        while any(map(alive, family)) and time.monotonic() - killed < 30:
            time.sleep(0.1)
        assert not [p for p in family if alive(p)], "orphaned workers still running"
    finally:
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)


def rows_seen(run_dirs):
    seen = []
    for run_dir in run_dirs:
        for record in metrics(run_dir):
            seen += [row for per_rank in record["rows"].values() for rows in per_rank for row in rows]
    return seen


@pytest.fixture
def eight_rows(tmp_path, clip_csv):
    lines = clip_csv.read_text().splitlines()
    clip_csv.write_text("\n".join(lines + lines[1:]) + "\n")
    return clip_csv


def test_two_rank_checkpoint_resumes_on_one_rank_with_every_row_once(tmp_path, eight_rows, caplog):
    opts = {**EXACT, "ckpt_every": 0, "log_samples": True, "epochs": 1}
    torchrun(2, TINY / "stage1.py", "--data-path", eight_rows, "--outputs", tmp_path, "--cfg-options",
             *options({**opts, "max_steps": 2}))
    run_dir, _ = run_in_process(TINY / "stage1.py", eight_rows, tmp_path, load="auto", **opts)
    assert sorted(rows_seen([run_dir])) == list(range(8))  # 2 steps x 2 ranks, then 2 steps of 2 on one rank
    assert [len(r["rows"]["%d" % r["step"]][0]) for r in metrics(run_dir)] == [1, 1, 2, 2]
    assert "batch 1 -> 2 per rank, global batch 2 -> 2" in caplog.text


def test_one_rank_checkpoint_resumes_on_two_ranks_with_every_row_once(tmp_path, eight_rows):
    opts = {**EXACT, "ckpt_every": 0, "log_samples": True, "epochs": 1}
    run_dir, _ = run_in_process(TINY / "stage1.py", eight_rows, tmp_path, **{**opts, "max_steps": 2})
    proc = torchrun(2, TINY / "stage1.py", "--data-path", eight_rows, "--outputs", tmp_path, "--load", "auto",
                    "--cfg-options", *options(opts))
    assert sorted(rows_seen([run_dir])) == list(range(8))  # 2 rows, then 3 steps x 2 ranks
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5]
    assert "global batch 1 -> 2" in proc.stderr


def test_run_folders_never_collide_and_load_auto_continues_the_newest(tmp_path, clip_csv):
    (tmp_path / "000-stage1").mkdir()
    (tmp_path / "001-stage1").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "000-stage1").rmdir()
    assert new_run_dir(tmp_path, "stage1").name == "002-stage1"  # not the count of folders: 001 is taken
    assert new_run_dir(tmp_path, "other").name == "003-other"
    opts = {**EXACT, "ckpt_every": 2}
    # --load auto: the newest stage1 run (002) has no checkpoint, so a new run starts
    first, _ = run_in_process(TINY / "stage1.py", clip_csv, tmp_path, load="auto", max_steps=2, **opts)
    assert first.name == "004-stage1"
    again, saved = run_in_process(TINY / "stage1.py", clip_csv, tmp_path, load="auto", max_steps=4, **opts)
    assert again == first and saved.name.endswith("global_step4")
    assert [r["step"] for r in metrics(first)] == [1, 2, 3, 4]
    by_folder, _ = run_in_process(TINY / "stage1.py", clip_csv, tmp_path, load=str(first), max_steps=6, **opts)
    assert by_folder == first and latest_checkpoint(first).name.endswith("global_step6")


def test_keep_last_and_keep_every_leave_only_what_they_name(tmp_path, clip_csv):
    run_dir, _ = run_in_process(TINY / "stage1.py", clip_csv, tmp_path, **EXACT, max_steps=7, ckpt_every=1,
                                keep_last=2, keep_every=3)
    kept = sorted(int(p.name.rsplit("step", 1)[1]) for p in run_dir.iterdir() if "global_step" in p.name)
    assert kept == [3, 6, 7]
    run_dir, _ = run_in_process(TINY / "stage1.py", clip_csv, tmp_path / "b", **EXACT, max_steps=5, ckpt_every=1,
                                keep_last=2)
    assert sorted(p.name for p in run_dir.iterdir() if "global_step" in p.name) == [
        "epoch0-global_step4", "epoch1-global_step5"]
    with pytest.raises(ValueError, match="keep_last=0 is out of range"):
        run_in_process(TINY / "stage1.py", clip_csv, tmp_path, **EXACT, keep_last=0)


def test_a_second_signal_ends_at_once_and_a_forwarded_duplicate_does_not(tmp_path):
    script = """
import os, signal, time
from opensora_vae import signals
stop = signals.StopSignals(["SIGTERM"]).install()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # the agent's forward of a group-wide signal: the same request
time.sleep(0.05)
assert stop.name == "SIGTERM"
print("survived the duplicate", flush=True)
signals.DUPLICATE_S = 0.0
time.sleep(0.05)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("survived the second signal")
"""
    proc = subprocess.run([sys.executable, "-c", script], env=torchrun_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == "survived the duplicate" and proc.returncode == -signal.SIGTERM, proc.stderr


def test_a_save_on_a_full_disk_stops_with_the_cause_and_keeps_the_last_checkpoint(tmp_path, clip_csv, monkeypatch):
    import opensora_vae.train.checkpoint as ckpt
    from opensora_vae.models import VideoAutoencoderPipeline

    real_save = ckpt.torch.save

    def save(obj, f):  # the step-4 checkpoint meets the kernel's own ENOSPC (/dev/full refuses every write)
        target = getattr(f, "name", str(f))
        real_save(obj, open("/dev/full", "wb") if "global_step4" in str(target) else f)

    monkeypatch.setattr(ckpt.torch, "save", save)
    with pytest.raises(ckpt.CheckpointSaveError, match=r"epoch\d-global_step4 .*no space left on device.*"
                                                       r"global_step2, is intact"):
        run_in_process(TINY / "stage1.py", clip_csv, tmp_path, **EXACT, max_steps=4, ckpt_every=2)
    run_dir = tmp_path / "000-stage1"
    assert latest_checkpoint(run_dir).name == "epoch0-global_step2"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # the partial folder is gone
    VideoAutoencoderPipeline.from_pretrained(latest_checkpoint(run_dir))
