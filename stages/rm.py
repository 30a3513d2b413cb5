"""Stage rm: a Bradley-Terry reward model trained with TRL's RewardTrainer on chosen/rejected pairs.

The data is the preferences stage's output (or `rm.data.train`, any preference dataset reward.importers reads).
The model starts from the policy (sft's result, merged into the weights when it is an adapter) with a one-output
score head; with LoRA the head trains in full beside the adapter. Held-out pairs are split by prompt, so no prompt
is both trained and tested on. Before and after training we score the held-out pairs ourselves: accuracy, mean
margin and a calibration table (does "the model is 80% sure" come true 80% of the time?).

The result (final/) loads as a sequence-classification model, or the base + adapter recorded in stage.json; the
reward_model judge and PPO score with `reward.rm_judge.RewardModelJudge.score`, on the same rendered text.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import write_json_atomic
from pipeline.config import RunConfig
from pipeline.context import StageContext, StageResult
from pipeline.data import Split
from pipeline.distributed import is_main_process
from pipeline.errors import ConfigError, PipelineError
from pipeline.log import log, track, warn
from reward.agreement import reliability
from reward.judges import sigmoid
from reward.pairs import PreferenceRow
from stages import hf_trainer, lm, preference_data

NAME = "rm"


def uses_model(config: RunConfig) -> bool:
    return True


def data_files(config: RunConfig) -> dict:
    return {**lm.data_files(config, NAME),
            **{f"probe:{name}": path for name, path in config.rm.data.probes.items()}}


def load_probes(config: RunConfig) -> dict[str, list[PreferenceRow]]:
    """The rm.data.probes sets by name: held-out pairs built to break a surface cue (see DataConfig.probes)."""
    from reward.importers import load_preferences

    return {name: [row for row in load_preferences(path, "auto") if not row.tie]
            for name, path in config.rm.data.probes.items()}


def check_probes_held_out(probes: dict, train_rows: list[PreferenceRow]) -> None:
    """A probe scored on prompts the model trained on would measure memory, not the cue it was built to test."""
    trained = {preference_data.prompt_key(row) for row in train_rows}
    for name, rows in probes.items():
        shared = sum(preference_data.prompt_key(row) in trained for row in rows)
        if shared:
            raise ConfigError(f"rm.data.probes.{name}: {shared} of its {len(rows)} prompts are among the training "
                              "pairs; a probe must be held out")


def load(config: RunConfig, data_from: Path | None = None) -> Split:
    return preference_data.load_rows(config, NAME, data_from)


def check(config: RunConfig) -> str:
    preference_data.check_format(config, NAME)
    split = load(config)
    probes = load_probes(config)
    check_probes_held_out(probes, split.train)
    hf_trainer.check_trainer_keys(config, NAME)
    probed = "".join(f", probe {name}: {len(rows)} pairs" for name, rows in probes.items())
    if not config.rm.data.train:
        return "trains on the preferences stage's output" + probed
    return f"{len(split.train)} train / {len(split.held_out)} eval pairs{lm.dropped_note(split.dropped)}" + probed


def summarise(config: RunConfig, tokenizer) -> tuple[str, dict | None]:
    """validate's account of the data: the pairs and what the run's length filter leaves out, and a sample."""
    preference_data.check_format(config, NAME)
    check_probes_held_out(load_probes(config), load(config).train)
    text, sample = preference_data.summarise(config, NAME, tokenizer)
    return text + "".join(f", probe {name}: {len(rows)} pairs" for name, rows in load_probes(config).items()), sample


def _reward_model(ctx: StageContext, tokenizer):
    """The model to train: the policy's weights under a fresh score head, with the configured PEFT method."""
    from peft import get_peft_model
    from transformers import set_seed

    from pipeline.models import load_reward_model, peft_config_for

    set_seed(ctx.config.seed)  # the score head and the adapter are initialised randomly
    base_dir = ctx.init.base
    if ctx.init.adapter is not None:
        merged, base_dir = hf_trainer.merge_start_adapter(ctx, tokenizer)
        del merged  # reloaded below under a score head
    model = load_reward_model(base_dir, ctx.config.model, tokenizer, for_training=True)
    peft_config = peft_config_for(ctx.config.peft, task_type="SEQ_CLS")
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    return model, base_dir


