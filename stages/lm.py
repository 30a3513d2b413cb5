"""Language-model training shared by cpt and sft: both hand pre-tokenized rows to TRL's SFTTrainer.

The stages differ only in how they turn records into rows (raw-text blocks vs. templated conversations with loss
on responses); parsing, tokenizing with counts of what is dropped, the model set-up and the held-out metrics live
here once, the trainer steps in stages/hf_trainer.py.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

from pipeline.context import StageContext, StageResult
from pipeline.errors import ConfigError
from pipeline.log import log, warn
from pipeline.models import PEFT_TYPES, load_causal_lm, load_tokenizer, peft_config_for
from pipeline.render import show_sample
from stages import hf_trainer


@contextmanager
def config_key(key: str):
    """Name the config section in a ConfigError a loader raises about its settings (format, columns)."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def split_eval(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded fraction of records (at least one when any are asked for)."""
    if fraction > 0 and len(records) < 2:
        warn(f"only {len(records)} record(s): nothing can be held out for evaluation (eval_split {fraction})")
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def held_out_metrics(trainer) -> dict:
    """Loss and perplexity on each held-out set before (eval_on_start) and after training, and whether the model
    overfits its training data (stages.metrics.overfitting). With several sets (cpt's domain and general text) the
    trainer names their metrics eval_<set>_loss."""
    from stages.metrics import loss_curves, overfitting, perplexity

    after = hf_trainer.final_evaluation(trainer)
    if isinstance(trainer.eval_dataset, dict):
        names = {"eval/loss": "eval_domain_loss", "eval/general_loss": "eval_general_loss"}
    else:
        names = {"eval/loss": "eval_loss"}
    before = hf_trainer.evaluated_at_start(trainer, names)
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
    if source.adapter is None:
        model, base_dir = load_causal_lm(source.base, ctx.config.model, tokenizer, for_training=True), source.base
    elif source.adapter_method == PEFT_TYPES.get(peft.method):
        log(f"{ctx.name}: continuing to train the {peft.method} adapter from {source.description}")
        model = load_causal_lm(source.base, ctx.config.model, tokenizer, for_training=True)
        return PeftModel.from_pretrained(model, source.adapter, is_trainable=True), source.base
    elif source.adapter_method not in ("lora", "ia3"):
        raise ConfigError(
            f"{ctx.name} uses peft.method={peft.method} but starts from a {source.adapter_method} adapter "
            f"({source.description}), which cannot be merged into the base; use the same method in both stages"
        )
    else:  # a different method on top: the new adapter goes on the weights with the earlier one folded in
        model, base_dir = hf_trainer.merge_start_adapter(ctx, tokenizer)
    peft_config = peft_config_for(peft)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    return model, base_dir


def check(config, name: str, load) -> str:
    """The no-compute checks of cpt and sft: the data parses and the trainer keys are SFTConfig options."""
    split = load(config)
    hf_trainer.check_trainer_keys(config, name, stage_defaults(config, has_eval=False))
    return f"{len(split.train)} train / {len(split.held_out)} eval records{dropped_note(split.dropped)}"


def dropped_note(dropped: dict) -> str:
    """What a Split left out, for a summary line: '; left out: 3 bad rows, 2 ties'."""
    parts = [f"{count} {key.removeprefix('data/dropped_').replace('_', ' ')}" for key, count in dropped.items()
             if count]
    return f"; left out: {', '.join(parts)}" if parts else ""


def summarise(config, name: str, load, tokenize, tokenizer) -> tuple[str, dict | None]:
    """validate's account of cpt's or sft's data: records, sequences, what the length filter leaves out (the run's
    own tokenize), and the first training sequence to render."""
    split = load(config)
    limit = hf_trainer.max_length(name, config.stage(name).trainer)
    train_tok, eval_tok = tokenize(config, tokenizer, split.train, split.held_out, limit)
    dropped = train_tok.dropped_too_long + eval_tok.dropped_too_long
    text = (f"{len(split.train)} train / {len(split.held_out)} eval records -> {len(train_tok.rows)} / "
            f"{len(eval_tok.rows)} sequences; longest {train_tok.longest} tokens; {dropped} over max_length={limit}"
            + (" (these would be left out)" if dropped else "") + dropped_note(split.dropped))
    return text, train_tok.rows[0] if train_tok.rows else None


def data_files(config, name: str) -> dict:
    data = config.stage(name).data
    return {key: getattr(data, key) for key in ("train", "eval", "general_eval") if getattr(data, key)}


def run_stage(ctx: StageContext, load, tokenize, general: list | None = None) -> StageResult:
    """The whole of a cpt or sft stage: parse, tokenize (counting what is dropped), train, evaluate on the held-out
    records. `general`: records of general text, evaluated beside the held-out ones to show forgetting."""
    from datasets import Dataset

    split = load(ctx.config)
    train_records, eval_records = split
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    limit = hf_trainer.max_length(ctx.name, ctx.section.trainer)
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
        "data/dropped_too_long": dropped, **split.dropped,
    }
    general_rows = general_sequences(ctx, tokenizer, tokenize, general, limit, data_metrics)
    return train(ctx, tokenizer, Dataset.from_list(train_tok.rows), {"domain": eval_tok.rows, "general": general_rows},
                 data_metrics)


def general_sequences(ctx: StageContext, tokenizer, tokenize, general: list | None, limit: int,
                      data_metrics: dict) -> list:
    """cpt's general text (the forgetting check) as held-out rows, counted in data_metrics; none when not configured."""
    if not general:
        return []
    general_tok = tokenize(ctx.config, tokenizer, [], general, limit)[1]
    log(f"{ctx.name}: {len(general_tok.rows)} sequences of general text for the forgetting check "
        f"({general_tok.dropped_too_long} over max_length left out)")
    data_metrics["data/general_sequences"] = len(general_tok.rows)
    return general_tok.rows


def train(ctx: StageContext, tokenizer, train_dataset, held_out: dict[str, list], data_metrics: dict) -> StageResult:
    """Train on `train_dataset` (a Dataset, or cpt's streamed IterableDataset) through SFTTrainer and evaluate on the
    held-out rows, {"domain": rows, "general": rows}, each set that has any; the result's metrics start with
    data_metrics."""
    from datasets import Dataset
    from trl import SFTTrainer

    # More than one held-out set (cpt's general text) is evaluated set by set.
    eval_sets = {name: Dataset.from_list(rows) for name, rows in held_out.items() if rows}
    has_eval = bool(eval_sets)
    model, base_dir = load_training_model(ctx, tokenizer)
    result = hf_trainer.fit(ctx, SFTTrainer, model, tokenizer, base_dir, train_dataset,
                            eval_sets if "general" in eval_sets else eval_sets.get("domain"),
                            trainer_evaluates=has_eval, after=held_out_metrics if has_eval else None,
                            defaults=stage_defaults(ctx.config, has_eval=has_eval))
    result.metrics = {**data_metrics, **result.metrics}
    return result
