"""The steps every stage that trains with a Hugging Face trainer takes (cpt and sft through SFTTrainer, rm through
RewardTrainer, dpo, kto, orpo and simpo through TRL's preference trainers): the trainer config from the stage's
`trainer:` keys, the options the runner owns, the start adapter merged into the weights, training with resume, and
the atomic save of final/.
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
# Keys that tell a TRL trainer how to load a model from a name. The pipeline hands every trainer a model it loaded
# itself (pipeline.models), so the trainer would ignore them (DPOTrainer under full fine-tuning would apply them to
# its reference alone): refused rather than accepted and dropped. Remote code runs only under model.trust_remote_code.
MODEL_LOADING_KEYS = {
    "model_init_kwargs": "use the model: keys instead (model.dtype, model.chat_template, model.revision, "
                         "model.trust_remote_code, model.attn_implementation, model.load_in_4bit, model.load_in_8bit)",
    "trust_remote_code": "set model.trust_remote_code (off unless set) instead",
}


def trainer_args(config_cls, stage: str, trainer: dict, seed: int, **managed):
    """Build the TRL config dataclass from the stage's `trainer:` keys, naming any bad key in the error."""
    valid = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key in trainer:
        if key in MANAGED_KEYS:
            raise ConfigError(f"{stage}.trainer.{key} is set by the pipeline (see tracking:, distributed: and "
                              "--run-dir)")
        if key not in valid:
            raise ConfigError(f"{stage}.trainer.{key} is not an option of {config_cls.__name__}{suggest(key, valid)}")
        loading = "model_init_kwargs" if key.endswith("model_init_kwargs") else key  # ref_model_init_kwargs too
        if loading in MODEL_LOADING_KEYS and trainer[key]:
            raise ConfigError(f"{stage}.trainer.{key} would be ignored: the pipeline loads the model itself; "
                              f"{MODEL_LOADING_KEYS[loading]}")
        _check_choice(config_cls, stage, key, trainer[key])
    kwargs = {
        "seed": seed,
        # TRL defaults to bf16, which CPUs without native support run slowly or not at all.
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "save_strategy": "steps",
        "disable_tqdm": True,  # the Rich progress callback replaces tqdm
        # transformers would log a NaN loss as the mean of the earlier ones; the NonFiniteGuard stops the stage instead.
        "logging_nan_inf_filter": False,
        **renamed_checkpointing(config_cls, stage, trainer),
        **managed,
    }
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{stage}.trainer: {exc}") from None


def declared_choices(config_cls, key: str) -> list[str] | None:
    """The values a trainer option takes, as its dataclass declares them: the `choices` metadata, or for an option
    that has none (DPOConfig.loss_type) the values its help lists after "Possible values are"."""
    import re

    field = {f.name: f for f in dataclasses.fields(config_cls)}[key]
    if field.metadata.get("choices"):
        return list(field.metadata["choices"])
    listed = re.search(r"Possible values are:?(.*?)(?:\.\s|$)", field.metadata.get("help", ""), re.S)
    values = re.findall(r"`'([^'`]+)'`", listed.group(1)) if listed else []
    return values or None


def _check_choice(config_cls, stage: str, key: str, value) -> None:
    """A value outside an option's declared choices fails only when the trainer first uses it (DPO's loss_type in
    the first loss computation, after the model is loaded): refuse it before any compute."""
    choices = declared_choices(config_cls, key)
    if choices is None:
        return
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and item not in choices:
            raise ConfigError(f"{stage}.trainer.{key} '{item}' is not one of {', '.join(choices)} "
                              f"({config_cls.__name__}){suggest(item, choices)}")


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
    start = _evaluated_at(trainer, 0)
    return {ours: start[theirs] for ours, theirs in names.items() if theirs in start}


def final_evaluation(trainer) -> dict:
    """The trained model's held-out metrics, as trainer.evaluate() returns them. When eval_steps put an evaluation
    at the last step, that one is taken: the same weights on the same data, which a second pass would only repeat
    (on a large held-out set, minutes)."""
    return _evaluated_at(trainer, trainer.state.global_step) or trainer.evaluate()


def _evaluated_at(trainer, step: int) -> dict:
    """The trainer's logged evaluation at `step`, its entries (one per held-out set) merged; {} when there is none."""
    found = {}
    for entry in trainer.state.log_history:
        if entry.get("step") == step and any(key.startswith("eval_") for key in entry):
            found.update(entry)
    return found


def max_length(stage: str, trainer: dict) -> int:
    """The sequence limit: the stage's trainer.max_length, or its trainer config's own default (one source of truth)."""
    return trainer.get("max_length") or REGISTRY[stage].trainer_config().__dataclass_fields__["max_length"].default


def check_trainer_keys(config, stage: str, defaults: dict | None = None):
    """Before any compute: the stage's `trainer:` keys (over `defaults`) build its trainer config, which is returned."""
    trainer = {**(defaults or {}), **config.stage(stage).trainer}
    return trainer_args(REGISTRY[stage].trainer_config(), stage, trainer, config.seed, output_dir="unused")


def merge_start_adapter(ctx: StageContext, tokenizer):
    """The starting policy (ctx.init, base + adapter) with its adapter folded into the weights, which are kept at
    <stage>/base: what the stage trains (its own adapter, its reference, its reward model) then sits on exactly
    those weights. Returns (the merged model, ready to train, and that directory)."""
    from pipeline.models import load_causal_lm, load_policy, quantised

    model = load_policy(ctx.init.base, ctx.init.adapter, ctx.config.model, tokenizer).train()
    base_dir = save_merged_base(ctx, model, tokenizer)
    if quantised(ctx.config.model):  # merged in full precision; what trains on it is the quantised copy
        del model
        return load_causal_lm(base_dir, ctx.config.model, tokenizer, for_training=True), base_dir
    # PEFT froze the base weights when it loaded the adapter, and merging keeps them frozen: full fine-tuning would
    # find nothing to train (a new adapter freezes them again itself).
    model.requires_grad_(True)
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
    _raise_if_stopped(ctx, trainer)
    if after is not None:
        trainer.pop_callback(RichProgressCallback)  # its evaluation bar would redraw the finished training panel
        metrics.update(after(trainer))
    save_trained(trainer, tokenizer, ctx.final_dir)
    return StageResult(metrics, {"base_model": str(base_dir)})  # the weights final/ applies to, for later stages


def _raise_if_stopped(ctx: StageContext, trainer) -> None:
    """A signal ended training early (pipeline.callbacks.StopOnSignal): the checkpoint of that step is complete, and
    final/ is not written, so the stage is interrupted rather than done."""
    from pipeline.callbacks import StopOnSignal
    from pipeline.signals import Interrupted, name

    stop = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnSignal)).stopped
    if stop is not None:
        signum, step = stop
        raise Interrupted(signum, f"{ctx.name} stopped for {name(signum)} after step {step}; checkpoint-{step} is "
                                  "complete: run the same command again to resume from it")


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
    try:
        trainer.save_model(str(staging))
        if main:
            tokenizer.save_pretrained(staging)
    except BaseException:
        if main:  # a full disk: the half-written copy must not keep holding the space
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if main:
        _replace(staging, target)
    trainer.accelerator.wait_for_everyone()


def save_atomic(save, target: Path) -> None:
    """Write into a temporary sibling, then rename, so a crash never leaves a half-written result behind."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save(staging)
    except BaseException:  # a full disk: the half-written copy must not keep holding the space
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace(staging, target)


def _replace(staging: Path, target: Path) -> None:
    if target.exists():
        warn(f"replacing {target}")
        shutil.rmtree(target)
    os.replace(staging, target)
