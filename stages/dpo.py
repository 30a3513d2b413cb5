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
from pipeline.context import StageContext, StageResult
from pipeline.data import Split
from pipeline.errors import ConfigError, PipelineError
from pipeline.log import log, warn
from reward.pairs import PreferenceRow
from stages import hf_trainer, lm, preference_data

NAME = "dpo"


def uses_model(config: RunConfig) -> bool:
    return True


def data_files(config: RunConfig) -> dict:
    return lm.data_files(config, NAME)


def load(config: RunConfig, data_from: Path | None = None) -> Split:
    return preference_data.load_rows(config, NAME, data_from)


def check(config: RunConfig) -> str:
    preference_data.check_format(config, NAME)
    split = load(config)
    hf_trainer.check_trainer_keys(config, NAME)
    if not config.dpo.data.train:
        return "trains on the preferences stage's output"
    return f"{len(split.train)} train / {len(split.held_out)} eval pairs{lm.dropped_note(split.dropped)}"


def summarise(config: RunConfig, tokenizer) -> tuple[str, dict | None]:
    """validate's account of the data: the pairs and what the run's length filter leaves out, and a sample."""
    preference_data.check_format(config, NAME)
    return preference_data.summarise(config, NAME, tokenizer)


def _rows(tokenizer, rows: list[PreferenceRow], max_length: int) -> tuple[list[dict], int]:
    """Conversational rows for DPOTrainer (it applies the same chat template we render with), within max_length
    (preference_data.measure, the filter rm applies too), and how many were too long."""
    measured = preference_data.measure(tokenizer, rows, max_length)
    kept = [{"prompt": row.prompt, "chosen": [{"role": "assistant", "content": row.chosen}],
             "rejected": [{"role": "assistant", "content": row.rejected}]} for row in measured.rows]
    return kept, measured.too_long


def _policy(ctx: StageContext, tokenizer):
    """The model to train, and the directory of the weights its adapter applies to."""
    from peft import get_peft_model
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
        return model, base_dir  # full fine-tuning: DPOTrainer loads a frozen reference copy from base_dir
    if ctx.config.peft.method != "lora":
        raise ConfigError(f"dpo with peft.method={ctx.config.peft.method}: the reference is the policy with its "
                          "adapter switched off, which needs lora (or full)")
    return get_peft_model(model, peft_config), base_dir


def _held_out(trainer) -> dict:
    """TRL's implicit-reward accuracy and margin on the held-out pairs, before (eval_on_start) and after training."""
    from stages.metrics import loss_curves, overfitting

    after = trainer.evaluate()
    metrics = hf_trainer.evaluated_at_start(trainer, {"dpo/eval_accuracy_before": "eval_rewards/accuracies",
                                                      "dpo/eval_margin_before": "eval_rewards/margins"})
    metrics.update({"dpo/eval_accuracy": after.get("eval_rewards/accuracies"),
                    "dpo/eval_margin": after.get("eval_rewards/margins"), "dpo/eval_loss": after.get("eval_loss"),
                    "eval/overfitting": overfitting(*loss_curves(trainer.state.log_history, "eval_loss"))})
    log(f"{NAME}: held-out reward accuracy {metrics['dpo/eval_accuracy']:.1%}, margin "
        f"{metrics['dpo/eval_margin']:.3f}")
    return metrics


def run(ctx: StageContext) -> StageResult:
    from datasets import Dataset
    from trl import DPOTrainer

    from pipeline.models import load_tokenizer

    split = load(ctx.config, ctx.data_from)
    train_rows, eval_rows = split
    if not train_rows:
        raise PipelineError(f"{NAME}: there are no chosen/rejected pairs to train on (see the preferences stage's "
                            "tie and unlabelled counts)")
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    limit = hf_trainer.max_length(NAME, ctx.section.trainer)
    train, dropped_train = _rows(tokenizer, train_rows, limit)
    held_out, dropped_eval = _rows(tokenizer, eval_rows, limit)
    if dropped_train + dropped_eval:
        warn(f"{NAME}: {dropped_train + dropped_eval} pairs are longer than max_length={limit} tokens and were left "
             f"out ({dropped_train} train, {dropped_eval} eval)")
    if not train:
        raise ConfigError(f"{NAME}: no training pair fits in max_length={limit}")
    log(f"{NAME}: {len(train)} train / {len(held_out)} held-out pairs")
    data_metrics = {"data/train_pairs": len(train), "data/eval_pairs": len(held_out),
                    "data/dropped_too_long": dropped_train + dropped_eval, **split.dropped}

    model, base_dir = _policy(ctx, tokenizer)
    result = hf_trainer.fit(ctx, DPOTrainer, model, tokenizer, base_dir, Dataset.from_list(train),
                            Dataset.from_list(held_out) if held_out else None, ref_model=None,
                            trainer_evaluates=bool(held_out), after=_held_out if held_out else None)
    result.metrics = {**data_metrics, **result.metrics}
    return result


def evaluate_saved(ctx: StageContext, result: StageResult) -> dict:
    """The saved policy against sft's (or whichever it started from), on evaluation.prompts."""
    from stages.evaluate import compare_saved

    return compare_saved(ctx, Path(result.manifest["base_model"]))
