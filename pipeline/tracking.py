"""Experiment tracking: W&B and TensorBoard through the trainers' own integrations, plus the end-of-run table.

Each pipeline run is one W&B group and each stage one W&B run (job type = stage name). The W&B run id lives in the
stage's manifest, so a resumed stage appends to its own run instead of starting a new one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from rich.table import Table

from pipeline.config import TrackingConfig
from pipeline.log import console, is_main_process


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def configure(tracking: TrackingConfig, run_dir: Path, run_name: str, stage: str, run_id: str) -> None:
    """Set the environment the trainers' W&B integration reads (wandb itself honours WANDB_MODE for offline)."""
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir.resolve() / stage / "tensorboard")
    if "wandb" not in tracking.report_to:
        return
    os.environ.update(
        WANDB_PROJECT=tracking.project, WANDB_RUN_GROUP=run_name, WANDB_JOB_TYPE=stage, WANDB_RUN_ID=run_id,
        WANDB_RESUME="allow", WANDB_DIR=str(run_dir.resolve()), WANDB_NAME=f"{run_name}/{stage}",
    )


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("" if value is None else str(value))


def print_summary(manifests: list[dict]) -> None:
    if not is_main_process():
        return
    table = Table(title="pipeline run")
    for column in ("stage", "status", "time (s)", "steps", "train loss", "eval loss before → after", "resumed from"):
        table.add_column(column)
    for manifest in manifests:
        metrics = manifest.get("metrics", {})
        before, after = metrics.get("eval/loss_before"), metrics.get("eval/loss")
        table.add_row(
            manifest["stage"], manifest["status"], _fmt(manifest.get("duration_s"), 1), _fmt(metrics.get("train/steps")),
            _fmt(metrics.get("train/loss")), f"{_fmt(before)} → {_fmt(after)}" if after is not None else "",
            _fmt(manifest.get("resumed_from")),
        )
    console.print(table)
