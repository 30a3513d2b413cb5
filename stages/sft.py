"""Stage sft: supervised fine-tuning on chat data, with the loss on the assistant's responses only."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import RunConfig
from pipeline.context import StageResult
from pipeline.data import Delimiters, Split, load_conversations
from pipeline.errors import ConfigError
from pipeline.records import BadRows
from pipeline.sources import read_all
from pipeline.render import tokenize_conversations
from stages import lm

NAME = "sft"


def load(config: RunConfig) -> Split:
    """Parse and split the conversations; raises before any compute is spent, naming every bad record (or, with
    sft.data.bad_rows: drop, leaves them out and counts them)."""
    data = config.sft.data
    try:
        delimiters = Delimiters(**data.delimiters)
    except ConfigError as exc:
        raise ConfigError(f"sft.data.{exc}") from None
    bad = BadRows()

    def read(key: str) -> list:
        return read_all(getattr(data, key), f"{NAME}.data.{key}", lambda source: load_conversations(
            source, data.format, data.columns, delimiters, bad), config.seed)

    with lm.config_key(f"{NAME}.data"):
        train, held_out = (read("train"), read("eval")) if data.eval else \
            lm.split_eval(read("train"), data.eval_split, config.seed)
    return Split(train, held_out, {"data/dropped_bad_rows": bad.settle(data.bad_rows, f"{NAME}.data")})


def tokenize(config: RunConfig, tokenizer, train_convs: list, eval_convs: list, max_length: int):
    return (tokenize_conversations(tokenizer, train_convs, max_length),
            tokenize_conversations(tokenizer, eval_convs, max_length))


def run(ctx) -> StageResult:
    return lm.run_stage(ctx, load, tokenize)


def evaluate_saved(ctx, result: StageResult) -> dict:
    """The held-out conversations answered by the saved policy and scored against their reference answers."""
    from stages.evaluate import answer_references

    return answer_references(ctx, Path(result.manifest["base_model"]), load(ctx.config).held_out)


def check(config: RunConfig) -> str:
    return lm.check(config, NAME, load)


def summarise(config: RunConfig, tokenizer) -> tuple[str, dict | None]:
    return lm.summarise(config, NAME, load, tokenize, tokenizer)


def data_files(config: RunConfig) -> dict:
    return lm.data_files(config, NAME)


def uses_model(config: RunConfig) -> bool:
    return True
