"""Stage kto: Kahneman-Tversky Optimisation (Ethayarajh et al. 2024) with TRL's KTOTrainer on unpaired feedback.

The data is one response per row with a thumbs up or down: `kto.data.train` in any format
reward.importers.load_feedback reads (a conversation in the messages, sharegpt or alpaca format whose last assistant
turn is the response judged, as LLaMA-Factory's KTO files are, or TRL's prompt/completion; with a boolean `label`,
or `kto_tag`), or by default the preferences stage's pairs, each as two rows: the chosen response desirable, the
rejected one undesirable. Held out by prompt as in dpo. KTOTrainer reads the training rows in order (its KL
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
from pipeline.errors import ConfigError
from pipeline.log import track
from pipeline.render import response_ids
from reward.pairs import FeedbackRow, unpaired
from stages import hf_trainer, preference_data, preference_opt

NAME = "kto"


def uses_model(config: RunConfig) -> bool:
    return True


def data_files(config: RunConfig) -> dict:
    return preference_opt.data_files(config, NAME)


def _read(config: RunConfig, key: str) -> list[FeedbackRow]:
    """The feedback file at kto.data.<key>, which must hold responses of both kinds."""
    from reward.importers import load_feedback

    path = getattr(config.kto.data, key)
    rows = load_feedback(path, config.kto.data.format)
    labels = {row.label for row in rows}
    if len(labels) == 1:
        raise ConfigError(f"kto.data.{key}: every row of {path} is labelled {str(labels.pop()).lower()}; KTO "
                          "learns from desirable (label true) and undesirable (label false) responses, and needs both")
    return rows


def load(config: RunConfig, data_from: Path | None = None) -> tuple[list, list]:
    """(train, held-out) FeedbackRows, the training rows shuffled; ([], []) when they come from the preferences stage
    and it has not run yet."""
    data = config.kto.data
    if data.train:
        rows = _read(config, "train")
    elif data_from is not None:
        rows = unpaired(preference_data.stage_output(data_from))
    else:
        return [], []
    train, held_out = ((rows, _read(config, "eval")) if data.eval
                       else preference_data.split_by_prompt(rows, data.eval_split, config.seed))
    random.Random(config.seed).shuffle(train)
    return train, held_out


def check(config: RunConfig) -> str:
    from reward.importers import FEEDBACK_FORMATS

    data = config.kto.data
    if data.format not in FEEDBACK_FORMATS:
        raise ConfigError(f"kto.data.format '{data.format}' is not one of {', '.join(FEEDBACK_FORMATS)} (feedback "
                          "formats)")
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
