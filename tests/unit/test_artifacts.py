"""On-disk artifacts: checkpoints count only when complete, writes are atomic, nothing is deleted, one run at a time."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from pipeline.artifacts import (
    COMPLETE_MARKER, ROUND_DONE, archive_stage_dir, checkpoint_step, complete_checkpoints, current_checkpoints_dir,
    hash_config, hash_path, incomplete_checkpoints, read_manifest, write_json_atomic, write_manifest,
)
from pipeline.errors import PipelineError
from pipeline.lock import RunLock
from pipeline.artifacts import stage_status


def make_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        (path / COMPLETE_MARKER).write_text(f"step {step}\n")
    return path


# ---------------------------------------------------------------------------- checkpoints

def test_complete_checkpoints_ignores_unmarked_and_sorts_numerically(tmp_path):
    for step in (9, 10, 2, 100):
        make_checkpoint(tmp_path, step)
    half = make_checkpoint(tmp_path, 200, complete=False)
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / ".history").mkdir()
    (tmp_path / "checkpoint-300").write_text("a file, not a checkpoint")
    names = [p.name for p in complete_checkpoints(tmp_path)]
    assert names == ["checkpoint-2", "checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert [p for p in incomplete_checkpoints(tmp_path) if p.is_dir()] == [half]


def test_checkpoints_of_missing_dir(tmp_path):
    assert complete_checkpoints(tmp_path / "nope") == []
    assert incomplete_checkpoints(tmp_path / "nope") == []


def test_checkpoint_step():
    assert checkpoint_step(Path("checkpoint-10")) == 10
    assert checkpoint_step(Path("a/checkpoint-0")) == 0
    assert checkpoint_step(Path("checkpoint-10.tmp")) == -1
    assert checkpoint_step(Path("final")) == -1


# ---------------------------------------------------------------------------- atomic json and manifests

def test_write_json_atomic_leaves_no_temp_file(tmp_path):
    path = tmp_path / "stage.json"
    write_json_atomic(path, {"b": 1, "a": Path("/x")})
    write_json_atomic(path, {"status": "completed"})  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["stage.json"]
    assert json.loads(path.read_text()) == {"status": "completed"}


def test_write_json_atomic_failure_keeps_old_file(tmp_path):
    path = tmp_path / "stage.json"
    write_json_atomic(path, {"status": "running"})

    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"status": "completed", "bad": Unprintable()})
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["stage.json"]


def test_manifest_round_trip(tmp_path):
    stage_dir = tmp_path / "run" / "sft"
    assert read_manifest(stage_dir) is None
    write_manifest(stage_dir, {"status": "running", "attempts": 1})
    assert read_manifest(stage_dir) == {"status": "running", "attempts": 1}


def test_hash_config_is_order_independent():
    assert hash_config({"a": 1, "b": [1, 2]}) == hash_config({"b": [1, 2], "a": 1})
    assert hash_config({"a": 1}) != hash_config({"a": 2})


# ---------------------------------------------------------------------------- hashing

def test_hash_path_changes_when_a_file_in_a_dir_changes(tmp_path):
    root = tmp_path / "final"
    (root / "sub").mkdir(parents=True)
    (root / "adapter.safetensors").write_bytes(b"\x00" * 100)
    (root / "sub" / "config.json").write_text('{"r": 8}')
    before = hash_path(root)
    assert hash_path(root) == before  # stable

    (root / "sub" / "config.json").write_text('{"r": 16}')
    changed = hash_path(root)
    assert changed != before

    (root / "sub" / "config.json").write_text('{"r": 8}')
    assert hash_path(root) == before  # content, not mtime

    (root / "sub" / "config.json").rename(root / "sub" / "other.json")
    assert hash_path(root) != before  # names count

    (root / "extra").write_text("")
    assert hash_path(root) not in (before, changed)  # a new (even empty) file counts


def test_hash_path_of_a_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("one\n")
    first = hash_path(path)
    path.write_text("two\n")
    assert hash_path(path) != first


def test_hash_path_separates_names_from_contents(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "a").write_text("1")
    (one / "b").write_text("2")
    (two / "a").write_text("1b2")  # "a" + "1" + "b" + "2" == "a" + "1b2"
    assert hash_path(one) != hash_path(two)


# ---------------------------------------------------------------------------- archiving

def test_archive_stage_dir_moves_to_history(tmp_path):
    stage_dir = tmp_path / "run" / "sft"
    make_checkpoint(stage_dir / "checkpoints", 4)
    (stage_dir / "stage.json").write_text("{}")
    target = archive_stage_dir(stage_dir)
    assert not stage_dir.exists()
    assert target.parent == tmp_path / "run" / ".history"
    assert target.name.startswith("sft-")
    assert (target / "stage.json").read_text() == "{}"
    assert (target / "checkpoints" / "checkpoint-4" / COMPLETE_MARKER).exists()


def test_archive_twice_in_the_same_second(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.artifacts.time.strftime", lambda fmt, *args: "20250101-120000")  # same second
    stage_dir = tmp_path / "run" / "sft"
    targets = []
    for attempt in range(2):
        stage_dir.mkdir(parents=True)
        (stage_dir / "stage.json").write_text(str(attempt))
        targets.append(archive_stage_dir(stage_dir))
    assert targets[0] != targets[1]
    assert all(t.parent == tmp_path / "run" / ".history" for t in targets)
    assert [(t / "stage.json").read_text() for t in targets] == ["0", "1"]


# ---------------------------------------------------------------------------- run lock

def _hold_lock(run_dir: str, ready) -> None:
    """Child process: take the run lock, say so, and hold it until killed."""
    lock = RunLock(Path(run_dir)).__enter__()
    ready.set()
    time.sleep(120)
    lock.__exit__(None, None, None)


@pytest.fixture
def lock_holder(tmp_path):
    """A second process holding the real RunLock on tmp_path/run (forked: no 10 s re-import of the pipeline)."""
    run_dir = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(run_dir), ready), daemon=True)
    proc.start()
    try:
        assert ready.wait(30), "the child process never took the lock"
        yield run_dir, proc
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


def test_run_lock_refuses_a_second_holder(lock_holder):
    run_dir, proc = lock_holder
    assert RunLock.is_held(run_dir)
    with pytest.raises(PipelineError) as info:
        with RunLock(run_dir):
            pass
    assert f"pid {proc.pid}" in str(info.value)  # names the holder
    assert str(run_dir) in str(info.value)
    assert RunLock.is_held(run_dir)  # a refused attempt does not disturb the holder

    proc.kill()  # the OS releases the lock of a dead holder
    proc.join(10)
    assert not RunLock.is_held(run_dir)
    with RunLock(run_dir):
        assert RunLock.is_held(run_dir)
    assert not RunLock.is_held(run_dir)


def test_running_stage_without_lock_reads_as_interrupted(lock_holder):
    run_dir, proc = lock_holder
    write_manifest(run_dir / "sft", {"status": "running"})
    make_checkpoint(run_dir / "sft" / "checkpoints", 3)
    make_checkpoint(run_dir / "sft" / "checkpoints", 5, complete=False)
    status = stage_status(run_dir, "sft")
    assert status["status"] == "running" and status["newest_checkpoint"] == "checkpoint-3"
    proc.kill()
    proc.join(10)
    assert stage_status(run_dir, "sft")["status"] == "interrupted"
    assert stage_status(run_dir, "cpt") == {"status": "pending"}


def test_run_lock_in_process(tmp_path):
    run_dir = tmp_path / "fresh" / "run"
    assert not RunLock.is_held(run_dir)  # no lock file yet
    with RunLock(run_dir) as lock:
        assert lock.path == run_dir / ".lock"
        assert lock.path.read_text().startswith("pid ")
        with pytest.raises(PipelineError, match="is in use by pid"):
            with RunLock(run_dir):
                pass
    with RunLock(run_dir):  # released on exit, reusable
        pass


def test_a_stage_in_rounds_resumes_its_first_unfinished_round(tmp_path):
    """round_2's checkpoints are the ones to resume while round_1 is finished; a finished round is never resumed."""
    stage = tmp_path / "iterative_dpo"
    assert current_checkpoints_dir(stage) == stage / "checkpoints"
    make_checkpoint(stage / "round_1" / "checkpoints", 2)
    (stage / "round_1" / ROUND_DONE).write_text("{}")
    make_checkpoint(stage / "round_10" / "checkpoints", 1)  # rounds sort by number, not by name
    make_checkpoint(stage / "round_2" / "checkpoints", 1)
    assert current_checkpoints_dir(stage) == stage / "round_2" / "checkpoints"
    write_manifest(stage, {"status": "interrupted"})
    assert stage_status(tmp_path, "iterative_dpo")["newest_checkpoint"] == "round_2/checkpoint-1"
    (stage / "round_2" / ROUND_DONE).write_text("{}")
    (stage / "round_10" / ROUND_DONE).write_text("{}")
    assert current_checkpoints_dir(stage) == stage / "checkpoints"


