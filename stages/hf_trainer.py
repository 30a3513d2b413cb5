"""The steps every stage that trains with a Hugging Face trainer takes (cpt and sft through SFTTrainer, rm through
RewardTrainer, dpo through DPOTrainer): the trainer config from the stage's `trainer:` keys, the options the runner
owns, the start adapter merged into the weights, training with resume, and the atomic save of final/.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import REGISTRY, suggest
from pipeline.context import StageContext, StageResult
from pipeline.distributed import is_main_process, main_process_first
from pipeline.errors import ConfigError
from pipeline.log import log, warn

# Keys the runner owns: a user setting them would scatter a stage's artifacts or bypass tracking settings.
MANAGED_KEYS = ("output_dir", "report_to", "run_name", "resume_from_checkpoint", "deepspeed", "eval_on_start")


def trainer_args(config_cls, stage: str, trainer: dict, seed: int, **managed):
    """Build the TRL config dataclass from the stage's `trainer:` keys, naming any bad key in the error."""
    valid = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key in trainer:
        if key in MANAGED_KEYS:
            raise ConfigError(f"{stage}.trainer.{key} is set by the pipeline (see tracking:, distributed: and "
                              "--run-dir)")
        if key not in valid:
            raise ConfigError(f"{stage}.trainer.{key} is not an option of {config_cls.__name__}{suggest(key, valid)}")
        if key.endswith("model_init_kwargs"):
            # TRL reads it only when it loads the model from a name; the pipeline hands it a loaded model.
            raise ConfigError(f"{stage}.trainer.{key} would be ignored: the pipeline loads the model itself. Use "
                              "the model: keys (dtype, revision, trust_remote_code, attn_implementation, "
                              "load_in_4bit, load_in_8bit)")
    kwargs = {
        "seed": seed,
        # TRL defaults to bf16, which CPUs without native support run slowly or not at all.
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "save_strategy": "steps",
        "disable_tqdm": True,  # the Rich progress callback replaces tqdm
        **renamed_checkpointing(config_cls, stage, trainer),
        **managed,
    }
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{stage}.trainer: {exc}") from None


def renamed_checkpointing(config_cls, stage: str, trainer: dict) -> dict:
    """`trainer` with activation checkpointing under its transformers >= 5.24 name. transformers renamed
    `gradient_checkpointing` to `activation_checkpointing` and warns whenever only the old name is set, which TRL's
    configs always do (their default is True): passing the new name explicitly keeps TRL's default without the
    warning (the old field then mirrors it), and a config written with the old name keeps working."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if "activation_checkpointing" not in fields:
        return trainer
    trainer = dict(trainer)
    if "gradient_checkpointing" in trainer:
        old = trainer.pop("gradient_checkpointing")
        if trainer.setdefault("activation_checkpointing", old) != old:
            raise ConfigError(f"{stage}.trainer sets gradient_checkpointing and activation_checkpointing to different "
                              "values; keep activation_checkpointing (transformers' name since 5.24)")
    trainer.setdefault("activation_checkpointing", fields["gradient_checkpointing"].default)
    return trainer


def managed_args(ctx: StageContext, has_eval: bool) -> dict:
    """The trainer options the runner sets: where checkpoints go, the tracker's run name, DeepSpeed, and the
    baseline evaluation. The baseline runs inside train() (eval_on_start) rather than as an evaluate() call before
    it: under DeepSpeed ZeRO-1/2 the trainer can evaluate only once its engine exists."""
    args = {"output_dir": str(ctx.checkpoints_dir), "run_name": f"{ctx.run_name}/{ctx.name}",
            "report_to": list(ctx.config.tracking.report_to) or "none",
            "eval_on_start": has_eval and ctx.resume_from is None}
    if ctx.config.distributed.enabled:  # running in processes pipeline.launch started, which joined them already
        args["accelerator_config"] = {**ctx.section.trainer.get("accelerator_config", {}), "use_configured_state": True}
    if ctx.config.distributed.deepspeed:
        args["deepspeed"] = str(Path(ctx.config.distributed.deepspeed).resolve())
    return args


def evaluated_at_start(trainer, names: dict) -> dict:
    """{our name: value} for the trainer's metrics `names` maps to, from the baseline evaluation (eval_on_start, at
    step 0). Checkpoints keep the log, so a resumed stage still finds them; one resumed from a checkpoint written
    without them keeps what the manifest already holds."""
    start = {}
    for entry in trainer.state.log_history:  # one entry per held-out set
        if entry.get("step") == 0 and any(key.startswith("eval_") for key in entry):
            start.update(entry)
    return {ours: start[theirs] for ours, theirs in names.items() if theirs in start}


def max_length(stage: str, trainer: dict) -> int:
    """The sequence limit: the stage's trainer.max_length, or its trainer config's own default (one source of truth)."""
    return trainer.get("max_length") or REGISTRY[stage].trainer_config().__dataclass_fields__["max_length"].default


def check_trainer_keys(config, stage: str, defaults: dict | None = None) -> None:
    """Before any compute: the stage's `trainer:` keys (over `defaults`) build its trainer config."""
    trainer = {**(defaults or {}), **config.stage(stage).trainer}
    trainer_args(REGISTRY[stage].trainer_config(), stage, trainer, config.seed, output_dir="unused")


