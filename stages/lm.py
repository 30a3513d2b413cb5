"""Language-model training shared by cpt and sft: both hand pre-tokenized rows to TRL's SFTTrainer.

The stages differ only in how they turn records into rows (raw-text blocks vs. templated conversations with loss
on responses); model set-up, trainer arguments, resume and the final save live here once.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from pathlib import Path

import torch

from pipeline.config import suggest
from pipeline.context import StageContext
from pipeline.errors import ConfigError
from pipeline.distributed import is_main_process, main_process_first
from pipeline.log import log, warn
from pipeline.models import PEFT_TYPES, load_causal_lm, load_tokenizer, peft_config_for
from pipeline.render import show_sample

# Keys the runner owns: a user setting them would scatter a stage's artifacts or bypass tracking settings.
MANAGED_KEYS = ("output_dir", "report_to", "run_name", "resume_from_checkpoint", "deepspeed", "eval_on_start")


def split_eval(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded fraction of records (at least one when any are asked for)."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def trainer_args(config_cls, stage: str, trainer: dict, seed: int, **managed):
    """Build the TRL config dataclass from the stage's `trainer:` keys, naming any bad key in the error."""
    valid = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key in trainer:
        if key in MANAGED_KEYS:
            raise ConfigError(f"{stage}.trainer.{key} is set by the pipeline (see tracking:, distributed: and "
                              "--run-dir)")
        if key not in valid:
            raise ConfigError(f"{stage}.trainer.{key} is not an option of {config_cls.__name__}{suggest(key, valid)}")
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


def held_out_metrics(trainer, after: dict) -> dict:
    """Loss and perplexity on each held-out set before (eval_on_start) and after training, and whether the model
    overfits its training data (stages.metrics.overfitting). With several sets (cpt's domain and general text) the
    trainer names their metrics eval_<set>_loss."""
    from stages.metrics import loss_curves, overfitting, perplexity

    if isinstance(trainer.eval_dataset, dict):
        names = {"eval/loss": "eval_domain_loss", "eval/general_loss": "eval_general_loss"}
    else:
        names = {"eval/loss": "eval_loss"}
    before = evaluated_at_start(trainer, names)
    metrics = {}
    for ours, theirs in names.items():
        if theirs in after:
            metrics[ours] = after[theirs]
            metrics[ours.replace("loss", "perplexity")] = perplexity(after[theirs])
        if ours in before:
            metrics[f"{ours}_before"] = before[ours]
            metrics[f"{ours}_before".replace("loss", "perplexity")] = perplexity(before[ours])
    if "eval/loss" in metrics:
        metrics["eval/overfitting"] = overfitting(*loss_curves(trainer.state.log_history, names["eval/loss"]))
    return metrics


def stage_defaults(config, has_eval: bool) -> dict:
    """Trainer defaults that depend on the rest of the config; the stage's own trainer keys override them."""
    defaults = {"eval_strategy": "steps"} if has_eval else {}
    if config.peft.method == "prefix":
        # Prefix tuning feeds its prefix as a KV cache; recomputing a layer under activation checkpointing appends
        # the prefix to that cache twice and the attention shapes no longer match.
        for name in ("cpt", "sft"):
            for key in ("activation_checkpointing", "gradient_checkpointing"):
                if config.stage(name).trainer.get(key):
                    raise ConfigError(f"peft.method=prefix cannot train with {name}.trainer.{key}: set it to false")
        defaults["activation_checkpointing"] = False
    return defaults


def load_training_model(ctx: StageContext, tokenizer):
    """The model to train: the starting weights with the configured PEFT method, continuing an earlier adapter
    when it is of the same method; returns (model, base directory the final adapter will refer to)."""
    from peft import PeftModel, get_peft_model

    from transformers import set_seed

    # Adapter weights are initialised randomly: seed first, so the same config gives the same run.
    set_seed(ctx.config.seed)
    source, peft = ctx.init, ctx.config.peft
    model = load_causal_lm(source.base, ctx.config.model, tokenizer)
    base_dir = source.base
    if source.adapter is not None:
        if source.adapter_method == PEFT_TYPES.get(peft.method):
            log(f"{ctx.name}: continuing to train the {peft.method} adapter from {source.description}")
            return PeftModel.from_pretrained(model, source.adapter, is_trainable=True), base_dir
        if source.adapter_method not in ("lora", "ia3"):
            raise ConfigError(
                f"{ctx.name} uses peft.method={peft.method} but starts from a {source.adapter_method} adapter "
                f"({source.description}), which cannot be merged into the base; use the same method in both stages"
            )
        # A different method on top: fold the earlier adapter into the weights and keep that merged base, so the
        # new adapter still loads on exactly the weights it was trained on.
        model = PeftModel.from_pretrained(model, source.adapter).merge_and_unload()
        base_dir = save_merged_base(ctx, model, tokenizer)
    peft_config = peft_config_for(peft)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    return model, base_dir


def check(config, name: str, load) -> str:
    """The no-compute checks of cpt and sft: the data parses and the trainer keys are SFTConfig options."""
    from trl import SFTConfig

    train, held_out = load(config)
    trainer_keys = {**stage_defaults(config, has_eval=False), **config.stage(name).trainer}
    trainer_args(SFTConfig, name, trainer_keys, config.seed, output_dir="unused")
    return f"{len(train)} train / {len(held_out)} eval records"


