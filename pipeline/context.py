"""What the runner hands a stage (its config, its directory, where its model comes from, where to resume) and what the
stage hands back (its result)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from pipeline.artifacts import completed, read_manifest, record_progress
from pipeline.config import REGISTRY, RunConfig, StageConfig
from pipeline.distributed import is_main_process
from pipeline.errors import ConfigError


@dataclass
class ModelSource:
    """Where a stage's starting weights come from: a full model directory, plus an optional PEFT adapter on it."""

    base: Path
    adapter: Path | None = None
    description: str = "the base model"

    @property
    def adapter_method(self) -> str | None:
        if self.adapter is None:
            return None
        return json.loads((self.adapter / "adapter_config.json").read_text())["peft_type"].lower()

    @classmethod
    def of_stage(cls, stage_dir: Path) -> ModelSource:
        """A completed stage's result: its final adapter on the base it was trained on, or its final full model."""
        final = stage_dir / "final"
        if (final / "adapter_config.json").exists():
            manifest = read_manifest(stage_dir) or {}
            return cls(Path(manifest["base_model"]), final, f"{stage_dir.name}'s final adapter")
        return cls(final, None, f"{stage_dir.name}'s final model")

    @classmethod
    def named(cls, spec: str, run_dir: Path | None) -> ModelSource:
        """The model a config names by `spec` (a judge's, the reward's, a critic's): a completed stage of this run, a
        built-in name, a model directory or an adapter directory (on the base its adapter_config.json names)."""
        from pipeline.models import resolve_model_path

        if spec in REGISTRY:
            if run_dir is None or not completed(read_manifest(run_dir / spec)):
                raise ConfigError(f"the model named '{spec}' is the {spec} stage, which has not completed in {run_dir}")
            return cls.of_stage(run_dir / spec)
        path = Path(spec).expanduser()
        if (path / "adapter_config.json").exists():
            base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
            return cls(resolve_model_path(base), path, f"the adapter {path}")
        return cls(resolve_model_path(spec), None, f"the model {spec}")

    def to_dict(self) -> dict:
        return {"base": str(self.base), "adapter": str(self.adapter) if self.adapter else None,
                "description": self.description}


@dataclass
class StageResult:
    """What a stage's run returns; the runner alone writes it into stage.json."""

    metrics: dict
    manifest: dict = field(default_factory=dict)
    """Fields for stage.json besides the metrics: base_model, the weights an adapter in final/ applies to."""


@dataclass
class StageContext:
    name: str
    config: RunConfig
    stage_dir: Path
    init: ModelSource | None  # None for a stage that loads no model (preferences from ready-made pairs)
    run_name: str
    resume_from: Path | None = None
    data_from: Path | None = None
    """An earlier stage's final/ directory holding the data this stage trains on (see pipeline.config.Stage.data_from)."""
    run_dir: Path | None = None
    launcher: Callable[..., dict] | None = None
    """How a stage runs a part of itself in the processes `accelerate launch` starts: launcher(ctx, entry=
    "module:function"). The runner hands in pipeline.launch.run_launched, so no stage imports the launcher."""

    @property
    def section(self) -> StageConfig:
        return self.config.stage(self.name)

    @property
    def checkpoints_dir(self) -> Path:
        return self.stage_dir / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.stage_dir / "final"

    def record(self, metrics: dict) -> None:
        """Keep metrics measured on the way (a baseline before training) through a crash: a resumed stage does not
        measure them again, and the runner adds them to the result. In a launched stage the main process keeps them."""
        if is_main_process():
            record_progress(self.stage_dir, metrics)

    @cached_property
    def tracker(self):
        """The stage's W&B run and TensorBoard writer (pipeline.tracking), its W&B run id from the manifest."""
        from pipeline.tracking import StageTracker

        run_id = (read_manifest(self.stage_dir) or {}).get("wandb_run_id")
        return StageTracker(self.config, self.run_dir or self.stage_dir.parent, self.name, run_id)

    def callbacks(self) -> list:
        from pipeline.callbacks import CheckpointMarker, MetricsFile, NonFiniteGuard, StopOnSignal

        # The guard before the metrics file: a step that diverged is stopped, not recorded as a result.
        return [NonFiniteGuard(self.name), StopOnSignal(), CheckpointMarker(),
                MetricsFile(self.stage_dir / "metrics.jsonl")]