def merge_start_adapter(ctx: StageContext, tokenizer):
    """The starting policy (ctx.init, base + adapter) with its adapter folded into the weights, which are kept at
    <stage>/base: what the stage trains (its own adapter, its reference, its reward model) then sits on exactly
    those weights. Returns (the merged model, ready to train, and that directory)."""
    from pipeline.models import load_causal_lm, load_policy, quantised

    model = load_policy(ctx.init.base, ctx.init.adapter, ctx.config.model, tokenizer).train()
    base_dir = save_merged_base(ctx, model, tokenizer)
    if quantised(ctx.config.model):  # merged in full precision; what trains on it is the quantised copy
        del model
        model = load_causal_lm(base_dir, ctx.config.model, tokenizer, for_training=True)
    return model, base_dir


def save_merged_base(ctx: StageContext, merged_model, tokenizer) -> Path:
    """Keep the weights an earlier adapter was merged into at <stage>/base: the stage's own adapter is trained on
    them, so they are what it must be loaded on later."""
    base_dir = ctx.stage_dir / "base"
    with main_process_first():  # in launched processes one writes it, the others then find it there
        if not (base_dir / "config.json").exists():
            save_atomic(lambda out: (merged_model.save_pretrained(out), tokenizer.save_pretrained(out)), base_dir)
    log(f"{ctx.name}: merged {ctx.init.description} into the base weights at {base_dir}")
    return base_dir


def fit(ctx: StageContext, trainer_cls, model, tokenizer, base_dir: Path, train_dataset, eval_dataset=None, *,
        trainer_evaluates: bool, after: Callable[[object], dict] | None = None, defaults: dict | None = None,
        **trainer_kwargs) -> StageResult:
    """Build `trainer_cls` with the stage's trainer config, train (resuming when the runner says so), evaluate with
    `after(trainer)` once trained, save final/ and return the result with the base final/ applies to.
    `trainer_evaluates`: the trainer evaluates eval_dataset itself, from a baseline at step 0 (eval_on_start);
    `defaults`: trainer keys that depend on the rest of the config, which the stage's own keys override."""
    from transformers import PrinterCallback
    from trl.trainer.callbacks import RichProgressCallback

    trainer_keys = {**(defaults or {}), **ctx.section.trainer}
    args = trainer_args(REGISTRY[ctx.name].trainer_config(), ctx.name, trainer_keys, ctx.config.seed,
                        **managed_args(ctx, trainer_evaluates))
    trainer = trainer_cls(model=model, args=args, processing_class=tokenizer, train_dataset=train_dataset,
                          eval_dataset=eval_dataset, callbacks=[*ctx.callbacks(), RichProgressCallback()],
                          **trainer_kwargs)
    trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout; the Rich panel and metrics.jsonl have them
    metrics = run_training(ctx, trainer)
    if after is not None:
        trainer.pop_callback(RichProgressCallback)  # its evaluation bar would redraw the finished training panel
        metrics.update(after(trainer))
    save_trained(trainer, tokenizer, ctx.final_dir)
    return StageResult(metrics, {"base_model": str(base_dir)})  # the weights final/ applies to, for later stages


def run_training(ctx: StageContext, trainer) -> dict:
    """trainer.train(), from ctx.resume_from when the runner resumes; train/loss and train/steps of the whole run."""
    if ctx.resume_from is None:
        result = trainer.train()
        return {"train/loss": result.training_loss, "train/steps": result.global_step}
    log(f"{ctx.name}: resuming from {ctx.resume_from}")
    _stop_at_max_steps(trainer)
    result = trainer.train(resume_from_checkpoint=str(ctx.resume_from))
    # The trainer averages the loss over the steps of this call only (none at all after a resume from the last
    # checkpoint); the log history the checkpoint carried covers the whole run.
    loss = logged_training_loss(trainer.state.log_history)
    return {"train/loss": result.training_loss if loss is None else loss, "train/steps": result.global_step}


def _stop_at_max_steps(trainer) -> None:
    """transformers checks max_steps only after an optimiser step, so resuming from the checkpoint written at the
    last step trains one step more than asked (and every further resume one more). Skip the epoch loop once the
    run is there; evaluation and saving then proceed as after a normal last step."""
    run_epoch = getattr(trainer, "_run_epoch", None)
    if run_epoch is None:  # a transformers without this method: fail loudly rather than over-train silently
        raise RuntimeError("transformers' Trainer has no _run_epoch any more: update stages.lm._stop_at_max_steps")

    def run_epoch_unless_done(*args, **kwargs):
        if trainer.state.global_step >= trainer.state.max_steps > 0:
            trainer.control.should_training_stop = True
            return None
        return run_epoch(*args, **kwargs)

    trainer._run_epoch = run_epoch_unless_done


def logged_training_loss(log_history: list[dict]) -> float | None:
    """The mean per-step training loss over a trainer's log: each logged loss averages the steps since the last."""
    total = steps = previous = 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            steps += entry["step"] - previous
            previous = entry["step"]
    return total / steps if steps else None


def save_trained(trainer, tokenizer, target: Path) -> None:
    """save_atomic for a trainer's model. Every process calls trainer.save_model: under ZeRO-3 it gathers the sharded
    weights (a collective all processes join), and the main process writes them."""
    staging = target.with_name(f".{target.name}.tmp")
    main = is_main_process()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if main:
        tokenizer.save_pretrained(staging)
        _replace(staging, target)
    trainer.accelerator.wait_for_everyone()


def save_atomic(save, target: Path) -> None:
    """Write into a temporary sibling, then rename, so a crash never leaves a half-written result behind."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    save(staging)
    _replace(staging, target)


def _replace(staging: Path, target: Path) -> None:
    if target.exists():
        warn(f"replacing {target}")
        shutil.rmtree(target)
    os.replace(staging, target)
