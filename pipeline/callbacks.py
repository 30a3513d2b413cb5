"""Trainer callbacks every training stage gets: the checkpoint completion marker and the metrics file."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from pipeline.artifacts import COMPLETE_MARKER
from pipeline.distributed import is_main_process


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete. Trainer calls on_save once this process has written its files of the checkpoint;
    with several processes (DeepSpeed shards, per-process RNG states) the marker waits for all of them."""

    def on_save(self, args, state, control, **kwargs):
        if args.world_size > 1:
            args.distributed_state.wait_for_everyone()
        if is_main_process():
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                (path / COMPLETE_MARKER).write_text(f"step {state.global_step}\n")


class MetricsFile(TrainerCallback):
    """Appends every log event to metrics.jsonl, so metrics survive without any tracker."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if is_main_process() and logs:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")
