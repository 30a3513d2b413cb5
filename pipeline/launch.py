"""Running a stage in several processes: `accelerate launch` starts them, DeepSpeed shards the work between them.

The runner stays one process: it decides, holds the run lock and writes the manifest. For a stage to train on
several processes (distributed.num_processes, num_machines, deepspeed) it writes the stage's context to
<stage>/launch.json and runs

    accelerate launch --num_processes ... [--use_deepspeed --deepspeed_config_file ...] -m pipeline.launch launch.json

Every process runs the same stage code; the trainers (and our PPO, through accelerate) split the batches, and only
the main process writes files. The main process leaves the stage's result in <stage>/launch_result.json for the
runner to record. On a multi-machine run the runner runs on machine 0, and for every stage it launches the other
machines run the `accelerate launch ... --machine_rank <rank> -m pipeline.launch <stage>/launch.json` command it
prints, or `python -m pipeline join` does it for them (pipeline/join.py; the run directory on a filesystem they all
share: DeepSpeed writes each process's checkpoint shard itself); <run-dir>/join.json, kept here, tells them which run
is in progress.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from pipeline import signals
from pipeline.artifacts import read_json, write_json_atomic
from pipeline.config import REGISTRY, DistributedConfig, RunConfig
from pipeline.context import ModelSource, StageContext, StageResult
from pipeline.distributed import is_main_process, start_process_group
from pipeline.errors import PipelineError
from pipeline.log import log

SPEC = "launch.json"
RESULT = "launch_result.json"
PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>
STATE = "join.json"  # in the run directory: the run in progress, for the machines that join it (pipeline/join.py)


def launches(config: RunConfig, stage: str) -> bool:
    """Whether `stage` trains in launched processes (Stage.launched). preferences runs in the runner's own process
    (sampling, and labelling by a person, a file, an API or a rule, have nothing to shard) and launches only its llm
    judge (stages/preferences.label_launched)."""
    return config.distributed.enabled and REGISTRY[stage].launched


@contextlib.contextmanager
def announced(run_dir: Path, config: RunConfig):
    """Around a runner's run: tell joining machines a run is in progress, then how it ended."""
    if config.distributed.num_machines <= 1:
        yield
        return
    run_id = uuid.uuid4().hex[:12]
    write_json_atomic(run_dir / STATE, {"run_id": run_id, "finished": False})
    ok = False
    try:
        yield
        ok = True
    finally:
        write_json_atomic(run_dir / STATE, {"run_id": run_id, "finished": True, "ok": ok})


def current_run_id(run_dir: Path) -> str | None:
    """The id launch.json files of this run carry, so a follower never joins a launch left by an earlier run."""
    state = read_json(run_dir / STATE)
    return state["run_id"] if state else None


def check_main_machine(config: RunConfig) -> None:
    """The runner (decisions, lock, manifests) runs on machine 0 only; the other machines run the launch command it
    prints for each stage."""
    dist = config.distributed
    if dist.machine_rank != 0:
        raise PipelineError(
            f"distributed.machine_rank is {dist.machine_rank}: run `python -m pipeline run` on machine 0 only, and "
            f"here `python -m pipeline join --run-dir <run-dir> --machine-rank {dist.machine_rank}`, which runs this "
            f"machine's part of every stage machine 0 launches"
        )


def accelerate_command(dist: DistributedConfig, spec: Path) -> list[str]:
    """The `accelerate launch` command line for one stage (the same flags README shows for launching by hand)."""
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--num_processes", str(dist.world_size), "--num_machines", str(dist.num_machines),
               "--machine_rank", str(dist.machine_rank), "--main_process_port", str(dist.main_process_port)]
    if dist.main_process_ip:
        command += ["--main_process_ip", dist.main_process_ip]
    if dist.deepspeed:
        command += ["--use_deepspeed", "--deepspeed_config_file", str(Path(dist.deepspeed).resolve())]
        if dist.num_machines > 1:  # torchrun on every machine, rather than DeepSpeed's own pdsh/ssh launcher
            command += ["--deepspeed_multinode_launcher", "standard"]
    elif dist.world_size > 1:
        command += ["--multi_gpu"]
    return [*command, "-m", "pipeline.launch", str(spec)]


