"""Stopping for a preemption: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (what SLURM sends ahead of one).

The first signal asks the running stage to stop at the end of its current step: the training stages then write a
complete checkpoint of that step and raise `Interrupted`; the runner marks the stage interrupted and `run` exits
with 128 + the signal's number (130 SIGINT, 138 SIGUSR1, 143 SIGTERM). A second signal stops at once (`StopNow`,
the same exit code): whatever checkpoint was being written has no COMPLETE marker, so no resume picks it.
Re-running the same command resumes from the checkpoint the first signal wrote.

With several processes every one must stop after the same step (a checkpoint is a collective), so the stages ask
`stop_requested()`, which agrees across the processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from pipeline.errors import PipelineError
from pipeline.log import warn

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_requested: int | None = None
_forward_to: set[int] = set()  # child process ids (the accelerate launcher) that get the first signal as SIGTERM


class Interrupted(PipelineError):
    """The stage stopped for a signal after a complete checkpoint; resume continues from it."""

    status = "interrupted"

    def __init__(self, signum: int, message: str):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(message)


class StopNow(KeyboardInterrupt):
    """A second signal: stop at once (a KeyboardInterrupt, so no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(signal.Signals(signum).name)


def name(signum: int) -> str:
    return signal.Signals(signum).name


def requested() -> int | None:
    """The signal that asked this process to stop, if one did."""
    return _requested


def _handle(signum, frame) -> None:
    global _requested
    if _requested is not None:
        raise StopNow(signum)
    _requested = signum
    for pid in list(_forward_to):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # the launcher hands SIGTERM to its processes (SIGUSR1 would kill it)
    warn(f"{name(signum)}: finishing the current step, then saving a checkpoint and stopping; "
         f"send it again to stop at once")


@contextlib.contextmanager
def graceful_stop():
    """Within: the first of SIGNALS asks for a stop at the end of the step, the second stops at once."""
    global _requested
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    previous = {signum: signal.signal(signum, _handle) for signum in SIGNALS}
    _requested = None
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requested = None


@contextlib.contextmanager
def forwarding_to(pid: int):
    """Hand the first signal on to child process `pid` (as SIGTERM) while it runs."""
    _forward_to.add(pid)
    try:
        if _requested is not None:  # it came while the child was starting
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        yield
    finally:
        _forward_to.discard(pid)


def stop_requested() -> int | None:
    """The signal to stop for, agreed by every process of the run (the largest number any received), or None. Call
    it at the same point of the same step in every process: with several it is a collective."""
    import torch.distributed as dist

    signum = _requested or 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import torch
        from accelerate import PartialState

        flag = torch.tensor([signum], device=PartialState().device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
    return signum or None