def score_pairs(model, tokenizer, rows: list[PreferenceRow], batch_size: int, max_length: int) -> dict:
    """Accuracy, mean margin and calibration of P(chosen wins) = sigmoid(r_chosen - r_rejected) on `rows`, and F1 of
    telling chosen from rejected responses by their reward alone, above or below the median of all of them: PPO
    compares rewards across prompts (its advantages are whitened over a batch), which pairwise accuracy never tests."""
    import statistics

    from reward.rm_judge import RewardModelJudge
    from stages.metrics import binary_f1

    model.eval()
    scorer = RewardModelJudge(model, tokenizer, batch_size=batch_size, max_length=max_length)
    chosen, rejected = [], []
    for start in track(range(0, len(rows), batch_size), "scoring held-out pairs"):
        batch = rows[start:start + batch_size]
        chosen += scorer.score([row.prompt for row in batch], [row.chosen for row in batch])
        rejected += scorer.score([row.prompt for row in batch], [row.rejected for row in batch])
    margins = [c - r for c, r in zip(chosen, rejected)]
    # Calibration over the model's confidence in its own pick, max(p, 1 - p), against how often it was right.
    table, ece = reliability([max(sigmoid(m), 1 - sigmoid(m)) for m in margins], [m > 0 for m in margins])
    threshold = statistics.median(chosen + rejected)
    f1 = binary_f1([r > threshold for r in chosen + rejected], [True] * len(chosen) + [False] * len(rejected))
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins),
            "ece": ece, "f1": f1, "calibration": table}


def run(ctx: StageContext) -> StageResult:
    from datasets import Dataset
    from trl import RewardTrainer

    from pipeline.models import load_tokenizer

    split = load(ctx.config, ctx.data_from)
    train_rows = split.train
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    limit = hf_trainer.max_length(NAME, ctx.section.trainer)
    train, held_out = (preference_data.measure(tokenizer, rows, limit) for rows in (split.train, split.held_out))
    train_tok, dropped_train = train.ids, train.too_long
    eval_rows, eval_tok, dropped_eval = held_out.rows, held_out.ids, held_out.too_long
    if dropped_train + dropped_eval:
        warn(f"{NAME}: {dropped_train + dropped_eval} pairs have a response longer than max_length={limit} tokens "
             f"and were left out ({dropped_train} train, {dropped_eval} eval)")
    if not train_rows:
        raise PipelineError(f"{NAME}: there are no chosen/rejected pairs to train on (see the preferences stage's "
                            "tie and unlabelled counts)")
    if not train_tok:
        raise ConfigError(f"{NAME}: no training pair fits in max_length={limit}")
    probes = load_probes(ctx.config)
    check_probes_held_out(probes, train_rows)
    log(f"{NAME}: {len(train_tok)} train / {len(eval_tok)} held-out pairs")
    data_metrics = {"data/train_pairs": len(train_tok), "data/eval_pairs": len(eval_tok),
                    "data/dropped_too_long": dropped_train + dropped_eval, **split.dropped}

    model, base_dir = _reward_model(ctx, tokenizer)
    batch_size = ctx.section.trainer.get("per_device_eval_batch_size", 8)
    if eval_rows and ctx.resume_from is None:
        before = score_pairs(model, tokenizer, eval_rows, batch_size, limit)
        ctx.record({"rm/eval_accuracy_before": before["accuracy"], "rm/eval_margin_before": before["margin"],
                    "rm/eval_f1_before": before["f1"]})
    if probes and ctx.resume_from is None:
        ctx.record({f"rm/probe_{name}_accuracy_before": score_pairs(model, tokenizer, rows, batch_size, limit)["accuracy"]
                    for name, rows in probes.items()})

    def held_out(trainer) -> dict:
        metrics = {}
        for name, rows in probes.items():
            metrics[f"rm/probe_{name}_accuracy"] = score_pairs(trainer.model, tokenizer, rows, batch_size,
                                                               limit)["accuracy"]
            log(f"{NAME}: accuracy on the probe '{name}' {metrics[f'rm/probe_{name}_accuracy']:.1%} "
                f"({len(rows)} pairs)")
        if not eval_rows:
            return metrics
        after = score_pairs(trainer.model, tokenizer, eval_rows, batch_size, limit)
        if is_main_process():
            write_json_atomic(ctx.stage_dir / "calibration.json", {"bins": after["calibration"]})
        ctx.tracker.log_table("rm/calibration", list(after["calibration"][0]),
                              [list(row.values()) for row in after["calibration"]], trainer.state.global_step)
        log(f"{NAME}: held-out accuracy {after['accuracy']:.1%} on {len(eval_rows)} pairs, mean margin "
            f"{after['margin']:.3f}, expected calibration error {after['ece']:.3f}, F1 of chosen vs rejected by "
            f"reward {after['f1']:.3f}")
        for row in after["calibration"]:
            log(f"  confidence {row['confidence']}: {row['pairs']:>4} pairs, accuracy "
                f"{'-' if row['accuracy'] is None else format(row['accuracy'], '.0%')}", markup=False)
        return {**metrics, "rm/eval_accuracy": after["accuracy"], "rm/eval_margin": after["margin"],
                "rm/eval_ece": after["ece"], "rm/eval_f1": after["f1"]}

    # rm measures held-out accuracy itself (score_pairs), so the trainer does not evaluate.
    result = hf_trainer.fit(ctx, RewardTrainer, model, tokenizer, base_dir, Dataset.from_list(train_tok),
                            Dataset.from_list(eval_tok) if eval_tok else None, trainer_evaluates=False,
                            after=held_out if eval_rows or probes else None)
    result.metrics = {**data_metrics, **result.metrics}
    return result
