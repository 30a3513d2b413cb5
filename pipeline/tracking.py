"""Experiment tracking: one W&B group per pipeline run, one W&B run per stage (job type = the stage), TensorBoard
under <stage>/tensorboard, and the end-of-run table.

The stage's W&B run is started here, with its id, group and job type passed explicitly: wandb reads its environment
once per process, so stages run one after another in the same process would otherwise all log into the first one's
run. The HF trainers' W&B callback finds that run and logs into it; our own loop (PPO) and the stages' end-of-stage
metrics, sample tables and calibration go through `StageTracker`. The run id lives in the stage's manifest, so a
resumed stage continues its own run. Every metric is logged against `train/global_step`, the trainers' x axis.
"""

from __future__ import annotations

import os
import re
import uuid
from numbers import Number
from pathlib import Path

from rich.table import Table

from pipeline.config import PREFERENCE_OPTIMISERS, RunConfig
from pipeline.distributed import is_main_process
from pipeline.log import console

STEP = "train/global_step"
# Config keys whose values are credentials (TrainingArguments' hub_token, say). A key ending in _env names an
# environment variable and is kept: the secret itself is only ever in the environment.
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key|apikey|access_key)$", re.IGNORECASE)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def redact(value):
    """The config as logged: the value of every key that names a credential is replaced."""
    if isinstance(value, dict):
        return {key: "<redacted>" if SECRET_KEY.search(str(key)) and item else redact(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def configure(run_dir: Path, stage: str) -> None:
    """Point the HF trainers' TensorBoard callback at <stage>/tensorboard (it reads only this variable)."""
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir.resolve() / stage / "tensorboard")


class StageTracker:
    """One stage's W&B run and TensorBoard writer, on the main process only (elsewhere every method does nothing).
    Nothing is opened until it is first used, so a stage launched in other processes leaves the run to them."""

    def __init__(self, config: RunConfig, run_dir: Path, stage: str, run_id: str | None):
        self.config, self.run_dir, self.stage, self.run_id = config, run_dir.resolve(), stage, run_id
        self.report_to = config.tracking.report_to if is_main_process() else []
        self._wandb = self._writer = None

    def start(self) -> None:
        if "wandb" in self.report_to and self._wandb is None:
            import wandb

            self._wandb = wandb.init(
                project=self.config.tracking.project, id=self.run_id, resume="allow",
                name=f"{self.run_dir.name}/{self.stage}", group=self.run_dir.name, job_type=self.stage,
                dir=str(self.run_dir), config={"pipeline": redact(self.config.to_dict()), "stage": self.stage},
            )
            self._wandb.define_metric(STEP)
            self._wandb.define_metric("*", step_metric=STEP, step_sync=True)
        if "tensorboard" in self.report_to and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / self.stage / "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        """The numbers among `metrics` (booleans as 0/1), at training step `step`."""
        scalars = {key: float(value) for key, value in metrics.items() if isinstance(value, Number)}
        if not scalars or not self.report_to:
            return
        self.start()
        if self._wandb is not None:
            self._wandb.log({**scalars, STEP: step})
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        """A table of rows (sample generations, calibration bins) at `step`, by default the latest one logged:
        W&B only, TensorBoard has no tables."""
        if "wandb" not in self.report_to or not rows:
            return
        import wandb

        self.start()
        self._wandb.log({key: wandb.Table(columns=columns, data=rows), **({STEP: step} if step is not None else {})})

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._wandb = self._writer = None


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
    if metrics.get("eval/overfitting"):
        parts.append("[red]overfitting: held-out loss rose while training loss fell[/red]")
    if metrics.get("eval/loss") is not None:
        parts.append(f"eval loss {_fmt(metrics.get('eval/loss_before'))} → {_fmt(metrics['eval/loss'])}")
    if metrics.get("eval/general_perplexity") is not None:
        parts.append(f"general-text perplexity {_fmt(metrics.get('eval/general_perplexity_before'), 1)} → "
                     f"{metrics['eval/general_perplexity']:.1f}")
    if metrics.get("eval/rougeL") is not None:
        parts.append(f"BLEU {metrics['eval/bleu']:.3f}, ROUGE-L {metrics['eval/rougeL']:.3f}")
    if metrics.get("preferences/rows") is not None:
        parts.append(f"{metrics['preferences/rows']} pairs, {metrics['preferences/ties']} ties")
    if metrics.get("agreement/raw") is not None:
        parts.append(f"agreement {metrics['agreement/raw']:.0%}, κ {_fmt(metrics.get('agreement/kappa'))}")
    if metrics.get("annotators/raw") is not None:
        parts.append(f"annotators agree {metrics['annotators/raw']:.0%}, κ {_fmt(metrics.get('annotators/kappa'))}")
    if metrics.get("rm/eval_accuracy") is not None:
        f1 = metrics.get("rm/eval_f1")  # absent from runs made before rm measured it
        parts.append(f"held-out accuracy {_fmt(metrics.get('rm/eval_accuracy_before'))} → "
                     f"{metrics['rm/eval_accuracy']:.3f}" + ("" if f1 is None else f", F1 {_fmt(f1, 3)}"))
    for name in PREFERENCE_OPTIMISERS:  # implicit rewards: accuracy on held-out pairs, or kto's margin (unpaired)
        if metrics.get(f"{name}/eval_accuracy") is not None:
            parts.append(f"held-out reward accuracy {_fmt(metrics.get(f'{name}/eval_accuracy_before'))} → "
                         f"{metrics[f'{name}/eval_accuracy']:.3f}")
        elif metrics.get(f"{name}/eval_margin") is not None:
            parts.append(f"held-out reward margin {_fmt(metrics.get(f'{name}/eval_margin_before'))} → "
                         f"{metrics[f'{name}/eval_margin']:.3f}")
    for key in sorted(k for k in metrics if k.endswith("/reward_mean") and metrics[k] is not None):
        space = key.removesuffix("/reward_mean")  # ppo, grpo, rloo: the stages that learn from a reward online
        parts.append(f"reward {_fmt(metrics.get(f'{space}/reward_mean_first'), 3)} → {metrics[key]:.3f}, "
                     f"KL {_fmt(metrics.get(f'{space}/kl'), 2)}")
    if metrics.get("cls/eval_accuracy") is not None:
        parts.append(f"held-out accuracy {_fmt(metrics.get('cls/eval_accuracy_before'), 3)} → "
                     f"{metrics['cls/eval_accuracy']:.3f}, macro-F1 {_fmt(metrics.get('cls/eval_macro_f1'), 3)}")
    if metrics.get("rounds/count") is not None:
        parts.append(f"{metrics['rounds/count']} rounds, {metrics['rounds/decided_pairs']} pairs decided"
                     + (f", judge win rate over the start {metrics['rounds/win_rate_first']:.0%} → "
                        f"{metrics['rounds/win_rate_last']:.0%}" if metrics.get("rounds/win_rate_last") is not None
                        else ""))
    return "; ".join(parts)
