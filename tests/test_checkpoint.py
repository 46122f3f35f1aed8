"""Checkpoint durability and retention: failed saves (full disk, read-only, permission) name their cause and keep
the last good checkpoint, fsync comes before the rename, old checkpoints are pruned safely, `.old-NAME` is recovered."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from opensora_vae.errors import RunError, UserError
from opensora_vae.models import VideoAutoencoderPipeline
from opensora_vae.models.pretrained import load_state_dict_file
from opensora_vae.train import checkpoint as ckpt
from opensora_vae.train.checkpoint import (
    CheckpointSaveError,
    checkpoint_bytes,
    diagnose_save_error,
    free_space_warning,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)

from helpers import ROOT, tiny_pipeline

MiB, GiB = 2**20, 2**30
Usage = namedtuple("Usage", "total used free")
REAL_SAVE = torch.save


@pytest.fixture(scope="module")
def model():
    return tiny_pipeline(seed=3)


def optimizer_state():
    p = torch.nn.Parameter(torch.arange(4.0))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    return opt.state_dict()


def save(run_dir, step, model, epoch=0, marker=None):
    return save_checkpoint(run_dir, epoch, step, 0, model, {"logvar": torch.tensor(float(step))}, optimizer_state(),
                           {"epoch": epoch, "global_step": step, "marker": marker}, ckpt.rng_state({}))


def leftovers(run_dir, prefix):
    return sorted(p.name for p in Path(run_dir).iterdir() if p.name.startswith(prefix))


def assert_loads(path, model, step):
    state = load_checkpoint(path, 0)
    assert state["running_states"]["global_step"] == step
    assert float(state["loss"]["logvar"]) == float(step)
    assert state["optimizer"]["state"][0]["step"] == 1
    fresh = tiny_pipeline(seed=9)
    load_state_dict_file(fresh, str(state["model_dir"]))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    VideoAutoencoderPipeline.from_pretrained(path)


def fake_usage(free, total=100 * GiB):
    return lambda path: Usage(total, total - free, free)


# ----- failed saves -----------------------------------------------------------------------------------------
def test_full_disk_with_a_real_enospc_keeps_the_last_checkpoint(tmp_path, model, monkeypatch):
    run = tmp_path / "run"
    save(run, 1, model)
    good = save(run, 3, model)

    def to_dev_full(obj, f):  # the kernel's own ENOSPC: /dev/full refuses every write
        with open("/dev/full", "wb") as full:
            REAL_SAVE(obj, full)

    monkeypatch.setattr(ckpt.torch, "save", to_dev_full)
    with pytest.raises(CheckpointSaveError) as info:
        save(run, 6, model)
    monkeypatch.undo()
    msg = str(info.value)
    assert msg.startswith(f"could not save checkpoint epoch0-global_step6 in {run}: no space left on device (")
    assert msg.endswith(f"; the last complete checkpoint, {good}, is intact")
    assert "\n" not in msg and isinstance(info.value, RunError) and info.value.exit_code == 1
    assert info.value.cause.startswith("no space left on device") and info.value.last_complete == good
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert leftovers(run, ".") == [] and not (run / "epoch0-global_step6").exists()
    assert latest_checkpoint(run) == good
    assert_loads(good, model, 3)


@pytest.mark.parametrize("text", ["[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534",
                                  "basic_ios::clear: iostream error"])
def test_torch_runtime_error_on_a_full_disk_is_diagnosed_as_no_space(tmp_path, model, monkeypatch, text):
    run = tmp_path / "run"
    good = save(run, 3, model)

    def failing(obj, f):
        raise RuntimeError(text)  # what torch.save gives on a full disk: no errno

    monkeypatch.setattr(ckpt.torch, "save", failing)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", fake_usage(12 * MiB))
    with pytest.raises(CheckpointSaveError) as info:
        save(run, 6, model)
    monkeypatch.undo()
    assert str(info.value) == (f"could not save checkpoint epoch0-global_step6 in {run}: no space left on device "
                               f"(12 MiB free); the last complete checkpoint, {good}, is intact")
    assert leftovers(run, ".") == [] and latest_checkpoint(run) == good


def test_torch_path_writer_error_with_room_left_keeps_its_text(tmp_path, model, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(ckpt.torch, "save", lambda obj, f: REAL_SAVE(obj, "/dev/full"))  # torch's own RuntimeError
    with pytest.raises(CheckpointSaveError) as info:
        save(run, 2, model)
    assert "unexpected pos" in info.value.cause
    assert str(info.value).endswith(f"; there is no earlier complete checkpoint in {run}")
    assert leftovers(run, ".") == [] and latest_checkpoint(run) is None


class FailingModel:
    def __init__(self, err):
        self.err = err

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise self.err


@pytest.mark.parametrize("code, cause", [
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied on {file}"),
    (errno.EPERM, "permission denied on {file}"),
    (errno.EDQUOT, "disk quota exceeded"),
])
def test_read_only_permission_and_quota_errors_name_their_cause(tmp_path, model, code, cause):
    run = tmp_path / "run"
    good = save(run, 3, model)
    file = run / ".tmp-epoch0-global_step6" / "model" / "model.safetensors"
    with pytest.raises(CheckpointSaveError) as info:
        save(run, 6, FailingModel(OSError(code, os.strerror(code), str(file))))
    assert info.value.cause == cause.format(file=file)
    assert str(info.value) == (f"could not save checkpoint epoch0-global_step6 in {run}: {info.value.cause}; "
                               f"the last complete checkpoint, {good}, is intact")
    assert leftovers(run, ".") == [] and latest_checkpoint(run) == good


def test_a_bug_while_saving_is_raised_as_it_is_and_cleaned_up(tmp_path, model):
    run = tmp_path / "run"
    good = save(run, 3, model)
    with pytest.raises(TypeError, match="a bug"):
        save(run, 6, FailingModel(TypeError("a bug")))
    assert leftovers(run, ".") == [] and latest_checkpoint(run) == good


def test_failed_rename_over_an_existing_checkpoint_puts_it_back(tmp_path, model, monkeypatch):
    run = tmp_path / "run"
    save(run, 3, model, marker="first")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name == ".tmp-epoch0-global_step3":
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(CheckpointSaveError, match=r"\[Errno 5\] Input/output error; the last complete checkpoint"):
        save(run, 3, model, marker="second")
    monkeypatch.undo()
    assert leftovers(run, ".") == []
    assert load_checkpoint(run / "epoch0-global_step3", 0)["running_states"]["marker"] == "first"


def test_a_replaced_checkpoint_is_the_new_one(tmp_path, model):
    run = tmp_path / "run"
    save(run, 3, model, marker="first")
    save(run, 3, model, marker="second")
    assert leftovers(run, ".") == []
    assert load_checkpoint(latest_checkpoint(run), 0)["running_states"]["marker"] == "second"


# ----- the diagnosis on its own -----------------------------------------------------------------------------
class StatVfs:
    def __init__(self, flag):
        self.f_flag = flag


@pytest.fixture
def roomy_writable_fs(monkeypatch):
    """A file system with room, mounted read-write, writable; each test breaks one of these."""
    monkeypatch.setattr(ckpt.shutil, "disk_usage", fake_usage(50 * GiB))
    monkeypatch.setattr(ckpt.os, "statvfs", lambda path: StatVfs(0))
    monkeypatch.setattr(ckpt.os, "access", lambda path, mode: True)
    return monkeypatch


def test_diagnosis_from_errno(tmp_path, roomy_writable_fs):
    roomy_writable_fs.setattr(ckpt.shutil, "disk_usage", fake_usage(12 * MiB))
    assert diagnose_save_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path) == \
        "no space left on device (12 MiB free)"
    assert diagnose_save_error(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path) == "disk quota exceeded"
    assert diagnose_save_error(OSError(errno.EROFS, "Read-only file system"), tmp_path) == "read-only file system"
    assert diagnose_save_error(PermissionError(errno.EACCES, "Permission denied", "/x/y.pt"), tmp_path) == \
        "permission denied on /x/y.pt"
    # safetensors keeps the errno only in its text; a wrapped OSError is found through __cause__
    assert diagnose_save_error(Exception("I/O error: No space left on device (os error 28)"), tmp_path) == \
        "no space left on device (12 MiB free)"
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError as inner:
            raise RuntimeError("could not write") from inner
    except RuntimeError as outer:
        assert diagnose_save_error(outer, tmp_path) == "read-only file system"


def test_diagnosis_of_an_error_without_errno(tmp_path, roomy_writable_fs):
    err = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert diagnose_save_error(err, tmp_path) == "PytorchStreamWriter failed writing file data/0: file write failed"
    # a folder not yet made is judged by its nearest existing parent
    assert diagnose_save_error(err, tmp_path / "a" / "b") == err.args[0]
    roomy_writable_fs.setattr(ckpt.os, "access", lambda path, mode: False)
    assert diagnose_save_error(err, tmp_path / "a") == f"permission denied on {tmp_path}"
    roomy_writable_fs.setattr(ckpt.shutil, "disk_usage", fake_usage(3 * MiB))
    assert diagnose_save_error(err, tmp_path) == "no space left on device (3.0 MiB free)"
    roomy_writable_fs.setattr(ckpt.os, "statvfs", lambda path: StatVfs(os.ST_RDONLY))
    assert diagnose_save_error(err, tmp_path) == "read-only file system"


# ----- fsync before rename ----------------------------------------------------------------------------------
def test_every_file_and_the_folder_are_fsynced_before_the_rename(tmp_path, model, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    final = save(run, 4, model)
    monkeypatch.undo()
    run_real, tmp_real = os.path.realpath(run), os.path.realpath(run / ".tmp-epoch0-global_step4")
    rename = events.index(("replace", tmp_real, os.path.realpath(final)))
    before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    written = [os.path.join(tmp_real, os.path.relpath(os.path.join(root, name), final))
               for root, dirs, files in os.walk(final) for name in files + dirs]
    assert len(written) == 8  # model/{config.json,model.safetensors}, optimizer, loss, states, rng/rank0.pt, 2 dirs
    assert set(written) | {tmp_real} <= before
    assert ("fsync", run_real) in events[rename + 1:]


# ----- recovering .old-NAME ---------------------------------------------------------------------------------
def test_an_orphaned_old_checkpoint_is_recovered(tmp_path, model):
    run = tmp_path / "run"
    save(run, 3, model)
    os.rename(run / "epoch0-global_step3", run / ".old-epoch0-global_step3")  # killed between the two renames
    save(run, 1, model)
    partial = run / ".tmp-epoch0-global_step6"
    partial.mkdir()
    (partial / "running_states.json").write_text("{}")  # a .tmp- folder is never taken, whatever is in it
    incomplete = run / ".old-epoch0-global_step5"
    incomplete.mkdir()
    assert latest_checkpoint(run) == run / "epoch0-global_step3"
    assert leftovers(run, ".") == [".old-epoch0-global_step5", ".tmp-epoch0-global_step6"]
    assert_loads(run / "epoch0-global_step3", model, 3)


def test_old_recovery_tolerates_a_concurrent_rename(tmp_path, model, monkeypatch):
    run = tmp_path / "run"
    save(run, 3, model)
    os.rename(run / "epoch0-global_step3", run / ".old-epoch0-global_step3")
    real_rename = os.rename

    def raced(src, dst):
        real_rename(src, dst)  # another rank got there first ...
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(src))  # ... so ours finds nothing

    monkeypatch.setattr(ckpt.os, "rename", raced)
    assert latest_checkpoint(run) == run / "epoch0-global_step3"


def test_old_copy_beside_a_complete_checkpoint_is_left_to_prune(tmp_path, model):
    run = tmp_path / "run"
    save(run, 3, model, marker="new")
    save(run, 2, model)
    os.rename(run / "epoch0-global_step2", run / ".old-epoch0-global_step3")
    assert latest_checkpoint(run) == run / "epoch0-global_step3"
    assert load_checkpoint(run / "epoch0-global_step3", 0)["running_states"]["marker"] == "new"
    assert prune_checkpoints(run, keep_last=None) == [run / ".old-epoch0-global_step3"]
    assert leftovers(run, ".") == []


# ----- pruning ----------------------------------------------------------------------------------------------
def fake_checkpoints(run, steps, epoch=0):
    for s in steps:
        p = run / ckpt.checkpoint_name(epoch, s)
        (p / "model").mkdir(parents=True)
        (p / "model" / "model.safetensors").write_bytes(b"x" * 100)
        (p / ckpt.RUNNING_STATES).write_text(json.dumps({"global_step": s}))
    return [run / ckpt.checkpoint_name(epoch, s) for s in steps]


def names(run):
    return sorted((p.name for p in run.iterdir()), key=lambda n: (n[0] == ".", len(n), n))


def test_prune_keeps_exactly_the_newest_two(tmp_path):
    run = tmp_path / "run"
    paths = fake_checkpoints(run, [10, 2, 8, 4, 6])
    assert prune_checkpoints(run, keep_last=2) == [run / "epoch0-global_step2", run / "epoch0-global_step4",
                                                   run / "epoch0-global_step6"]
    assert names(run) == ["epoch0-global_step8", "epoch0-global_step10"]
    assert prune_checkpoints(run, keep_last=2) == []
    assert paths[0] == latest_checkpoint(run)


def test_prune_orders_by_step_not_by_name_or_epoch(tmp_path):
    run = tmp_path / "run"
    fake_checkpoints(run, [9], epoch=0)
    fake_checkpoints(run, [10, 100], epoch=1)
    assert prune_checkpoints(run, keep_last=1) == [run / "epoch0-global_step9", run / "epoch1-global_step10"]
    assert names(run) == ["epoch1-global_step100"]


def test_prune_keep_every_and_keep_last_one(tmp_path):
    run = tmp_path / "run"
    fake_checkpoints(run, [2, 4, 6, 8, 10])
    assert prune_checkpoints(run, keep_last=1, keep_every=4) == [run / "epoch0-global_step2",
                                                                 run / "epoch0-global_step6"]
    assert names(run) == ["epoch0-global_step4", "epoch0-global_step8", "epoch0-global_step10"]


def test_prune_removes_leftover_deletes_and_leaves_other_folders(tmp_path):
    run = tmp_path / "run"
    fake_checkpoints(run, [1, 2, 3])
    (run / ".del-epoch0-global_step0" / "model").mkdir(parents=True)  # a kill mid-delete
    (run / ".tmp-epoch0-global_step4").mkdir()  # not complete: not ours to judge here
    (run / "epoch0-global_step7").mkdir()  # no running states: not a complete checkpoint
    assert prune_checkpoints(run, keep_last=None) == [run / ".del-epoch0-global_step0"]
    assert names(run) == ["epoch0-global_step1", "epoch0-global_step2", "epoch0-global_step3",
                          "epoch0-global_step7", ".tmp-epoch0-global_step4"]
    assert prune_checkpoints(run, keep_last=1) == [run / "epoch0-global_step1", run / "epoch0-global_step2"]
    assert names(run) == ["epoch0-global_step3", "epoch0-global_step7", ".tmp-epoch0-global_step4"]


def test_a_kill_mid_delete_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    fake_checkpoints(run, [1, 2])
    real_rmtree = ckpt.shutil.rmtree

    def killed(path, *args, **kwargs):
        if Path(path).name.startswith(".del-") and Path(path).exists():
            os.remove(Path(path) / ckpt.RUNNING_STATES)  # half gone ...
            raise KeyboardInterrupt("killed while deleting")  # ... when the job is killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(run, keep_last=1)
    monkeypatch.undo()
    assert names(run) == ["epoch0-global_step2", ".del-epoch0-global_step1"]
    assert latest_checkpoint(run) == run / "epoch0-global_step2"
    assert prune_checkpoints(run, keep_last=1) == [run / ".del-epoch0-global_step1"]
    assert names(run) == ["epoch0-global_step2"]


def test_prune_never_deletes_the_newest_and_checks_keep_last(tmp_path):
    run = tmp_path / "run"
    fake_checkpoints(run, [5])
    assert prune_checkpoints(run, keep_last=1) == [] and names(run) == ["epoch0-global_step5"]
    assert prune_checkpoints(tmp_path / "missing", keep_last=1) == []
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(UserError, match="keep_last must be an integer >= 1"):
            prune_checkpoints(run, keep_last=bad)
    with pytest.raises(UserError, match="keep_every must be an integer >= 1"):
        prune_checkpoints(run, keep_last=1, keep_every=0)
    assert names(run) == ["epoch0-global_step5"]


# ----- sizes and free space ---------------------------------------------------------------------------------
def test_checkpoint_bytes_counts_what_is_on_disk(tmp_path, model):
    folder = tmp_path / "c"
    (folder / "rng").mkdir(parents=True)
    (folder / "a.pt").write_bytes(os.urandom(10_000))
    (folder / "rng" / "b.pt").write_bytes(os.urandom(5_000))
    assert 15_000 <= checkpoint_bytes(folder) <= 15_000 + 2 * 65_536
    assert checkpoint_bytes(tmp_path / "empty") == 0
    saved = save(tmp_path / "run", 1, model)
    weights = (saved / "model" / "model.safetensors").stat().st_size
    assert weights > 6 * MiB and weights <= checkpoint_bytes(saved) <= weights + MiB


def test_free_space_warning(tmp_path, monkeypatch):
    run = tmp_path / "run"  # not made yet: its parent's file system counts
    monkeypatch.setattr(ckpt.shutil, "disk_usage", fake_usage(5 * GiB))
    assert free_space_warning(run, 2 * GiB) is None
    assert free_space_warning(run, 0) is None
    monkeypatch.setattr(ckpt.shutil, "disk_usage", fake_usage(3 * GiB))
    assert free_space_warning(run, 2 * GiB) == (
        f"only 3.0 GiB free for checkpoints in {run}, and a checkpoint takes about 2.0 GiB: the save after next "
        f"may fail; set keep_last to delete old checkpoints, or free space")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", fake_usage(1536 * MiB))
    assert "only 1.5 GiB free" in free_space_warning(run, 4400 * MiB)
    assert "about 4.3 GiB: the next save will fail" in free_space_warning(run, 4400 * MiB)


# ----- two ranks: a failure on one never leaves the other waiting -------------------------------------------
RANK_SCRIPT = textwrap.dedent("""
    import errno, json, os, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from opensora_vae.train import checkpoint as ckpt

    class Model:
        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True)
            (Path(folder) / "config.json").write_text("{}")

    run, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    dist.init_process_group("gloo")
    args = (Model(), {"logvar": torch.zeros(())}, {"state": {}}, {"global_step": 0}, ckpt.rng_state({}))
    out = {"first": str(ckpt.save_checkpoint(run, 0, 2, rank, *args))}
    if rank == 1:  # only this rank's disk refuses
        def refuse(obj, f):
            raise OSError(errno.EACCES, "Permission denied", "rank1.pt")
        torch.save = refuse
    try:
        ckpt.save_checkpoint(run, 0, 4, rank, *args)
    except ckpt.CheckpointSaveError as err:
        out["error"] = str(err)
    print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()
""")


def test_a_failure_on_one_rank_stops_every_rank(tmp_path):
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(run)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung after another failed to save")
        assert p.returncode == 0, err
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    good = run / "epoch0-global_step2"
    want = (f"could not save checkpoint epoch0-global_step4 in {run}: rank 1: permission denied on rank1.pt; "
            f"the last complete checkpoint, {good}, is intact")
    assert [r["error"] for r in results] == [want, want]
    assert sorted(os.listdir(good / "rng")) == ["rank0.pt", "rank1.pt"]
    assert sorted(os.listdir(run)) == ["epoch0-global_step2"]
