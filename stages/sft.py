"""Stage sft: supervised fine-tuning on chat data, with the loss on the assistant's responses only."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import RunConfig
from pipeline.context import StageResult
from pipeline.data import Delimiters, load_conversations
from pipeline.errors import ConfigError
from pipeline.render import tokenize_conversations
from stages import lm

NAME = "sft"


def load(config: RunConfig) -> tuple[list, list]:
    """Parse and split the conversations; raises DataError before any compute is spent."""
    data = config.sft.data
    try:
        delimiters = Delimiters(**data.delimiters)
    except ConfigError as exc:
        raise ConfigError(f"sft.data.{exc}") from None

    def read(path: str) -> list:
        try:
            return load_conversations(Path(path), data.format, data.columns, delimiters)
        except ConfigError as exc:  # columns that are not the format's fields: the config's, not the file's
            raise ConfigError(f"sft.data: {exc}") from None

    if data.eval:
        return read(data.train), read(data.eval)
    return lm.split_eval(read(data.train), data.eval_split, config.seed)


def tokenize(config: RunConfig, tokenizer, train_convs: list, eval_convs: list, max_length: int):
    return (tokenize_conversations(tokenizer, train_convs, max_length),
            tokenize_conversations(tokenizer, eval_convs, max_length))


def run(ctx) -> StageResult:
    return lm.run_stage(ctx, load, tokenize)


def evaluate_saved(ctx, result: StageResult) -> dict:
    """The held-out conversations answered by the saved policy and scored against their reference answers."""
    from stages.evaluate import answer_references

    return answer_references(ctx, Path(result.manifest["base_model"]), load(ctx.config)[1])


def check(config: RunConfig) -> str:
    return lm.check(config, NAME, load)


def data_files(config: RunConfig) -> dict:
    return lm.data_files(config, NAME)


def uses_model(config: RunConfig) -> bool:
    return True
