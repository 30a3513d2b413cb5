"""Order the stages, wire each stage's inputs to the outputs before it, and decide run / resume / skip.

The decision for a stage, from its manifest and what it would consume now:
- no manifest                        -> run
- completed, same config and inputs  -> skip
- completed, something changed       -> rerun (earlier results moved to .history/, never deleted)
- running/failed/interrupted, same   -> resume from the newest *complete* checkpoint (or step 0, said out loud);
                                        a stage that works in rounds keeps its finished rounds and resumes the next
- running/failed/interrupted, changed-> refuse, naming what changed; --fresh moves the old progress aside
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.markup import escape

from pipeline import launch, report, signals, tracking
from pipeline.artifacts import (
    archive_stage_dir, checkpoint_name, checkpoint_step, completed, current_checkpoints_dir, disk_full, hash_config,
    hash_path, incomplete_checkpoints, read_manifest, resumable_checkpoints, round_dirs, round_finished,
    write_manifest, write_text_atomic,
)
from pipeline.config import MODEL_JUDGES, REGISTRY, STAGE_ORDER, RunConfig, evaluation_judges
from pipeline.context import ModelSource, StageContext
from pipeline.errors import ConfigError, PipelineError
from pipeline.lock import RunLock
from pipeline.log import log, warn
from pipeline.models import PEFT_TYPES, check_causal_lm, check_classifier, model_path
from pipeline.sources import hash_sources
from stages import STAGES


PROMPT_LEARNING = ("prefix_tuning", "prompt_tuning", "p_tuning")


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
    damaged: list = field(default_factory=list)  # checkpoints with the marker but files missing or truncated


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
    kinds = {REGISTRY[name].model_kind for name in names}
    if "causal_lm" in kinds:
        check_causal_lm(config.model)
    if "classifier" in kinds:
        check_classifier(config.model)
    for name in names:
        STAGES[name].check(config)


def check_writable(run_dir: Path) -> None:
    """Refuse, before any compute, a run directory that cannot be made or written: a file on its path, a read-only
    filesystem, no permission (writes nothing to find out)."""
    existing = run_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PipelineError(f"--run-dir {run_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PipelineError(f"--run-dir {run_dir}: {existing} is not writable (permissions or a read-only "
                            "filesystem); choose another --run-dir")


class Runner:
    def __init__(self, config: RunConfig, run_dir: Path, fresh: bool = False):
        self.config, self.run_dir, self.fresh = config, run_dir, fresh
        self.run_name = run_dir.resolve().name

    # ---------------------------------------------------------------- inputs

    def _resolved_init(self, name: str, will_run: set[str], quiet: bool = False) -> str:
        """`init_from` with auto resolved: base, a stage name, or a path."""
        init = self.config.stage(name).init_from
        if init != "auto":
            return init
        if REGISTRY[name].model_kind != "causal_lm":  # not part of the chat chain (cls): its own base
            return "base"
        earlier = [s for s in STAGE_ORDER[: STAGE_ORDER.index(name)]
                   if REGISTRY[s].starts_later_stages and self.config.stage(s).enabled]
        if not earlier:
            return "base"
        if earlier[-1] not in will_run and not self._completed(earlier[-1]):
            if not quiet:
                warn(f"{name}: {earlier[-1]} is enabled but has not completed in {self.run_dir}; "
                     f"{name} starts from the base model")
            return "base"
        return earlier[-1]

    def _init_source(self, name: str, will_run: set[str], quiet: bool = False) -> tuple[ModelSource | None, str | None]:
        """Where `name` starts from, and the upstream stage it depends on (None when it starts from a path)."""
        init = self._resolved_init(name, will_run, quiet)
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
        streamed = getattr(getattr(section, "data", None), "streaming", False)  # a streamed corpus is never cached
        for key, value in STAGES[name].data_files(config).items():
            hashes[f"data.{key}"] = hash_sources(value, streaming=streamed and key == "train")
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

    def decide(self, name: str, will_run: set[str], quiet: bool = False) -> Decision:
        init, upstream = (self._init_source(name, will_run, quiet) if STAGES[name].uses_model(self.config)
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
        checkpoints, damaged = resumable_checkpoints(current_checkpoints_dir(stage_dir))
        # Damaged checkpoints are said and set aside (moved to .history/ when the stage runs), never resumed from.
        said = "".join(f"; {checkpoint_name(stage_dir, path)} is damaged ({problem})" for path, problem in sorted(
            damaged.items(), key=lambda item: checkpoint_step(item[0]), reverse=True))
        rounds = sum(map(round_finished, round_dirs(stage_dir)))
        kept = f"{rounds} finished round(s) kept; " if rounds else ""
        if checkpoints:
            self._check_same_processes(name, manifest, checkpoints[-1])
            return Decision(name, "resume", f"{status}{said}; {kept}resuming from "
                            f"{checkpoint_name(stage_dir, checkpoints[-1])}", init, checkpoints[-1], hashes,
                            data_from, damaged=list(damaged))
        if rounds:
            return Decision(name, "resume", f"{status}{said}; {kept}the stage goes on after them, from what it had "
                            "sampled and labelled since (no checkpoint yet)", init, None, hashes, data_from,
                            damaged=list(damaged))
        return Decision(name, "run", f"{status}{said}; no complete checkpoint left, starting from step 0" if damaged
                        else f"{status} before its first complete checkpoint; starting from step 0",
                        init, None, hashes, data_from, damaged=list(damaged))

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

    def _start_adapter_type(self, name: str, will_run: set[str]) -> tuple[str | None, str]:
        """The peft_type of the adapter `name` will start from (None: full weights), and where it comes from."""
        init = self._resolved_init(name, will_run, quiet=True)
        if init == "base":
            return None, "the base model"
        if init in STAGES:
            if init in will_run:  # it trains with this config's peft.method (cpt and sft continue their own kind)
                return PEFT_TYPES.get(self.config.peft.method), f"{init}, trained with peft.method={self.config.peft.method}"
            if self._completed(init):
                return ModelSource.of_stage(self.run_dir / init).adapter_method, f"{init}'s final/ in {self.run_dir}"
            return None, init  # decide() says that it has not completed
        adapter = Path(init) / "adapter_config.json"
        return (ModelSource(Path(init), Path(init)).adapter_method if adapter.exists() else None), f"the adapter {init}"

    def check_start_adapters(self, names: list[str]) -> None:
        """A prompt-learning adapter (prefix, prompt, p_tuning) adds virtual tokens, not weights: a stage that folds
        the adapter it starts from into the weights it trains (rm, dpo, ppo; cpt and sft when their own method
        differs) cannot start from one. Checked before any stage runs, not when the stage after it loads."""
        will_run = set(names)
        own = PEFT_TYPES.get(self.config.peft.method)
        for name in names:
            if not STAGES[name].uses_model(self.config) or REGISTRY[name].output == "pairs":
                continue  # preferences samples with the adapter as it is
            kind, where = self._start_adapter_type(name, will_run)
            continues = REGISTRY[name].starts_later_stages and kind == own
            if kind in PROMPT_LEARNING and not continues:
                raise ConfigError(
                    f"{name} starts from a {kind} adapter ({where}), which adds virtual tokens rather than weights and "
                    f"cannot be merged into the model {name} trains: train the stage before it with peft.method lora "
                    f"or ia3 (or full), or set {name}.init_from to base or a LoRA adapter")

    def plan(self, names: list[str], quiet: bool = False) -> list[Decision]:
        decisions, will_run = [], set()
        for name in names:
            decision = self.decide(name, will_run, quiet)
            if decision.action != "skip":
                will_run.add(name)
            decisions.append(decision)
        return decisions

    # ---------------------------------------------------------------- running

    def preflight(self, names: list[str]) -> None:
        """Everything `run` checks before it writes anything: the config and data (preflight), the adapters the
        stages start from, and the decisions (a stage's input missing, progress made under another config)."""
        preflight(self.config, names)
        self.check_start_adapters(names)
        self.plan(names, quiet=True)

    def run(self, names: list[str]) -> list[dict]:
        launch.check_main_machine(self.config)
        check_writable(self.run_dir)
        self.preflight(names)
        if any(name not in ("cpt", "cls") for name in names):  # the others render chats: say what system message they get
            from pipeline.models import load_tokenizer
            from pipeline.render import system_prompt_note

            tokenizer = load_tokenizer(self.config.model)
            if tokenizer.chat_template:
                log(escape(f"system prompt: {system_prompt_note(self.config.model, tokenizer)}"))
        summary = []
        with RunLock(self.run_dir), launch.announced(self.run_dir, self.config):
            write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
            for name in names:
                decision = self.decide(name, set())
                log(f"[bold]{name}[/bold]: {decision.action} ({decision.reason})")
                if decision.action != "skip":
                    self._execute(decision)
                summary.append(read_manifest(self.run_dir / name))
                if signals.requested() and name != names[-1]:  # a stage that finished its work before it stopped
                    raise signals.Interrupted(signals.requested(), f"stopped for {signals.name(signals.requested())} "
                                              f"after {name} completed; run the same command again to continue")
        tracking.print_summary(summary)
        try:
            log(f"report: {' and '.join(map(str, report.write(self.run_dir)))}")
        except OSError as exc:  # the stages' results are all saved: a report that does not fit fails nothing
            warn(f"the report could not be written ({exc.strerror}); `python -m pipeline report --run-dir "
                 f"{self.run_dir}` writes it once there is room")
        return summary

    def _execute(self, decision: Decision) -> None:
        stage_dir = self.run_dir / decision.stage
        if decision.action == "rerun" and stage_dir.exists():
            log(f"{decision.stage}: earlier results moved to {archive_stage_dir(stage_dir)}")
        for partial in incomplete_checkpoints(current_checkpoints_dir(stage_dir)):
            log(f"{decision.stage}: {partial.name} was never completed; moved to {archive_stage_dir(partial)}")
        for damaged in decision.damaged:
            if damaged.exists():
                warn(f"{decision.stage}: {damaged.name} is damaged; moved to {archive_stage_dir(damaged)}")
        manifest = read_manifest(stage_dir) or {"stage": decision.stage, "attempts": 0, "metrics": {}}
        manifest.update(
            status="running", hashes=decision.hashes, config=_asdict(self.config.stage(decision.stage)),
            init=decision.init.to_dict() if decision.init else None, started_at=time.time(),
            attempts=manifest["attempts"] + 1,
            resumed_from=checkpoint_name(stage_dir, decision.resume_from) if decision.resume_from else None,
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
            full = disk_full(exc, stage_dir) if isinstance(exc, Exception) else None
            ctx.tracker.finish()
            manifest = read_manifest(stage_dir)
            interrupted = isinstance(exc, (KeyboardInterrupt, signals.Interrupted))
            status = "interrupted" if interrupted else getattr(exc, "status", "failed")
            manifest.update(status=status, error=None if interrupted else str(full or exc))
            try:
                write_manifest(stage_dir, manifest)
            except OSError as write_error:  # the disk is full: the manifest written before stays as it was
                warn(f"{decision.stage}: stage.json could not record the failure ({write_error.strerror})")
            if full is not None:
                raise full from exc
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
