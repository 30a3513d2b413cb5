"""What the offline preference-optimisation stages share (dpo, kto, orpo, simpo): each hands its rows to one TRL
trainer, starting from sft's result (or init_from), and is compared with that starting policy once saved.

1. Rows: the preferences stage's output (or the stage's `data.train`, read with its `columns` and `bad_rows`), held
   out by prompt (stages.preference_data); a row whose longer side exceeds max_length is counted out rather than
   truncated, so no response is trained on half its text.
2. The policy: the starting adapter, if any, folded into the weights (saved at <stage>/base). With LoRA a fresh
   adapter trains on them, so for the stages held to a reference (dpo, kto) the reference is those weights with the
   adapter switched off: exactly the starting policy, with no second copy in memory. With full fine-tuning the
   reference is a frozen copy loaded from the same directory. orpo and simpo are reference-free and load none.
3. Training through hf_trainer.fit (resume, checkpoints, tracking), then the trainer's implicit-reward accuracy
   and margin on the held-out rows, before (eval_on_start) and after: <stage>/eval_accuracy, <stage>/eval_margin.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.context import StageContext, StageResult
from pipeline.errors import ConfigError, PipelineError
from pipeline.log import log, warn
from reward.pairs import PreferenceRow
from stages import hf_trainer, lm, preference_data


def data_files(config: RunConfig, name: str) -> dict:
    return lm.data_files(config, name)


def check(config: RunConfig, name: str, load: Callable, defaults: dict | None = None, unit: str = "pairs") -> str:
    """Before any compute: the data parses (load raises on a bad row) and the trainer keys build the TRL config."""
    split = load(config)
    hf_trainer.check_trainer_keys(config, name, defaults)
    if not config.stage(name).data.train:
        return "trains on the preferences stage's output"
    return f"{len(split.train)} train / {len(split.held_out)} eval {unit}{lm.dropped_note(split.dropped)}"


def summarise(config: RunConfig, name: str, tokenizer) -> tuple[str, dict | None]:
    """validate's account of a pair stage's data: the pairs, what the run's length filter leaves out, a sample."""
    preference_data.check_format(config, name)
    return preference_data.summarise(config, name, tokenizer)


def pair_rows(tokenizer, rows: list[PreferenceRow], max_length: int) -> tuple[list[dict], int]:
    """Conversational chosen/rejected rows for TRL (its trainers apply the same chat template we render with), within
    max_length (preference_data.measure, the filter rm applies too), and how many pairs were too long."""
    measured = preference_data.measure(tokenizer, rows, max_length)
    kept = [{"prompt": row.prompt, "chosen": [{"role": "assistant", "content": row.chosen}],
             "rejected": [{"role": "assistant", "content": row.rejected}]} for row in measured.rows]
    return kept, measured.too_long


def policy(ctx: StageContext, tokenizer, reference: bool) -> tuple[object, Path, dict]:
    """(the starting policy to train, the directory of its weights, which an adapter trained on it applies to, and
    what the TRL trainer must be handed besides: the LoRA config, or with full fine-tuning the reference model)."""
    from transformers import set_seed

    from pipeline.models import load_causal_lm, peft_config_for

    set_seed(ctx.config.seed)
    if ctx.init.adapter is not None:
        # The starting adapter is folded in, so switching the new adapter off gives the starting policy: the reference.
        model, base_dir = hf_trainer.merge_start_adapter(ctx, tokenizer)
    else:
        model, base_dir = load_causal_lm(ctx.init.base, ctx.config.model, tokenizer, for_training=True), ctx.init.base
    peft_config = peft_config_for(ctx.config.peft)
    if peft_config is None:
        if not reference:
            return model, base_dir, {}
        # Handed over rather than left to TRL, which would load the model's config._name_or_path: after a merge, that
        # is the base the starting adapter was trained on, not the starting policy.
        return model, base_dir, {"ref_model": load_causal_lm(base_dir, ctx.config.model, tokenizer).eval()}
    if ctx.config.peft.method != "lora":
        why = "the reference is the policy with its adapter switched off, which needs" if reference else "it trains"
        raise ConfigError(f"{ctx.name} with peft.method={ctx.config.peft.method}: {why} lora (or full)")
    # TRL wraps the model itself and, given no reference, computes the reference with the adapter disabled.
    return model, base_dir, {"peft_config": peft_config}


