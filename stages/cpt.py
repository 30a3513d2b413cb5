"""Stage cpt: continued pretraining, plain language modelling on raw domain text (every token carries loss)."""

from __future__ import annotations

from pipeline.config import RunConfig
from pipeline.context import StageResult
from pipeline.data import Split, load_texts
from pipeline.errors import ConfigError
from pipeline.records import BadRows
from pipeline.sources import read_all
from pipeline.render import tokenize_documents
from stages import lm

NAME = "cpt"


def load(config: RunConfig) -> Split:
    """Parse and split the documents; raises before any compute is spent (see sft.load for bad records)."""
    data = config.cpt.data
    bad = BadRows()

    def read(key: str) -> list:
        return read_all(getattr(data, key), f"{NAME}.data.{key}",
                        lambda source: load_texts(source, data.columns, data.format, bad), config.seed)

    with lm.config_key(f"{NAME}.data"):
        documents = read("train")
        held_out = read("eval") if data.eval else None
    dropped = {"data/dropped_bad_rows": bad.settle(data.bad_rows, f"{NAME}.data")}
    if held_out is not None:
        return Split(documents, held_out, dropped)
    _check_can_hold_out(documents, data)
    return Split(*lm.split_eval(documents, data.eval_split, config.seed), dropped)


def _check_can_hold_out(documents: list, data) -> None:
    """Held-out documents are drawn whole: a corpus read as one document has none to spare, which is what a .txt
    of one document per line becomes when read as blank-line-separated paragraphs."""
    if data.eval_split > 0 and len(documents) < 2:
        lines = documents[0].text.count("\n") + 1 if documents else 0
        hint = (f"it has {lines} lines and no blank line between them: if each line is a document, set "
                f"{NAME}.data.format: lines; otherwise " if lines > 1 else "")
        raise ConfigError(f"{NAME}.data.train {data.train} reads as {len(documents)} document, so eval_split "
                          f"{data.eval_split} has nothing to hold out; {hint}give {NAME}.data.eval or set "
                          f"{NAME}.data.eval_split: 0")


def tokenize(config: RunConfig, tokenizer, train_docs: list, eval_docs: list, max_length: int):
    return tokenize_documents(tokenizer, train_docs, max_length), tokenize_documents(tokenizer, eval_docs, max_length)


def general_text(config: RunConfig) -> list:
    """The general text of the forgetting check (data.general_eval), none when it is not configured."""
    data = config.cpt.data
    if not data.general_eval:
        return []
    with lm.config_key(f"{NAME}.data"):
        # Read by its own kind (.txt paragraphs, records' text): its perplexity is over blocks, not documents.
        return read_all(data.general_eval, f"{NAME}.data.general_eval",
                        lambda source: load_texts(source, data.columns), config.seed)


def run(ctx) -> StageResult:
    return lm.run_stage(ctx, load, tokenize, general=general_text(ctx.config))


def check(config: RunConfig) -> str:
    general = general_text(config)
    return lm.check(config, NAME, load) + (f", {len(general)} general-text documents" if general else "")


def summarise(config: RunConfig, tokenizer) -> tuple[str, dict | None]:
    return lm.summarise(config, NAME, load, tokenize, tokenizer)


def data_files(config: RunConfig) -> dict:
    return lm.data_files(config, NAME)


def uses_model(config: RunConfig) -> bool:
    return True
