"""cpt.data.streaming without training: the streamed blocks are the in-memory path's, the stream reads no more of
the corpus than the blocks asked for, bad rows are counted once, and what streaming cannot do is refused before any
compute."""

from __future__ import annotations

import gzip
import json
from itertools import islice
from pathlib import Path

import pytest
from conftest import REPO, build_hub_dataset_cache

from pipeline import sources as sources_module
from pipeline import streaming
from pipeline.config import DataConfig, load_config
from pipeline.data import load_texts
from pipeline.errors import ConfigError, DataError
from pipeline.records import BadRowsError
from pipeline.render import tokenize_documents
from pipeline.sources import hash_sources

SMOKE = REPO / "configs" / "smoke.yaml"
PARAGRAPHS = [p for p in (REPO / "data/cpt/beekeeping.txt").read_text().split("\n\n") if p.strip()]
BLOCK = 64


def _corpus(tmp_path: Path, kind: str) -> str:
    """The shipped beekeeping corpus as a user might bring it: .txt paragraphs (with a BOM, CRLF line ends and
    whitespace-only separator lines), .txt one document per line, .jsonl.gz or parquet records."""
    path = tmp_path / f"corpus.{kind}"
    if kind == "txt":
        path.write_bytes(("\ufeff" + "\n \n\n".join(PARAGRAPHS)).replace("\n", "\r\n").encode())
    elif kind == "lines.txt":
        path.write_text("\n".join(p.replace("\n", " ") for p in PARAGRAPHS) + "\n")
    elif kind == "jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps({"text": p, "id": i}) + "\n"
                                               for i, p in enumerate(PARAGRAPHS)).encode()))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": PARAGRAPHS}), path, row_group_size=50)
    return str(path)


def _stream(path, data: DataConfig, dropped=None):
    found = streaming.sources(path, "cpt.data.train")
    return lambda: streaming.documents(found, data, dropped or streaming.Dropped(data.bad_rows, "cpt.data"))


@pytest.mark.parametrize("kind", ["txt", "lines.txt", "jsonl.gz", "parquet"])
def test_streamed_blocks_are_the_in_memory_blocks(tmp_path, tokenizer, kind):
    from datasets import IterableDataset

    path = _corpus(tmp_path, kind)
    data = DataConfig(train=path, format="lines" if kind == "lines.txt" else "auto", streaming=True)
    in_memory = load_texts(path, format=data.format)
    assert len(in_memory) == len(PARAGRAPHS)
    assert list(_stream(path, data)()) == in_memory  # the same documents, named by the same file:line
    blocks = streaming.train_blocks(tokenizer, _stream(path, data), BLOCK)
    assert isinstance(blocks, IterableDataset)
    *whole, tail = tokenize_documents(tokenizer, in_memory, BLOCK).rows
    streamed = list(islice(blocks, len(whole) + 1))
    assert streamed[:-1] == whole
    # The corpus is read again from its start where it ends: the tail block goes on with the first document.
    first = tokenizer(PARAGRAPHS[0], add_special_tokens=False)["input_ids"]
    assert streamed[-1]["input_ids"] == (tail["input_ids"] + first)[:BLOCK]


def test_the_stream_reads_only_as_far_as_the_blocks_asked_for(tmp_path, tokenizer):
    """Memory does not grow with the corpus: the blocks the trainer takes tokenize a few documents, however large
    the corpus (50 000 documents here; datasets reads it a chunk at a time)."""
    path = tmp_path / "big.txt"
    path.write_text("".join(f"document {i} about bees and their hives\n" for i in range(50_000)))
    tokenized = []

    class Counting:
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, text, **kwargs):
            tokenized.append(text)
            return tokenizer(text, **kwargs)

    blocks = streaming.train_blocks(Counting(), _stream(str(path), DataConfig(format="lines")), BLOCK)
    taken = list(islice(blocks, 3))
    assert [len(row["input_ids"]) for row in taken] == [BLOCK] * 3
    assert len(tokenized) <= 3 * BLOCK // 8, f"{len(tokenized)} documents tokenized for 3 blocks"


