"""Trainer callbacks every training stage gets: the checkpoint completion marker, the metrics file, and the guard
that stops a stage whose training diverged."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from pipeline.artifacts import mark_complete
from pipeline.distributed import is_main_process
from pipeline.finite import check_step, check_weights, is_finite, total_norm
from pipeline.signals import stop_requested


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete. Trainer calls on_save once this process has written its files of the checkpoint;
    with several processes (DeepSpeed shards, per-process RNG states) the marker waits for all of them."""

    def on_save(self, args, state, control, **kwargs):
        if args.world_size > 1:
            args.distributed_state.wait_for_everyone()
        if is_main_process():
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                mark_complete(path, state.global_step)


class MetricsFile(TrainerCallback):
    """Appends every log event to metrics.jsonl, so metrics survive without any tracker."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if is_main_process() and logs:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")


class NonFiniteGuard(TrainerCallback):
    """Stops training at the step whose loss, gradient norm or weights turn NaN or Inf (pipeline.finite), before a
    checkpoint of it is written: the gradients before the optimiser step, the trainable weights after it, and the
    logged loss and gradient norm (the one check that also sees DeepSpeed's sharded gradients; transformers' own
    logging_nan_inf_filter would hide a NaN loss there, so the stages turn that filter off)."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if any(not is_finite(grad) for grad in grads):
            check_step(self.stage, state.global_step + 1, grad_norm=total_norm(grads))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        check_weights(self.stage, state.global_step + 1,
                      ((name, p) for name, p in model.named_parameters() if p.requires_grad))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        check_step(self.stage, state.global_step, logs.get("loss"), logs.get("grad_norm"))


class StopOnSignal(TrainerCallback):
    """At the end of each step, if a signal asked the run to stop (pipeline.signals, agreed by every process): save
    a checkpoint of this step and end training. The stage then raises Interrupted instead of saving final/."""

    def __init__(self):
        self.stopped = None  # (signal, step) once it has stopped training

    def on_step_end(self, args, state, control, **kwargs):
        signum = stop_requested()
        if signum is not None:
            control.should_save = control.should_training_stop = True
            self.stopped = (signum, state.global_step)
