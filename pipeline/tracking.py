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


def finish() -> None:
    """End the stage's W&B run: wandb keeps one run per process, and the next stage must start its own."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("" if value is None else str(value))


def print_summary(manifests: list[dict]) -> None:
    if not is_main_process():
        return
    table = Table(title="pipeline run")
    for column in ("stage", "status", "time (s)", "steps", "train loss", "headline", "resumed from"):
        table.add_column(column)
    for manifest in manifests:
        metrics = manifest.get("metrics", {})
        table.add_row(
            manifest["stage"], manifest["status"], _fmt(manifest.get("duration_s"), 1), _fmt(metrics.get("train/steps")),
            _fmt(metrics.get("train/loss")), headline(metrics), _fmt(manifest.get("resumed_from")),
        )
    console.print(table)


def headline(metrics: dict) -> str:
    """The number a user looks at first for each kind of stage."""
    parts = []
    if metrics.get("eval/loss") is not None:
        parts.append(f"eval loss {_fmt(metrics.get('eval/loss_before'))} → {_fmt(metrics['eval/loss'])}")
    if metrics.get("preferences/rows") is not None:
        parts.append(f"{metrics['preferences/rows']} pairs, {metrics['preferences/ties']} ties")
    if metrics.get("agreement/raw") is not None:
        parts.append(f"agreement {metrics['agreement/raw']:.0%}, κ {_fmt(metrics.get('agreement/kappa'))}")
    if metrics.get("rm/eval_accuracy") is not None:
        parts.append(f"held-out accuracy {_fmt(metrics.get('rm/eval_accuracy_before'))} → "
                     f"{metrics['rm/eval_accuracy']:.3f}")
    if metrics.get("dpo/eval_accuracy") is not None:
        parts.append(f"held-out reward accuracy {_fmt(metrics.get('dpo/eval_accuracy_before'))} → "
                     f"{metrics['dpo/eval_accuracy']:.3f}")
    if metrics.get("ppo/reward_mean") is not None:
        parts.append(f"reward {_fmt(metrics.get('ppo/reward_mean_first'), 3)} → {metrics['ppo/reward_mean']:.3f}, "
                     f"KL {_fmt(metrics.get('ppo/kl'), 2)}")
    return "; ".join(parts)
