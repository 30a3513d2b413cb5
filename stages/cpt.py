"""Stage cpt: continued pretraining, plain language modelling on raw domain text (every token carries loss). The
corpus is read into memory, or with data.streaming read while training (pipeline/streaming.py)."""

from __future__ import annotations

from itertools import islice
from typing import Callable, Iterator

from pipeline import streaming
from pipeline.config import RunConfig
from pipeline.context import StageResult
from pipeline.data import Split, load_texts
from pipeline.errors import ConfigError
from pipeline.log import log
from pipeline.models import load_tokenizer
from pipeline.records import BadRows
from pipeline.render import show_sample, tokenize_documents
from pipeline.sources import read_all, stream_rows
from stages import hf_trainer, lm

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
    if data.eval_documents is not None:
        _check_leaves_training(len(documents), data.eval_documents)
        return Split(documents[data.eval_documents:], documents[:data.eval_documents], dropped)
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


def _check_leaves_training(read: int, held: int) -> None:
    """`read`: the documents found, all of the corpus or (streamed) its first held + 1."""
    if read <= held:
        raise ConfigError(f"{NAME}.data.eval_documents ({held}) holds out every document of {NAME}.data.train (it has "
                          f"{read}), leaving none to train on; hold out fewer")


# ---------------------------------------------------------------------------- a streamed corpus (data.streaming)

SAMPLE_DOCUMENTS = 64
"""How many training documents of a streamed corpus check and validate read, instead of all of them."""


def streamed(config: RunConfig) -> tuple[Callable[[], Iterator], list, streaming.Dropped]:
    """A streamed corpus: a function that starts its training documents afresh (the documents after those held out),
    the held-out documents (data.eval, read whole, or the first eval_documents), and the counter of bad rows left
    out."""
    data = config.cpt.data
    sources = streaming.sources(data.train, f"{NAME}.data.train")
    dropped = streaming.Dropped(data.bad_rows, f"{NAME}.data")

    def read():
        return streaming.documents(sources, data, dropped)
    held_out = []
    if data.eval:
        bad = BadRows()
        with lm.config_key(f"{NAME}.data"):
            held_out = read_all(data.eval, f"{NAME}.data.eval",
                                lambda source: load_texts(source, data.columns, data.format, bad), config.seed)
        dropped.count += bad.settle(data.bad_rows, f"{NAME}.data")
    skip = 0 if data.eval else data.eval_documents or 0
    if skip:
        with lm.config_key(f"{NAME}.data"):
            prefix = list(islice(read(), skip + 1))
        _check_leaves_training(len(prefix), skip)
        held_out = prefix[:skip]
    return (lambda: islice(read(), skip, None)), held_out, dropped


def _streamed_sample(config: RunConfig) -> tuple[list, list]:
    """(the first SAMPLE_DOCUMENTS training documents, the held-out ones) of a streamed corpus, each of its sources
    opened so that one that cannot be read is found before any compute."""
    read, held_out, _ = streamed(config)
    with lm.config_key(f"{NAME}.data"):
        for source in streaming.sources(config.cpt.data.train, f"{NAME}.data.train"):
            next(stream_rows(source), None)
        sample = list(islice(read(), SAMPLE_DOCUMENTS))
    if not sample:
        raise ConfigError(f"{NAME}.data.train {config.cpt.data.train} has no documents")
    return sample, held_out


def _held_out_note(config: RunConfig, held_out: list) -> str:
    if not held_out:
        return "no held-out documents"
    return f"{len(held_out)} held-out documents ({'data.eval' if config.cpt.data.eval else 'the first ones'})"


def _run_streamed(ctx) -> StageResult:
    """Train on the corpus as it is read: the trainer asks for blocks and the stream reads, tokenizes and packs as
    many documents as they take; only the held-out documents are held."""
    read, held_out, dropped = streamed(ctx.config)
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    limit = hf_trainer.max_length(NAME, ctx.section.trainer)
    eval_rows = tokenize_documents(tokenizer, held_out, limit).rows
    train_dataset = streaming.train_blocks(tokenizer, read, limit)
    log(f"{NAME}: streaming {ctx.section.data.train}: blocks of {limit} tokens packed as training reads the corpus "
        f"(for {ctx.section.trainer['max_steps']} steps); {_held_out_note(ctx.config, held_out)} -> {len(eval_rows)} "
        "eval sequences; the first block, loss-carrying text in ⟦ ⟧:", markup=False)
    log(show_sample(tokenizer, next(iter(train_dataset))), style="dim", markup=False)
    data_metrics = {"data/streamed": True, "data/eval_records": len(held_out), "data/eval_sequences": len(eval_rows)}
    general = lm.general_sequences(ctx, tokenizer, tokenize, general_text(ctx.config), limit, data_metrics)
    result = lm.train(ctx, tokenizer, train_dataset, {"domain": eval_rows, "general": general}, data_metrics)
    # Each bad row this process met, once: a resumed process reads again what it skips, so counts those too.
    result.metrics["data/dropped_bad_rows"] = dropped.count
    return result


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
    if ctx.section.data.streaming:
        return _run_streamed(ctx)
    return lm.run_stage(ctx, load, tokenize, general=general_text(ctx.config))


def check(config: RunConfig) -> str:
    general = general_text(config)
    general_note = f", {len(general)} general-text documents" if general else ""
    if not config.cpt.data.streaming:
        return lm.check(config, NAME, load) + general_note
    sample, held_out = _streamed_sample(config)
    hf_trainer.check_trainer_keys(config, NAME, lm.stage_defaults(config, has_eval=False))
    return (f"streamed: the first {len(sample)} training documents read as a sample, the rest while training; "
            f"{_held_out_note(config, held_out)}{general_note}")


def summarise(config: RunConfig, tokenizer) -> tuple[str, dict | None]:
    if not config.cpt.data.streaming:
        return lm.summarise(config, NAME, load, tokenize, tokenizer)
    sample, held_out = _streamed_sample(config)
    limit = hf_trainer.max_length(NAME, config.cpt.trainer)
    train_tok, eval_tok = tokenize(config, tokenizer, sample, held_out, limit)
    text = (f"streamed: the first {len(sample)} training documents, read as a sample (the rest are read only while "
            f"training) -> {len(train_tok.rows)} sequences of up to {limit} tokens; "
            f"{_held_out_note(config, held_out)} -> {len(eval_tok.rows)} sequences")
    return text, train_tok.rows[0] if train_tok.rows else None


def data_files(config: RunConfig) -> dict:
    return lm.data_files(config, NAME)


def uses_model(config: RunConfig) -> bool:
    return True