# ---------------------------------------------------------------------------- damaged checkpoints, a full disk

def test_a_marked_checkpoint_is_checked_against_the_files_its_marker_lists(tmp_path):
    from pipeline.artifacts import checkpoint_damage, mark_complete, resumable_checkpoints

    good, truncated, missing, unreadable = (make_checkpoint(tmp_path, step, complete=False) for step in (2, 4, 6, 8))
    for path in (good, truncated, missing, unreadable):
        (path / "optimizer.pt").write_bytes(b"x" * 100)
        mark_complete(path, checkpoint_step(path))
    assert json.loads((good / COMPLETE_MARKER).read_text()) == {
        "step": 2, "files": {"model.safetensors": 7, "optimizer.pt": 100}}
    (truncated / "optimizer.pt").write_bytes(b"x" * 40)
    (missing / "model.safetensors").unlink()
    (unreadable / COMPLETE_MARKER).write_text('{"step": 8, "fi')
    legacy = make_checkpoint(tmp_path, 10)  # a marker from before markers listed files: cannot be checked
    assert checkpoint_damage(good) is None and checkpoint_damage(legacy) is None
    assert checkpoint_damage(truncated) == "optimizer.pt is 40 bytes, 100 when written"
    assert checkpoint_damage(missing) == "model.safetensors is missing"
    assert checkpoint_damage(unreadable) == "its COMPLETE marker is unreadable"
    intact, damaged = resumable_checkpoints(tmp_path)
    assert intact == [good, legacy] and set(damaged) == {truncated, missing, unreadable}