def test_bad_rows_are_counted_once_however_often_the_stream_is_read(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": "good one"}, {"text": ""}, {"text": "good two"}, {"text": 3}, {"text": "good three"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(bad_rows="drop")
    dropped = streaming.Dropped("drop", "cpt.data")
    read = _stream(str(path), data, dropped)
    assert [d.text for d in islice(read(), 2)] == ["good one", "good two"]
    assert [d.text for d in read()] == ["good one", "good two", "good three"]  # read again, as a resume does
    assert dropped.count == 2
    with pytest.raises(BadRowsError, match=r"corpus.jsonl:2: field 'text'.*bad_rows: drop"):
        list(_stream(str(path), DataConfig())())


def test_sources_streaming_cannot_read_are_refused(tmp_path):
    array = tmp_path / "corpus.json"
    array.write_text(json.dumps([{"text": "one"}]))
    with pytest.raises(DataError, match=r"corpus.json: .*\.json array is parsed whole: convert it to \.jsonl"):
        list(_stream(str(array), DataConfig())())
    with pytest.raises(ConfigError, match=r"cpt.data.train\[1\].weight: .*cannot be weighted"):
        streaming.sources([str(array), {"path": str(array), "weight": 2}], "cpt.data.train")
    with pytest.raises(DataError, match="missing.txt.*cannot be read as a stream"):
        list(_stream(str(tmp_path / "missing.txt"), DataConfig())())


def _config(*overrides):
    return load_config(SMOKE, ["cpt.data.streaming=true", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["cpt.trainer.max_steps=-1", "cpt.data.eval_documents=2"],
     r"cpt.data.streaming needs cpt.trainer.max_steps .*cannot tell how many steps an epoch is"),
    ([], r"cpt.data.eval_split \(0.05\) is a fraction of the corpus.*set cpt.data.eval_documents"),
    (["cpt.data.eval_documents=2", "cpt.data.eval=data/cpt/beekeeping.txt"], "both name held-out documents"),
    (["cpt.data.eval_documents=-1"], "must be a count of documents"),
    (["sft.data.streaming=true", "cpt.data.eval_split=0"], "sft.data.streaming: only cpt streams its corpus"),
])
def test_what_streaming_cannot_do_is_refused_with_the_key_to_set(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(*overrides)


def test_check_and_validate_read_a_sample_and_hold_out_the_first_documents(tmp_path, monkeypatch, tokenizer):
    """A bad record after the sample is not read by check or validate (the training stream meets it); the held-out
    documents are the first eval_documents, and every one of them cannot be held out."""
    from stages import cpt

    monkeypatch.chdir(REPO)
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": p} for p in PARAGRAPHS] + [{"text": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(f"cpt.data.train={path}", "cpt.data.eval_documents=5")
    assert "the first 64 training documents read as a sample" in cpt.check(config)
    text, sample = cpt.summarise(config, tokenizer)
    assert "5 held-out documents (the first ones)" in text and len(sample["input_ids"]) == 128
    read, held_out, _ = cpt.streamed(config)
    assert [d.text for d in held_out] == PARAGRAPHS[:5]
    assert next(read()).text == PARAGRAPHS[5]
    with pytest.raises(ConfigError, match=r"eval_documents \(200\) holds out every document .*it has 167"):
        cpt.streamed(_config(f"cpt.data.train={path}", "cpt.data.eval_documents=200",
                             "cpt.data.bad_rows=drop"))


def test_a_streamed_hub_dataset_is_hashed_without_loading_it(tmp_path, monkeypatch):
    build_hub_dataset_cache(tmp_path, "acme/corpus", {"train": [{"text": p} for p in PARAGRAPHS[:4]]})
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path)

    def refuse(source):
        raise AssertionError(f"{source} loaded whole")

    monkeypatch.setattr(sources_module, "load_dataset", refuse)
    value = {"name": "acme/corpus"}
    assert hash_sources(value, streaming=True) == hash_sources(value, streaming=True)
    assert [d.text for d in _stream(value, DataConfig())()] == PARAGRAPHS[:4]
    with pytest.raises(AssertionError, match="loaded whole"):
        hash_sources(value)
