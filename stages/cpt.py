"""Stage cpt: continued pretraining, plain language modelling on raw domain text (every token carries loss)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import RunConfig
from pipeline.context import StageResult
from pipeline.data import load_texts
from pipeline.errors import ConfigError
from pipeline.render import tokenize_documents
from stages import lm

NAME = "cpt"


def load(config: RunConfig) -> tuple[list, list]:
    """Parse and split the documents; raises DataError before any compute is spent."""
    data = config.cpt.data
    try:
        documents = load_texts(Path(data.train), data.columns)
        held_out = load_texts(Path(data.eval), data.columns) if data.eval else None
    except ConfigError as exc:  # columns that are not the format's fields: the config's, not the file's
        raise ConfigError(f"cpt.data: {exc}") from None
    if held_out is not None:
        return documents, held_out
    return lm.split_eval(documents, data.eval_split, config.seed)


def tokenize(config: RunConfig, tokenizer, train_docs: list, eval_docs: list, max_length: int):
    return tokenize_documents(tokenizer, train_docs, max_length), tokenize_documents(tokenizer, eval_docs, max_length)


def general_text(config: RunConfig) -> list:
    """The general text of the forgetting check (data.general_eval), none when it is not configured."""
    data = config.cpt.data
    return load_texts(Path(data.general_eval), data.columns) if data.general_eval else []


def run(ctx) -> StageResult:
    return lm.run_stage(ctx, load, tokenize, general=general_text(ctx.config))


def check(config: RunConfig) -> str:
    general = general_text(config)
    return lm.check(config, NAME, load) + (f", {len(general)} general-text documents" if general else "")


def data_files(config: RunConfig) -> dict:
    return lm.data_files(config, NAME)


def uses_model(config: RunConfig) -> bool:
    return True