def test_a_full_disk_keeps_the_old_manifest_and_no_half_file(tmp_path, monkeypatch):
    import errno
    import os

    write_manifest(tmp_path, {"status": "running", "step": 2})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_manifest(tmp_path, {"status": "failed"})
    assert read_manifest(tmp_path) == {"status": "running", "step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage.json"]


def test_a_full_disk_loses_no_label_given_before_it(tmp_path, monkeypatch):
    """ENOSPC simulated on the label's write (fsync), as a tmpfs in a user namespace is not available everywhere;
    the checkpoint case runs on a real tmpfs in tests/integration/test_faults.py."""
    import errno
    import os

    from reward.pairs import Label, LabelStore

    path = tmp_path / "labels" / "judge.jsonl"
    with LabelStore(path) as store:
        store.add(Label("p1", "a", "judge"))
        store.add(Label("p2", "b", "judge"))
        real_fsync = os.fsync

        def full(fd):
            os.ftruncate(fd, os.fstat(fd).st_size - 5)  # what a disk that filled mid-line leaves: a torn line
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(OSError):
            store.add(Label("p3", "tie", "judge"))
        monkeypatch.setattr(os, "fsync", real_fsync)
    reread = LabelStore(path)
    assert [label.pair_id for label in reread.labels()] == ["p1", "p2"]
    reread.add(Label("p3", "tie", "judge"))  # the torn line is cut, the label given again on its own line
    assert [label.pair_id for label in LabelStore(path).labels()] == ["p1", "p2", "p3"]


def test_disk_full_is_recognised_in_the_exception_chain_or_by_a_write_error_on_a_full_disk(tmp_path, monkeypatch):
    import errno
    import shutil

    from pipeline.artifacts import DiskFullError, disk_full

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "optimizer.pt"))
        except OSError as exc:
            raise RuntimeError("saving failed") from exc
    except RuntimeError as exc:
        found = disk_full(exc, tmp_path / "run")
    assert isinstance(found, DiskFullError) and "optimizer.pt" in str(found)
    assert disk_full(ValueError("bad value"), tmp_path) is None
    torch_style = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert disk_full(torch_style, tmp_path) is None  # plenty of space: not a full disk
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    assert isinstance(disk_full(torch_style, tmp_path), DiskFullError)
