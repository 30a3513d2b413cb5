"""What a stage leaves on disk, and how we know it is whole.

runs/<run>/<stage>/
    stage.json      manifest: status, config hash, input hashes, timings, metrics (written atomically)
    checkpoints/    checkpoint-N/ from the trainer; one counts only once it holds the COMPLETE marker
    final/          the stage's result (a PEFT adapter or a full model)
    metrics.jsonl   every logged metric, one JSON object per line
    round_N/        a stage that works in rounds (iterative_dpo) keeps each round whole in its own directory, with
                    its own checkpoints/ and final/; a round counts as finished once it holds round.json
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.lock import RunLock

COMPLETE_MARKER = "COMPLETE"
STATUSES = ("pending", "running", "completed", "failed", "interrupted")


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    # A crash mid-write must leave either the old file or the new one, never half of either.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:  # a full disk: the old file stays, and the half-written one does not hold its space
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


class DiskFullError(PipelineError):
    """A write failed because the filesystem is full; what was complete before it is untouched."""


def disk_full(exc: BaseException, path: Path) -> DiskFullError | None:
    """`exc` as a DiskFullError when a full disk under `path` caused it: ENOSPC or EDQUOT anywhere in its chain, or
    a write error (torch.save reports only "file write failed") on a filesystem with next to no space left."""
    import errno

    cause, seen = exc, 0
    while cause is not None and seen < 10:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            break
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    else:
        cause = None
    free = shutil.disk_usage(_existing(path)).free
    if cause is None and not ("writ" in str(exc).lower() and free < 1 << 20):
        return None
    what = f" writing {cause.filename}" if isinstance(cause, OSError) and cause.filename else ""
    return DiskFullError(f"no space left on the device holding {path} ({free} bytes free){what}: every complete "
                         "checkpoint, label and manifest is intact; free some space and run the same command again to "
                         "resume from the newest complete checkpoint")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def read_json(path: Path) -> dict | None:
    """A JSON object's content, or None where there is none (yet). Files written atomically are whole or absent, so
    anything else was changed by something other than the pipeline (a bad copy, a dying disk): said, not guessed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path} is damaged ({' '.join(str(exc).split())}); restore it, or move its stage aside "
                            "with `run --fresh`") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path} is damaged (a JSON {type(data).__name__}, not an object); restore it, or move "
                            "its stage aside with `run --fresh`")
    return data


def read_manifest(stage_dir: Path) -> dict | None:
    return read_json(stage_dir / "stage.json")


def write_manifest(stage_dir: Path, manifest: dict) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage_dir / "stage.json", manifest)


def record_progress(stage_dir: Path, metrics: dict) -> None:
    """Add metrics a running stage measured on the way to its manifest (the runner writes everything else)."""
    manifest = read_manifest(stage_dir) or {}
    manifest["metrics"] = {**manifest.get("metrics", {}), **metrics}
    write_manifest(stage_dir, manifest)


def completed(manifest: dict | None) -> bool:
    """Whether the stage a manifest belongs to has completed: the one test of it."""
    return bool(manifest) and manifest.get("status") == "completed"


def hash_config(section: dict) -> str:
    return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hash_path(path: Path) -> str:
    """Content hash of a file, or of every file under a directory (names included), in a stable order."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        name = str(file.relative_to(path) if path.is_dir() else file.name).encode()
        # Lengths first, so bytes cannot shift between one file's name or content and the next's.
        digest.update(f"{len(name)}:{file.stat().st_size}:".encode() + name)
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoints that finished saving, oldest first. Half-written ones (no marker) are never candidates."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if checkpoint_step(p) >= 0 and (p / COMPLETE_MARKER).exists()]
    return sorted(found, key=checkpoint_step)


ROUND_DONE = "round.json"


def round_dirs(stage_dir: Path) -> list[Path]:
    """A stage's round_N/ directories, in round order."""
    if not stage_dir.is_dir():
        return []
    found = [p for p in stage_dir.iterdir() if p.is_dir() and re.fullmatch(r"round_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def round_finished(round_dir: Path) -> bool:
    return (round_dir / ROUND_DONE).exists()


def current_checkpoints_dir(stage_dir: Path) -> Path:
    """Where a stage's newest progress is checkpointed: <stage>/checkpoints, or, for a stage that works in rounds,
    the checkpoints/ of its first unfinished round (finished rounds are never resumed into)."""
    unfinished = [d for d in round_dirs(stage_dir) if not round_finished(d)]
    return (unfinished[0] if unfinished else stage_dir) / "checkpoints"


def mark_complete(checkpoint: Path, step: int) -> None:
    """Write the COMPLETE marker, last: the step and every file of the checkpoint with its size, so a resume can
    tell a checkpoint that was whole when written from one damaged since (a bad copy, a dying disk)."""
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.name != COMPLETE_MARKER}
    write_json_atomic(checkpoint / COMPLETE_MARKER, {"step": step, "files": files})


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint whose marker is present, or None when every file it lists is there at the
    size it was written with. A marker from before markers listed files ("step N") cannot be checked: None."""
    raw = (checkpoint / COMPLETE_MARKER).read_bytes()
    if re.fullmatch(rb"(step |checkpoint-)\d+\n?", raw):
        return None
    try:
        files = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {COMPLETE_MARKER} marker is unreadable"
    problems = []
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} is {path.stat().st_size} bytes, {size} when written")
    if not problems:
        return None
    return "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")


def resumable_checkpoints(checkpoint_dir: Path) -> tuple[list[Path], dict[Path, str]]:
    """(complete checkpoints whose files are whole, oldest first; {damaged checkpoint: what is wrong})."""
    intact, damaged = [], {}
    for checkpoint in complete_checkpoints(checkpoint_dir):
        problem = checkpoint_damage(checkpoint)
        if problem is None:
            intact.append(checkpoint)
        else:
            damaged[checkpoint] = problem
    return intact, damaged


def incomplete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    if not checkpoint_dir.is_dir():
        return []
    return [p for p in checkpoint_dir.iterdir()
            if p.is_dir() and checkpoint_step(p) >= 0 and not (p / COMPLETE_MARKER).exists()]


def archive_stage_dir(stage_dir: Path) -> Path:
    """Move a stage's earlier results aside instead of deleting them: nothing a user produced is ever lost."""
    stamp = f"{stage_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    target = stage_dir.parent / ".history" / stamp
    suffix = 1
    while target.exists():  # two archives within one second must sit side by side, not one inside the other
        target, suffix = target.with_name(f"{stamp}-{suffix}"), suffix + 1
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(stage_dir), target)
    return target


def stage_status(run_dir: Path, name: str) -> dict:
    """A stage's manifest as `status` reports it: a 'running' stage whose run holds no lock was interrupted."""
    manifest = read_manifest(run_dir / name)
    if manifest is None:
        return {"status": "pending"}
    if manifest["status"] == "running" and not RunLock.is_held(run_dir):
        manifest["status"] = "interrupted"
    checkpoints, damaged = resumable_checkpoints(current_checkpoints_dir(run_dir / name))
    manifest["newest_checkpoint"] = checkpoint_name(run_dir / name, checkpoints[-1]) if checkpoints else None
    if damaged:
        manifest["damaged_checkpoints"] = {checkpoint_name(run_dir / name, path): problem
                                           for path, problem in damaged.items()}
    return manifest


def checkpoint_name(stage_dir: Path, checkpoint: Path) -> str:
    """checkpoint-N, or round_K/checkpoint-N for a stage that works in rounds."""
    parent = checkpoint.parent.parent
    return checkpoint.name if parent == stage_dir else f"{parent.name}/{checkpoint.name}"