def run_launched(ctx: StageContext, entry: str | None = None) -> StageResult | None:
    """Run ctx's stage (or `entry`, "module:function" taking the context) under accelerate launch and return the
    result its main process reported (None for an entry, which keeps what it makes in files)."""
    dist = ctx.config.distributed
    spec, result = ctx.stage_dir / SPEC, ctx.stage_dir / RESULT
    result.unlink(missing_ok=True)
    # launch_id tells a joining machine this launch from the stage's earlier ones; run_id, from the run in progress.
    write_json_atomic(spec, {**_context_to_dict(ctx), "launch_id": uuid.uuid4().hex[:12],
                             "run_id": current_run_id(ctx.run_dir), "entry": entry})
    command = accelerate_command(dist, spec)
    log(f"{ctx.name}: launching {dist.world_size} processes on {dist.num_machines} machine(s)"
        f"{' with DeepSpeed ' + dist.deepspeed if dist.deepspeed else ''}")
    if dist.num_machines > 1:
        other = " ".join(command[1:]).replace("--machine_rank 0", "--machine_rank <rank>")
        log(f"{ctx.name}: waiting for the other machines: `python -m pipeline join --run-dir {ctx.run_dir} "
            f"--machine-rank <rank>` there joins every stage; or, for this stage alone, run: python {other}",
            markup=False)
    # A Ctrl-C reaches the launcher too (same process group), and it stops its processes; if the runner is killed
    # outright, the launcher gets SIGTERM from the kernel and does the same.
    launcher = subprocess.Popen(command, preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    try:
        with signals.forwarding_to(launcher.pid):  # a first signal reaches its processes as SIGTERM
            returncode = launcher.wait()
    except BaseException:  # a second signal, or anything else here: take the launched processes down at once
        launcher.kill()
        launcher.wait()
        raise
    if returncode != 0 and signals.requested():
        raise signals.Interrupted(signals.requested(), f"{ctx.name}'s launched processes stopped for "
                                  f"{signals.name(signals.requested())} (exit code {returncode}); run the same command "
                                  "again to resume from the newest complete checkpoint")
    if returncode != 0:
        raise PipelineError(f"{ctx.name} failed in its launched processes (exit code {returncode}); their output "
                            f"is above. Run the same command again to resume from the newest complete checkpoint")
    if not result.exists():
        if dist.machine_rank != 0:
            return None  # machine 0 records the results
        raise PipelineError(f"{ctx.name}: the launched processes exited without writing {result}")
    reported = json.loads(result.read_text(encoding="utf-8"))
    return StageResult(**reported) if reported else None


def _context_to_dict(ctx: StageContext) -> dict:
    return {
        "stage": ctx.name, "config": str(ctx.run_dir / "config.yaml"), "stage_dir": str(ctx.stage_dir),
        "init": ctx.init.to_dict() if ctx.init else None, "run_name": ctx.run_name,
        "resume_from": str(ctx.resume_from) if ctx.resume_from else None,
        "data_from": str(ctx.data_from) if ctx.data_from else None, "run_dir": str(ctx.run_dir),
    }


def _context_from_dict(spec: dict, config: RunConfig) -> StageContext:
    init = spec["init"]
    source = (ModelSource(Path(init["base"]), Path(init["adapter"]) if init["adapter"] else None, init["description"])
              if init else None)
    return StageContext(spec["stage"], config, Path(spec["stage_dir"]), source, spec["run_name"],
                        Path(spec["resume_from"]) if spec["resume_from"] else None,
                        Path(spec["data_from"]) if spec["data_from"] else None, Path(spec["run_dir"]))


def die_with_parent(sig: int) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux; elsewhere a no-op). torchrun starts each
    process in a session of its own, so killing the runner's process group (preemption, the OOM killer) would leave
    them training on and writing into the run directory that the next run resumes from."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def worker(spec_path: Path) -> int:
    """One launched process: run the stage; the main process writes its result for the runner."""
    from pipeline.config import load_config
    from stages import STAGES

    die_with_parent(signal.SIGKILL)
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    config = load_config(spec["config"])
    ctx = _context_from_dict(spec, config)
    start_process_group()
    if spec.get("entry"):  # a part of a stage the runner runs, and tracks, itself
        module, function = spec["entry"].split(":")
        run = getattr(importlib.import_module(module), function)
    else:
        run = STAGES[ctx.name].run
        ctx.tracker.start()  # the stage's W&B run, on the main process, before its trainer looks for one
    try:
        with signals.graceful_stop():  # SIGTERM from the launcher: finish the step and checkpoint, in every process
            result = run(ctx)
    except signals.Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        ctx.tracker.finish()  # the runner reopens it for the results it adds (evaluation on the saved model)
    if is_main_process():
        write_json_atomic(ctx.stage_dir / RESULT, dataclasses.asdict(result) if result else {})
    return 0


if __name__ == "__main__":
    # The runner resolved (and, for Hub ids, fetched) the models and datasets before launching: the processes
    # read them from the cache, so several processes never download the same files at once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(worker(Path(sys.argv[1])))
