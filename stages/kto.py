"""Stage kto: Kahneman-Tversky Optimisation (Ethayarajh et al. 2024) with TRL's KTOTrainer on unpaired feedback.

The data is one response per row with a thumbs up or down: `kto.data.train` (any source pipeline/sources.py reads,
`columns` renaming fields, `bad_rows` as for every stage) in any format reward.importers.load_feedback reads (a
conversation in the messages, sharegpt or alpaca format whose last assistant turn is the response judged, as
LLaMA-Factory's KTO files are, or TRL's prompt/completion; with a boolean `label`, or `kto_tag`), or by default the
preferences stage's pairs (less its ties), each as two rows: the chosen response desirable, the rejected one
undesirable. Held out by prompt as in dpo. KTOTrainer reads the training rows in order (its KL
estimate pairs each prompt with another row's response in the same batch), so they are shuffled with the run's
seed: a file sorted by label would otherwise give batches of one kind.

KTO is held to a reference as dpo is: the starting policy (sft's result, merged into the weights at <stage>/base);
with LoRA that is those weights with the new adapter switched off, with full fine-tuning a frozen copy of them
(stages/preference_opt.py). `trainer:` keys go to KTOConfig (beta, desirable_weight, undesirable_weight,
loss_type...). Reported: the held-out reward margin (the mean implicit reward beta * log pi/pi_ref of the desirable
responses minus that of the undesirable ones) before and after training.
"""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.context import StageContext, StageResult
from pipeline.data import Split
from pipeline.errors import ConfigError
from pipeline.log import track
from pipeline.records import BadRows
from pipeline.render import response_ids
from pipeline.sources import read_all
from reward.pairs import FeedbackRow, unpaired
from stages import hf_trainer, lm, preference_data, preference_opt

NAME = "kto"


def uses_model(config: RunConfig) -> bool:
    return True


def data_files(config: RunConfig) -> dict:
    return preference_opt.data_files(config, NAME)


def _check_both_labels(rows: list[FeedbackRow], config: RunConfig, key: str) -> None:
    labels = {row.label for row in rows}
    if len(labels) == 1:
        raise ConfigError(f"{NAME}.data.{key}: every row of {getattr(config.kto.data, key)} is labelled "
                          f"{str(labels.pop()).lower()}; KTO learns from desirable (label true) and undesirable "
                          "(label false) responses, and needs both")


def load(config: RunConfig, data_from: Path | None = None) -> Split:
    """(train, held-out) FeedbackRows, the training rows shuffled; empty when they come from the preferences stage
    and it has not run yet. Bad rows (data.bad_rows: drop) and the preferences stage's ties are left out, counted."""
    from reward.importers import load_feedback

    data = config.kto.data
    bad = BadRows()

    def read(key: str) -> list[FeedbackRow]:
        with lm.config_key(f"{NAME}.data"):
            return read_all(getattr(data, key), f"{NAME}.data.{key}", lambda source: load_feedback(
                source, data.format, data.columns, bad), config.seed)

    if data.train:
        rows, ties = read("train"), 0
    elif data_from is not None:
        pairs = preference_data.stage_output(data_from)
        rows, ties = unpaired([row for row in pairs if not row.tie]), sum(row.tie for row in pairs)
    else:
        return Split([], [])
    held_out = read("eval") if data.eval else None
    dropped = {"data/dropped_bad_rows": bad.settle(data.bad_rows, f"{NAME}.data"), "data/dropped_ties": ties}
    if data.train:
        _check_both_labels(rows, config, "train")
    if held_out is not None:
        _check_both_labels(held_out, config, "eval")
    train, held_out = ((rows, held_out) if held_out is not None
                       else preference_data.split_by_prompt(rows, data.eval_split, config.seed))
    random.Random(config.seed).shuffle(train)
    return Split(train, held_out, dropped)


def check(config: RunConfig) -> str:
    from reward.importers import FEEDBACK_FORMATS

    data = config.kto.data
    if data.format not in FEEDBACK_FORMATS:
        raise ConfigError(f"kto.data.format '{data.format}' is not one of {', '.join(FEEDBACK_FORMATS)} (feedback "
                          "formats)")
    if not data.train and (data.format != "auto" or data.columns):
        raise ConfigError("kto.data.format and kto.data.columns describe kto.data.train, which is not set: kto trains "
                          "on the preferences stage's output, whose layout is fixed")
    summary = preference_opt.check(config, NAME, load, unit="rows")
    args = hf_trainer.check_trainer_keys(config, NAME)
    if args.loss_type != "apo_zero_unpaired":  # the losses with a KL term, estimated within each batch
        if args.per_device_train_batch_size < 2:
            raise ConfigError("kto.trainer.per_device_train_batch_size must be at least 2: KTO estimates its KL term "
                              "from the other rows of a batch (loss_type apo_zero_unpaired has none)")
        if args.train_sampling_strategy != "sequential":
            raise ConfigError("kto.trainer.train_sampling_strategy must stay sequential for KTO's KL estimate; the "
                              "stage already shuffles the training rows, with the run's seed")
    return summary


def feedback_rows(tokenizer, rows: list[FeedbackRow], max_length: int) -> tuple[list[dict], int]:
    """Conversational prompt/completion/label rows for KTOTrainer, and how many were longer than max_length (left out
    rather than truncated)."""
    kept = [{"prompt": row.prompt, "completion": [{"role": "assistant", "content": row.completion}],
             "label": row.label}
            for row in track(rows, "tokenizing feedback")
            if len(response_ids(tokenizer, row.prompt, row.completion)) <= max_length]
    return kept, len(rows) - len(kept)


def run(ctx: StageContext) -> StageResult:
    from trl import KTOTrainer

    return preference_opt.run(ctx, KTOTrainer, load, feedback_rows, reference=True, unit="rows")


def evaluate_saved(ctx: StageContext, result: StageResult) -> dict:
    return preference_opt.evaluate_saved(ctx, result)