def data_files(config, name: str) -> dict:
    data = config.stage(name).data
    return {key: getattr(data, key) for key in ("train", "eval", "general_eval") if getattr(data, key)}


def save_merged_base(ctx: StageContext, merged_model, tokenizer) -> Path:
    """Keep the weights an earlier adapter was merged into at <stage>/base: the stage's own adapter is trained on
    them, so they are what it must be loaded on later."""
    base_dir = ctx.stage_dir / "base"
    with main_process_first():  # in launched processes one writes it, the others then find it there
        if not (base_dir / "config.json").exists():
            save_atomic(lambda out: (merged_model.save_pretrained(out), tokenizer.save_pretrained(out)), base_dir)
    log(f"{ctx.name}: merged {ctx.init.description} into the base weights at {base_dir}")
    return base_dir


def max_length(trainer: dict) -> int:
    """The sequence limit: the stage's trainer.max_length, or SFTConfig's own default (one source of truth)."""
    from trl import SFTConfig

    return trainer.get("max_length") or SFTConfig.__dataclass_fields__["max_length"].default


def run_stage(ctx: StageContext, load, tokenize, general: list | None = None, answer=None) -> dict:
    """The whole of a cpt or sft stage: parse, tokenize (counting what is dropped), train, evaluate. `general`:
    records of general text, evaluated beside the held-out ones to show forgetting; `answer(ctx, model, tokenizer,
    eval_records) -> metrics`: a further evaluation of the trained model on the held-out records."""
    train_records, eval_records = load(ctx.config)
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    limit = max_length(ctx.section.trainer)
    train_tok, eval_tok = tokenize(ctx.config, tokenizer, train_records, eval_records, limit)
    dropped = train_tok.dropped_too_long + eval_tok.dropped_too_long
    if dropped:
        warn(f"{ctx.name}: {dropped} samples are longer than max_length={limit} tokens and were left out "
             f"({train_tok.dropped_too_long} train, {eval_tok.dropped_too_long} eval; longest {train_tok.longest})")
    if not train_tok.rows:
        raise ConfigError(f"{ctx.name}: no training sample fits in max_length={limit}; raise {ctx.name}.trainer.max_length")
    log(f"{ctx.name}: {len(train_tok.rows)} train / {len(eval_tok.rows)} eval sequences from "
        f"{len(train_records)} / {len(eval_records)} records; one sample, loss-carrying text in ⟦ ⟧:")
    log(show_sample(tokenizer, train_tok.rows[0]), style="dim", markup=False)
    data_metrics = {
        "data/train_records": len(train_records), "data/eval_records": len(eval_records),
        "data/train_sequences": len(train_tok.rows), "data/eval_sequences": len(eval_tok.rows),
        "data/dropped_too_long": dropped,
    }
    eval_sets = {"domain": eval_tok.rows}
    if general:
        general_tok = tokenize(ctx.config, tokenizer, [], general, limit)[1]
        log(f"{ctx.name}: {len(general_tok.rows)} sequences of general text for the forgetting check "
            f"({general_tok.dropped_too_long} over max_length left out)")
        eval_sets["general"] = general_tok.rows
        data_metrics["data/general_sequences"] = len(general_tok.rows)
    metrics, model = train(ctx, tokenizer, train_tok.rows, eval_sets, data_metrics)
    if answer is not None and eval_records:
        if ctx.config.distributed.enabled:
            log(f"{ctx.name}: answering held-out prompts is skipped in launched processes (sampling a sharded "
                "model is slow); run the stage without distributed: to get it", style="yellow")
        else:
            metrics.update(answer(ctx, model, tokenizer, eval_records))
    return metrics


def train(ctx: StageContext, tokenizer, train_rows: list[dict], eval_sets: dict[str, list[dict]],
          data_metrics: dict) -> tuple[dict, object]:
    """Train with SFTTrainer on pre-tokenized rows, resume if asked, save final/ atomically; return (metrics, the
    trained model). `eval_sets`: held-out rows by name; more than one (cpt's general text) is evaluated set by set."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.callbacks import RichProgressCallback

    model, base_dir = load_training_model(ctx, tokenizer)
    eval_sets = {name: Dataset.from_list(rows) for name, rows in eval_sets.items() if rows}
    has_eval = bool(eval_sets)
    trainer_keys = {**stage_defaults(ctx.config, has_eval=has_eval), **ctx.section.trainer}
    args = trainer_args(SFTConfig, ctx.name, trainer_keys, ctx.config.seed, **managed_args(ctx, has_eval))
    trainer = SFTTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=eval_sets if "general" in eval_sets else eval_sets.get("domain"),
        callbacks=[*ctx.callbacks(), RichProgressCallback()],
    )
    trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout; the Rich panel and metrics.jsonl have them
    metrics = {**data_metrics, **run_training(ctx, trainer)}
    if has_eval:
        trainer.pop_callback(RichProgressCallback)
        metrics.update(held_out_metrics(trainer, trainer.evaluate()))
    save_trained(trainer, tokenizer, ctx.final_dir)
    ctx.record(base_model=str(base_dir))  # the weights final/ applies to, for the stages after this one
    return metrics, trainer.model


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
