"""cpt's corpus read while it trains (cpt.data.streaming): documents from `datasets` streaming, tokenized and packed
into blocks on the fly and handed to the trainer as an IterableDataset, so no more of the corpus is held than the
chunk `datasets` is reading and the tokens of the block being filled.

The blocks are the ones the in-memory path cuts (pipeline.render.pack_documents over the documents in the same
order), and the documents are the ones pipeline.data.load_texts reads, but for one thing `datasets`' text reader
does: a lone carriage return (old Mac line ends) also ends a line. What needs the whole corpus is not done: a
fraction held out (eval_documents holds out the first N), weighted sources, a count of documents and blocks.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from pipeline.data import Document, check_text_options, record_document, text_documents
from pipeline.errors import ConfigError, DataError
from pipeline.records import SHOWN_BAD_ROWS, BadRowsError
from pipeline.render import block_rows, pack_documents
from pipeline.sources import Source, parse, stream_rows


def sources(value: Any, key: str) -> list[Source]:
    """The sources of a streamed corpus; weights are refused: they need each source's count of records."""
    found = parse(value, key)
    for index, source in enumerate(found):
        if source.weight != 1:
            where = f"{key}[{index}]" if isinstance(value, list) else key
            raise ConfigError(f"{where}.weight: a streamed corpus is read source after source and never counted, so "
                              "its sources cannot be weighted; remove weight, or set cpt.data.streaming: false")
    return found


class Dropped:
    """The bad records a stream leaves out under bad_rows: drop, counted once each however often the stream is read
    again (a resume skips what it trained on by reading it again), the first few named in the log; under
    bad_rows: error the first one stops the run. The corpus is never held, so neither is a list of its bad rows."""

    def __init__(self, policy: str, key: str):
        self.policy, self.key, self.count = policy, key, 0
        self._reached = (-1, 0)  # the furthest (source, row) read so far: rows before it were counted already

    def guard(self, position: tuple[int, int], convert: Callable[[], Document]) -> Document | None:
        try:
            return convert()
        except DataError as error:
            if self.policy != "drop":
                raise BadRowsError(f"{self.key}: a bad row in the streamed corpus: {error}; fix it, or set "
                                   f"{self.key}.bad_rows: drop to train without it (counted in stage.json)",
                                   [error]) from None
            if position > self._reached:
                self.count += 1
                if self.count <= SHOWN_BAD_ROWS:
                    from pipeline.log import warn

                    warn(f"{self.key}: left out ({self.key}.bad_rows: drop): {error}")
            return None
        finally:
            self._reached = max(self._reached, position)


def documents(found: list[Source], data, dropped: Dropped) -> Iterator[Document]:
    """The corpus's documents, source after source, read as they are asked for: a .txt's paragraphs (or lines, under
    format lines) from `datasets`' rows of one line each, a record's (renamed) text field."""
    check_text_options(data.columns, data.format)
    for index, source in enumerate(found):
        rows = stream_rows(source)
        if source.is_file and source.suffix == ".txt":
            # Editors on Windows start a file with a BOM; read_text drops it too.
            lines = ((row, record["text"].removeprefix("\ufeff") if row == 1 else record["text"])
                     for row, record in rows)
            yield from text_documents(lines, source, data.format)
            continue
        if data.format == "lines":
            raise ConfigError(f"format 'lines' reads a .txt file one document per line; {source} holds records "
                              "(their 'text' field is a document each): use format auto or text")
        for row, record in rows:
            document = dropped.guard((index, row), lambda: record_document(record, source, row, data.columns))
            if document is not None:
                yield document


def train_blocks(tokenizer, read: Callable[[], Iterator[Document]], block_size: int):
    """The training rows as an IterableDataset, packed as they are asked for from the corpus read again and again
    (`endless`). Iterating it starts `read()` afresh: a resume skips the batches it trained on by reading them."""
    from datasets import Features, IterableDataset, List, Value

    def rows():
        yield from block_rows(pack_documents(tokenizer, endless(read), block_size))

    ids = List(Value("int64"))
    return IterableDataset.from_generator(rows, features=Features({"input_ids": ids, "labels": ids}))


def endless(read: Callable[[], Iterator[Document]]) -> Iterator[Document]:
    """The corpus, read again from its start each time it runs out, as one endless pass: the trainer's epochs of an
    IterableDataset would start each pass on a fresh block, and a resume past the first would skip the batches it
    trained on in the first pass only, then train the second from its start again."""
    while True:
        empty = True
        for document in read():
            empty = False
            yield document
        if empty:
            return