def held_out_metrics(name: str, trainer) -> dict:
    """TRL's implicit-reward accuracy and margin on the held-out rows, before (eval_on_start) and after training.
    kto's rows are unpaired: it has a margin (desirable minus undesirable reward) and no accuracy."""
    from stages.metrics import loss_curves, overfitting

    after = hf_trainer.final_evaluation(trainer)
    found = {key: theirs for key, theirs in (("accuracy", "eval_rewards/accuracies"), ("margin", "eval_rewards/margins"))
             if theirs in after}
    metrics = hf_trainer.evaluated_at_start(trainer, {f"{name}/eval_{key}_before": theirs
                                                      for key, theirs in found.items()})
    metrics.update({f"{name}/eval_{key}": after[theirs] for key, theirs in found.items()})
    metrics.update({f"{name}/eval_loss": after.get("eval_loss"),
                    "eval/overfitting": overfitting(*loss_curves(trainer.state.log_history, "eval_loss"))})
    said = [f"{key} {metrics[f'{name}/eval_{key}']:{'.1%' if key == 'accuracy' else '.3f'}}" for key in found]
    log(f"{name}: held-out reward {', '.join(said) or 'not measured (no row of both kinds in a batch)'}")
    return metrics


def run(ctx: StageContext, trainer_cls, load: Callable, to_rows: Callable, *, reference: bool,
        defaults: dict | None = None, unit: str = "pairs") -> StageResult:
    """Train `trainer_cls` on the rows `load(config, data_from)` gives, `to_rows(tokenizer, rows, max_length)` turns
    into TRL's rows (and a count of those left out as too long)."""
    from datasets import Dataset

    from pipeline.models import load_tokenizer

    split = load(ctx.config, ctx.data_from)
    train_rows, eval_rows = split
    if not train_rows:
        what = "chosen/rejected pairs" if unit == "pairs" else f"feedback {unit}"
        raise PipelineError(f"{ctx.name}: there are no {what} to train on (see the preferences stage's tie and "
                            "unlabelled counts)")
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    limit = hf_trainer.max_length(ctx.name, ctx.section.trainer)
    train, dropped_train = to_rows(tokenizer, train_rows, limit)
    held_out, dropped_eval = to_rows(tokenizer, eval_rows, limit)
    if dropped_train + dropped_eval:
        warn(f"{ctx.name}: {dropped_train + dropped_eval} {unit} are longer than max_length={limit} tokens and were "
             f"left out ({dropped_train} train, {dropped_eval} eval)")
    if not train:
        raise ConfigError(f"{ctx.name}: no training {unit[:-1]} fits in max_length={limit}")
    log(f"{ctx.name}: {len(train)} train / {len(held_out)} held-out {unit}")
    data_metrics = {f"data/train_{unit}": len(train), f"data/eval_{unit}": len(held_out),
                    "data/dropped_too_long": dropped_train + dropped_eval, **split.dropped}

    model, base_dir, model_kwargs = policy(ctx, tokenizer, reference)
    result = hf_trainer.fit(ctx, trainer_cls, model, tokenizer, base_dir, Dataset.from_list(train),
                            Dataset.from_list(held_out) if held_out else None, trainer_evaluates=bool(held_out),
                            after=(lambda trainer: held_out_metrics(ctx.name, trainer)) if held_out else None,
                            defaults=defaults, **model_kwargs)
    result.metrics = {**data_metrics, **result.metrics}
    return result


def evaluate_saved(ctx: StageContext, result: StageResult) -> dict:
    """The saved policy against sft's (or whichever it started from), on evaluation.prompts."""
    from stages.evaluate import compare_saved

    return compare_saved(ctx, Path(result.manifest["base_model"]))
