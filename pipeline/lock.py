"""The run directory's lock: one writer at a time (a pipeline run, or a person labelling), released by the OS
when its holder dies. Kept free of heavy imports so `label` and `status` start at once."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from pipeline.errors import PipelineError


class RunLock:
    """An exclusive lock on a run directory, released by the OS if the holder dies (so a kill never wedges it)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.handle = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        # `status` probes the lock for an instant; a few retries keep that probe from turning a run away.
        for attempt in range(10):
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 9:
                    self.handle.seek(0)
                    holder = self.handle.read().strip() or "another process"
                    self.handle.close()
                    raise PipelineError(
                        f"{self.path.parent} is in use by {holder}; wait for it or use another --run-dir"
                    ) from None
                time.sleep(0.1)
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.handle.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()

    @staticmethod
    def is_held(run_dir: Path) -> bool:
        path = run_dir / ".lock"
        if not path.exists():
            return False
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
