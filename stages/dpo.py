"""Stage dpo: Direct Preference Optimisation with TRL's DPOTrainer on chosen/rejected pairs.

The data is the preferences stage's output (or `dpo.data.train`, any preference file reward.importers reads), held
out by prompt as in rm. The policy starts from sft's result merged into the weights (saved at <stage>/base), and,
with LoRA, trains a fresh adapter on it: the reference policy is then that same base with the adapter switched
off — exactly the sft policy, with no second copy of the model in memory. `trainer:` keys go to DPOConfig (beta,
loss_type, ...). Reported: TRL's reward accuracies and margins (implicit rewards beta * log pi/pi_ref) on the
held-out pairs before and after training.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import RunConfig
from pipeline.context import StageContext
from pipeline.errors import ConfigError, PipelineError
from pipeline.log import log, track, warn
from pipeline.render import response_ids
from reward.pairs import PreferenceRow
from stages import lm, preference_data

NAME = "dpo"


def uses_model(config: RunConfig) -> bool:
    return True


def data_files(config: RunConfig) -> dict:
    return lm.data_files(config, NAME)


def load(config: RunConfig, data_from: Path | None = None) -> tuple[list, list]:
    return preference_data.load_pairs(config, NAME, data_from)


def check(config: RunConfig) -> str:
    from trl import DPOConfig

    preference_data.check_format(config, NAME)
    train, held_out = load(config)
    lm.trainer_args(DPOConfig, NAME, config.dpo.trainer, config.seed, output_dir="unused")
    if not config.dpo.data.train:
        return "trains on the preferences stage's output"
    return f"{len(train)} train / {len(held_out)} eval pairs"


def _rows(tokenizer, rows: list[PreferenceRow], max_length: int) -> tuple[list[dict], int]:
    """Conversational rows for DPOTrainer (it applies the same chat template we render with); pairs whose longer
    side exceeds max_length are counted out rather than truncated, so no response is trained on half its text."""
    kept = []
    for row in track(rows, "tokenizing pairs"):
        longest = max(len(response_ids(tokenizer, row.prompt, row.chosen)),
                      len(response_ids(tokenizer, row.prompt, row.rejected)))
        if longest <= max_length:
            kept.append({"prompt": row.prompt, "chosen": [{"role": "assistant", "content": row.chosen}],
                         "rejected": [{"role": "assistant", "content": row.rejected}]})
    return kept, len(rows) - len(kept)


def _policy(ctx: StageContext, tokenizer):
    """The model to train, and the directory of the weights its adapter applies to."""
    from peft import get_peft_model
    from transformers import set_seed

    from pipeline.models import load_causal_lm, load_policy, peft_config_for

    set_seed(ctx.config.seed)
    base_dir = ctx.init.base
    if ctx.init.adapter is not None:
        # The starting adapter is folded in, so switching the new adapter off gives the starting policy: the reference.
        model = load_policy(ctx.init.base, ctx.init.adapter, ctx.config.model, tokenizer)
        base_dir = lm.save_merged_base(ctx, model, tokenizer)
        model.train()
    else:
        model = load_causal_lm(base_dir, ctx.config.model, tokenizer)
    peft_config = peft_config_for(ctx.config.peft)
    if peft_config is None:
        return model, base_dir  # full fine-tuning: DPOTrainer loads a frozen reference copy from base_dir
    if ctx.config.peft.method != "lora":
        raise ConfigError(f"dpo with peft.method={ctx.config.peft.method}: the reference is the policy with its "
                          "adapter switched off, which needs lora (or full)")
    return get_peft_model(model, peft_config), base_dir


def run(ctx: StageContext) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.callbacks import RichProgressCallback

    from pipeline.models import load_tokenizer
    from stages.metrics import loss_curves, overfitting

    train_rows, eval_rows = load(ctx.config, ctx.data_from)
    if not train_rows:
        raise PipelineError(f"{NAME}: there are no chosen/rejected pairs to train on (see the preferences stage's "
                            "tie and unlabelled counts)")
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    limit = ctx.section.trainer.get("max_length") or DPOConfig.__dataclass_fields__["max_length"].default
    train, dropped_train = _rows(tokenizer, train_rows, limit)
    held_out, dropped_eval = _rows(tokenizer, eval_rows, limit)
    if dropped_train + dropped_eval:
        warn(f"{NAME}: {dropped_train + dropped_eval} pairs are longer than max_length={limit} tokens and were left "
             f"out ({dropped_train} train, {dropped_eval} eval)")
    if not train:
        raise ConfigError(f"{NAME}: no training pair fits in max_length={limit}")
    log(f"{NAME}: {len(train)} train / {len(held_out)} held-out pairs")
    metrics = {"data/train_pairs": len(train), "data/eval_pairs": len(held_out),
               "data/dropped_too_long": dropped_train + dropped_eval}

    model, base_dir = _policy(ctx, tokenizer)
    args = lm.trainer_args(DPOConfig, NAME, ctx.section.trainer, ctx.config.seed,
                           **lm.managed_args(ctx, bool(held_out)))
    trainer = DPOTrainer(
        model=model, ref_model=None, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(held_out) if held_out else None,
        callbacks=[*ctx.callbacks(), RichProgressCallback()],
    )
    trainer.remove_callback(PrinterCallback)
    metrics.update(lm.run_training(ctx, trainer))
    if held_out:
        trainer.pop_callback(RichProgressCallback)
        after = trainer.evaluate()
        metrics.update(lm.evaluated_at_start(trainer, {"dpo/eval_accuracy_before": "eval_rewards/accuracies",
                                                       "dpo/eval_margin_before": "eval_rewards/margins"}))
        metrics.update({"dpo/eval_accuracy": after.get("eval_rewards/accuracies"),
                        "dpo/eval_margin": after.get("eval_rewards/margins"), "dpo/eval_loss": after.get("eval_loss"),
                        "eval/overfitting": overfitting(*loss_curves(trainer.state.log_history, "eval_loss"))})
        log(f"{NAME}: held-out reward accuracy {metrics['dpo/eval_accuracy']:.1%}, margin "
            f"{metrics['dpo/eval_margin']:.3f}")
    lm.save_trained(trainer, tokenizer, ctx.final_dir)
    ctx.record(base_model=str(base_dir))
    if ctx.config.evaluation.prompts and not ctx.config.distributed.enabled:  # launched: the runner evaluates
        metrics.update(_compare_with_sft(ctx, trainer.model, tokenizer))
    return metrics


def _compare_with_sft(ctx: StageContext, model, tokenizer) -> dict:
    from pipeline.models import load_policy
    from stages.evaluate import compare_with_start

    if hasattr(model, "disable_adapter"):
        return compare_with_start(ctx, model, tokenizer)  # the base with the adapter off is the starting policy
    start = load_policy(ctx.init.base, ctx.init.adapter, ctx.config.model, tokenizer)
    return compare_with_start(ctx, model, tokenizer, start)
