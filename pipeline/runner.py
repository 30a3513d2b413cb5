"""Order the stages, wire each stage's inputs to the outputs before it, and decide run / resume / skip.

The decision for a stage, from its manifest and what it would consume now:
- no manifest                        -> run
- completed, same config and inputs  -> skip
- completed, something changed       -> rerun (earlier results moved to .history/, never deleted)
- running/failed/interrupted, same   -> resume from the newest *complete* checkpoint (or step 0, said out loud)
- running/failed/interrupted, changed-> refuse, naming what changed; --fresh moves the old progress aside
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.markup import escape

from pipeline import launch, report, tracking
from pipeline.artifacts import (
    archive_stage_dir, complete_checkpoints, completed, hash_config, hash_path, incomplete_checkpoints, read_manifest,
    write_manifest,
)
from pipeline.config import MODEL_JUDGES, REGISTRY, STAGE_ORDER, RunConfig, evaluation_judges
from pipeline.context import ModelSource, StageContext
from pipeline.errors import ConfigError, PipelineError
from pipeline.lock import RunLock
from pipeline.log import log, warn
from pipeline.models import BUILTIN_MODELS, model_path
from pipeline.sources import hash_sources
from stages import STAGES


def referenced_stages(config: RunConfig, name: str) -> list[str]:
    """Stages whose result `name` uses besides its starting model and data: the model of a judge, a reward or ppo's
    critic (Stage.uses), and the evaluation judges' after an evaluated stage. Their output hashes join its inputs, so
    a retrained reward model re-runs the stages that score with it."""
    stage = REGISTRY[name]
    models = stage.uses(config)
    if stage.evaluated and config.evaluation.prompts:
        models += [judge.model for judge in evaluation_judges(config) if judge.type in MODEL_JUDGES]
    return sorted({model for model in models if model in STAGE_ORDER and model != name})


@dataclass
class Decision:
    stage: str
    action: str  # run, resume, rerun, skip
    reason: str
    init: ModelSource | None = None
    resume_from: Path | None = None
    hashes: dict = field(default_factory=dict)
    data_from: Path | None = None  # an earlier stage's output the stage trains on (Stage.data_from)


def default_run_dir(config: RunConfig) -> Path:
    return Path(config.run_dir or Path("runs") / Path(config.source).stem)


def selected_stages(config: RunConfig, names: list[str] | None) -> list[str]:
    for name in names or ():
        if name not in STAGES:
            raise ConfigError(f"unknown stage '{name}'; stages are {', '.join(STAGE_ORDER)}")
    if names:
        return [name for name in STAGE_ORDER if name in names]
    enabled = [name for name in STAGE_ORDER if config.stage(name).enabled]
    if not enabled:
        raise ConfigError(f"{config.source}: no stage is enabled")
    return enabled


def preflight(config: RunConfig, names: list[str]) -> None:
    """Everything that can be checked without compute: data files parse, trainer, PEFT and judge options are valid."""
    from pipeline.models import check_model_options, peft_config_for

    peft_config_for(config.peft)
    check_model_options(config, names)
    if config.model.name_or_path not in BUILTIN_MODELS:
        model_path(config.model)
    for name in names:
        STAGES[name].check(config)


class Runner:
    def __init__(self, config: RunConfig, run_dir: Path, fresh: bool = False):
        self.config, self.run_dir, self.fresh = config, run_dir, fresh
        self.run_name = run_dir.resolve().name

    # ---------------------------------------------------------------- inputs

    def _init_source(self, name: str, will_run: set[str]) -> tuple[ModelSource | None, str | None]:
        """Where `name` starts from, and the upstream stage it depends on (None when it starts from a path)."""
        init = self.config.stage(name).init_from
        if init == "auto":
            earlier = [s for s in STAGE_ORDER[: STAGE_ORDER.index(name)]
                       if REGISTRY[s].starts_later_stages and self.config.stage(s).enabled]
            if earlier:
                init = earlier[-1]
                if init not in will_run and not self._completed(init):
                    warn(f"{name}: {init} is enabled but has not completed in {self.run_dir}; "
                         f"{name} starts from the base model")
                    init = "base"
            else:
                init = "base"
        if init == "base":
            base = model_path(self.config.model)
            return ModelSource(base, None, f"the base model {self.config.model.name_or_path}"), None
        if init in STAGES:
            if init in will_run:
                return None, init  # known only once that stage has run
            if not self._completed(init):
                raise PipelineError(f"{name}.init_from is '{init}', but {init} has not completed in {self.run_dir}")
            return ModelSource.of_stage(self.run_dir / init), init
        path = Path(init)
        if (path / "adapter_config.json").exists():
            return ModelSource(model_path(self.config.model), path, f"the adapter {path}"), None
        if (path / "config.json").exists():
            return ModelSource(path, None, f"the model {path}"), None
        raise ConfigError(f"{name}.init_from '{init}' is not auto, base, a stage name, or a model/adapter directory")

    def _data_source(self, name: str, will_run: set[str]) -> str | None:
        """The earlier stage whose output `name` trains on, when its config names no data file of its own."""
        upstream = REGISTRY[name].data_from
        if upstream is None or self.config.stage(name).data.train:
            return None
        if upstream not in will_run and not self._completed(upstream):
            raise PipelineError(f"{name} trains on {upstream}'s output, but {upstream} has not completed in "
                                f"{self.run_dir}; run it first, or set {name}.data.train to a preference file")
        return upstream

    def _completed(self, name: str) -> bool:
        return completed(read_manifest(self.run_dir / name))

    def _hashes(self, name: str, init: ModelSource | None, upstream: str | None, data_upstream: str | None) -> dict:
        config = self.config
        section = config.stage(name)
        hashes = {"config": hash_config({"stage": _asdict(section), "model": _asdict(config.model),
                                         "peft": _asdict(config.peft), "seed": config.seed})}
        for key, value in STAGES[name].data_files(config).items():
            hashes[f"data.{key}"] = hash_sources(value)
        if data_upstream:
            hashes[f"data.{data_upstream}"] = (read_manifest(self.run_dir / data_upstream) or {}).get("output_hash", "")
        for used in referenced_stages(config, name):
            hashes[f"uses.{used}"] = (read_manifest(self.run_dir / used) or {}).get("output_hash", "")
        if init is None:
            return hashes
        if upstream:
            hashes["init"] = (read_manifest(self.run_dir / upstream) or {}).get("output_hash", "")
        elif init.adapter:
            hashes["init"] = hash_path(init.adapter)
        else:
            # Base weights are identified by path and config rather than hashing gigabytes on every start.
            hashes["init"] = f"{init.base}:{hash_path(init.base / 'config.json')}"
        return hashes

    # ---------------------------------------------------------------- decisions

    def decide(self, name: str, will_run: set[str]) -> Decision:
        init, upstream = (self._init_source(name, will_run) if STAGES[name].uses_model(self.config)
                          else (None, None))
        data_upstream = self._data_source(name, will_run)
        stage_dir = self.run_dir / name
        manifest = read_manifest(stage_dir)
        used = referenced_stages(self.config, name)
        for stage in used:
            if stage not in will_run and not self._completed(stage):
                raise PipelineError(f"{name} uses the model of the {stage} stage (a judge, reward or critic), but "
                                    f"{stage} has not completed in {self.run_dir}; run it first")
        pending = [s for s in (upstream, data_upstream, *used) if s in will_run]
        if pending:
            return Decision(name, "run" if not manifest else "rerun",
                            f"its input comes from {' and '.join(pending)}, which runs first")
        hashes = self._hashes(name, init, upstream, data_upstream)
        data_from = self.run_dir / data_upstream / "final" if data_upstream else None
        if self.fresh and manifest:
            return Decision(name, "rerun", "--fresh: earlier progress is moved to .history/", init, None, hashes,
                            data_from)
        if not manifest:
            return Decision(name, "run", f"not run yet; starts from {init.description if init else 'its data'}",
                            init, None, hashes, data_from)
        changed = [k for k in sorted(set(hashes) | set(manifest.get("hashes", {})))
                   if hashes.get(k) != manifest.get("hashes", {}).get(k)]
        status = manifest.get("status")
        if completed(manifest):
            if not changed and (stage_dir / "final").exists():
                return Decision(name, "skip", "completed with the same config and inputs", init, None, hashes,
                                data_from)
            return Decision(name, "rerun", f"changed since it completed: {', '.join(changed) or 'final/ missing'}",
                            init, None, hashes, data_from)
        if changed:
            raise PipelineError(
                f"{name} has progress from an earlier attempt ({status}) with a different {', '.join(changed)}; "
                f"restore the earlier config/inputs to resume it, or pass --fresh to move that progress to .history/"
            )
        checkpoints = complete_checkpoints(stage_dir / "checkpoints")
        if checkpoints:
            self._check_same_processes(name, manifest, checkpoints[-1])
            return Decision(name, "resume", f"{status}; resuming from {checkpoints[-1].name}", init, checkpoints[-1],
                            hashes, data_from)
        return Decision(name, "run", f"{status} before its first complete checkpoint; starting from step 0",
                        init, None, hashes, data_from)

    def _check_same_processes(self, name: str, manifest: dict, checkpoint: Path) -> None:
        """DeepSpeed saves the optimiser state in one shard per process: a checkpoint resumes only on as many."""
        launched = launch.launches(self.config, name)
        before, now = manifest.get("world_size", 1), self.config.distributed.world_size if launched else 1
        if before != now and (manifest.get("deepspeed") or (launched and self.config.distributed.deepspeed)):
            raise PipelineError(
                f"{name}'s {checkpoint.name} was written by {before} DeepSpeed process(es) and this run has {now}: its "
                f"optimiser state is sharded {before} ways. Resume with distributed.num_processes x num_machines = "
                f"{before}, or pass --fresh to move that progress to .history/ and start over"
            )

    def plan(self, names: list[str]) -> list[Decision]:
        decisions, will_run = [], set()
        for name in names:
            decision = self.decide(name, will_run)
            if decision.action != "skip":
                will_run.add(name)
            decisions.append(decision)
        return decisions

    # ---------------------------------------------------------------- running

    def run(self, names: list[str]) -> list[dict]:
        launch.check_main_machine(self.config)
        preflight(self.config, names)
        if any(name != "cpt" for name in names):  # the others render chats: say what system message they get
            from pipeline.models import load_tokenizer
            from pipeline.render import system_prompt_note

            tokenizer = load_tokenizer(self.config.model)
            if tokenizer.chat_template:
                log(escape(f"system prompt: {system_prompt_note(self.config.model, tokenizer)}"))
        summary = []
        with RunLock(self.run_dir), launch.announced(self.run_dir, self.config):
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
            for name in names:
                decision = self.decide(name, set())
                log(f"[bold]{name}[/bold]: {decision.action} ({decision.reason})")
                if decision.action != "skip":
                    self._execute(decision)
                summary.append(read_manifest(self.run_dir / name))
        tracking.print_summary(summary)
        log(f"report: {' and '.join(map(str, report.write(self.run_dir)))}")
        return summary

    def _execute(self, decision: Decision) -> None:
        stage_dir = self.run_dir / decision.stage
        if decision.action == "rerun" and stage_dir.exists():
            log(f"{decision.stage}: earlier results moved to {archive_stage_dir(stage_dir)}")
        for partial in incomplete_checkpoints(stage_dir / "checkpoints"):
            log(f"{decision.stage}: {partial.name} was never completed; moved to {archive_stage_dir(partial)}")
        manifest = read_manifest(stage_dir) or {"stage": decision.stage, "attempts": 0, "metrics": {}}
        manifest.update(
            status="running", hashes=decision.hashes, config=_asdict(self.config.stage(decision.stage)),
            init=decision.init.to_dict() if decision.init else None, started_at=time.time(),
            attempts=manifest["attempts"] + 1,
            resumed_from=decision.resume_from.name if decision.resume_from else None,
        )
        if launch.launches(self.config, decision.stage):
            manifest.update(world_size=self.config.distributed.world_size,
                            deepspeed=self.config.distributed.deepspeed or None)
        manifest.setdefault("wandb_run_id", tracking.new_run_id())
        write_manifest(stage_dir, manifest)
        tracking.configure(self.run_dir, decision.stage)
        ctx = StageContext(decision.stage, self.config, stage_dir, decision.init, self.run_name, decision.resume_from,
                           decision.data_from, self.run_dir, launcher=launch.run_launched)
        launched = launch.launches(self.config, decision.stage)
        if not launched:  # a launched stage's main process opens the run (pipeline.launch.worker)
            ctx.tracker.start()  # before any trainer: their W&B callback logs into the run it finds open
        module = STAGES[decision.stage]
        try:
            result = launch.run_launched(ctx) if launched else module.run(ctx)
            if hasattr(module, "evaluate_saved"):  # on the saved result, here, whether or not it trained launched
                result.metrics.update(module.evaluate_saved(ctx, result))
        except BaseException as exc:
            ctx.tracker.finish()
            manifest = read_manifest(stage_dir)
            interrupted = isinstance(exc, KeyboardInterrupt)
            status = "interrupted" if interrupted else getattr(exc, "status", "failed")
            manifest.update(status=status, error=None if interrupted else str(exc))
            write_manifest(stage_dir, manifest)
            raise
        manifest = read_manifest(stage_dir)
        # With what the stage recorded on the way (baselines measured before training, kept through a resume).
        metrics = {**manifest.get("metrics", {}), **result.metrics}
        ctx.tracker.log(metrics, step=metrics.get("train/steps", 0))  # the stage's results beside its curves
        ctx.tracker.finish()
        finished = time.time()
        manifest.update(
            **result.manifest, status="completed", finished_at=finished,
            duration_s=round(finished - manifest["started_at"], 1), metrics=metrics,
            output_hash=hash_path(stage_dir / "final"), error=None,
        )
        write_manifest(stage_dir, manifest)


def _asdict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)
