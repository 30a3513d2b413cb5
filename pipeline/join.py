"""`python -m pipeline join`: the other machines' side of a multi-machine run.

The runner runs on machine 0 only (decisions, lock, manifests). When distributed.num_machines > 1 it keeps
<run-dir>/join.json up to date — the id of the run in progress and, at the end, whether it succeeded — and every
<stage>/launch.json it writes carries that id. On each other machine, with the run directory on a filesystem they
share and from the same project directory,

    python -m pipeline join --run-dir runs/my-run --machine-rank 1

waits for machine 0 to start a run, runs the `accelerate launch --machine_rank 1 ...` of every stage machine 0
launches, and exits with machine 0's result. If machine 0 is preempted and started again, the follower keeps waiting
and follows the new run, so it can be left running for the whole job.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path

from pipeline.artifacts import read_json, read_manifest
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.launch import STATE, accelerate_command
from pipeline.log import log

POLL_S = 0.5


def follow(run_dir: Path, machine_rank: int, timeout_s: float | None = None) -> int:
    """Join every launch of machine 0's run until it ends; its exit status (0 when it succeeded)."""
    if machine_rank < 1:
        raise PipelineError("join runs on the other machines: --machine-rank must be 1 or more (machine 0 runs "
                            "`python -m pipeline run`)")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    log(f"waiting for machine 0 to start a run in {run_dir}")
    run_id, joined = None, set()
    while deadline is None or time.monotonic() < deadline:
        state = read_json(run_dir / STATE)
        if state is None or (state["finished"] and state["run_id"] != run_id):
            time.sleep(POLL_S)  # no run yet, or only an earlier one that has ended
            continue
        if state["run_id"] != run_id:
            run_id = state["run_id"]
            log(f"following run {run_id} as machine {machine_rank}")
        for spec_path, spec in _pending_launches(run_dir, run_id, joined):
            joined.add(spec["launch_id"])
            config = load_config(spec["config"])
            dist = dataclasses.replace(config.distributed, machine_rank=machine_rank)
            _check_machines(dist, machine_rank, spec_path)
            log(f"{spec['stage']}: joining as machine {machine_rank} of {dist.num_machines}")
            returncode = subprocess.run(accelerate_command(dist, spec_path), check=False).returncode
            if returncode != 0:  # machine 0 reports the failure and decides; a re-run there is followed here too
                log(f"{spec['stage']}: this machine's processes exited with {returncode}; still following")
        if state["finished"]:
            log(f"machine 0's run {'completed' if state['ok'] else 'failed'}")
            return 0 if state["ok"] else 1
        time.sleep(POLL_S)
    raise PipelineError(f"join: no run in {run_dir} finished within {timeout_s:g} s")


def _pending_launches(run_dir: Path, run_id: str, joined: set):
    """This run's launches not joined yet whose stage is still running on machine 0 (one it finished or gave up on
    needs no one: joining it would wait for a rendezvous that never comes)."""
    for spec_path in sorted(run_dir.glob("*/launch.json"), key=lambda p: p.stat().st_mtime):
        spec = read_json(spec_path)
        if spec is None or spec.get("run_id") != run_id or spec["launch_id"] in joined:
            continue
        if (read_manifest(spec_path.parent) or {}).get("status") == "running":
            yield spec_path, spec


def _check_machines(dist, machine_rank: int, spec_path: Path) -> None:
    if machine_rank >= dist.num_machines:
        raise PipelineError(f"{spec_path}: the run has distributed.num_machines={dist.num_machines}, so "
                            f"--machine-rank must be below {dist.num_machines}")
