"""Datasets as users have them: parquet, compressed JSON Lines, dataset directories, Hub datasets from the
`datasets` cache (offline), and several sources mixed with weights."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import build_hub_dataset_cache

from pipeline.data import load_conversations, load_texts
from pipeline.errors import ConfigError, DataError
from pipeline.records import BadRows
from pipeline.sources import Source, hash_sources, parse, read_all
from reward.importers import load_preferences


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


RECORDS = [chat(f"q{i}", f"a{i}") for i in range(4)]


def test_jsonl_gz_and_json_gz(tmp_path):
    gz = tmp_path / "chat.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in RECORDS).encode()))
    assert [c.messages[0]["content"] for c in load_conversations(Source(path=str(gz)))] == ["q0", "q1", "q2", "q3"]
    assert len(load_conversations(str(gz))) == 4
    text = tmp_path / "corpus.txt.gz"
    text.write_bytes(gzip.compress(b"one\n\ntwo\n"))
    assert [d.text for d in load_texts(str(text))] == ["one", "two"]
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a valid gzip file"):
        load_conversations(str(broken))


def test_parquet_rows_and_errors_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad", "score_chosen": 5.0, "score_rejected": 1.0},
            {"prompt": "q2", "chosen": "", "rejected": "bad", "score_chosen": 2.0, "score_rejected": 1.0}]
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    bad = BadRows()
    [row] = load_preferences(str(path), bad=bad)
    assert (row.chosen, row.rejected) == ("good", "bad")
    assert (bad.errors[0].path, bad.errors[0].line, bad.errors[0].field) == (str(path), 2, "chosen")


def test_dataset_directory_saved_with_save_to_disk(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                          "test": datasets.Dataset.from_list(RECORDS[:1])}).save_to_disk(str(tmp_path / "ds"))
    assert len(load_conversations(Source(path=str(tmp_path / "ds")))) == 4
    assert len(load_conversations(Source(path=str(tmp_path / "ds"), split="test"))) == 1
    with pytest.raises(DataError, match="has no split 'dev'"):
        load_conversations(Source(path=str(tmp_path / "ds"), split="dev"))


def test_hub_dataset_offline_from_the_cache(tmp_path, monkeypatch):
    import datasets

    cache = build_hub_dataset_cache(tmp_path / "hf-datasets", "acme/chats", {"train": RECORDS, "test": RECORDS[:2]})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    [source] = parse({"name": "acme/chats", "split": "test"}, "sft.data.train")
    conversations = load_conversations(source)
    assert [c.source for c in conversations] == ["acme/chats(test):1", "acme/chats(test):2"]
    assert hash_sources({"name": "acme/chats", "split": "test"}) != hash_sources({"name": "acme/chats"})
    with pytest.raises(DataError, match=r"acme/missing\(train\): cannot load the dataset \(offline"):
        load_conversations(Source(name="acme/missing"))


def test_sources_mixed_with_weights(tmp_path):
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    small.write_text(json.dumps(chat("s", "x")) + "\n")
    large.write_text("".join(json.dumps(chat(f"l{i}", "y")) + "\n" for i in range(10)))
    value = [{"path": str(small), "weight": 3}, {"path": str(large), "weight": 0.5}]
    mixed = read_all(value, "sft.data.train", load_conversations, seed=1)
    questions = [c.messages[0]["content"] for c in mixed]
    assert questions[:3] == ["s", "s", "s"] and len(questions) == 8 and len(set(questions[3:])) == 5
    assert questions == [c.messages[0]["content"] for c in read_all(value, "k", load_conversations, seed=1)]


@pytest.mark.parametrize("value, fragment", [
    ({"path": "a.jsonl", "wieght": 2}, "unknown key 'sft.data.train.wieght' (did you mean 'weight'?)"),
    ([{"path": "a.jsonl"}, {"split": "train"}], "sft.data.train[1] needs one of path"),
    ({"path": "a.jsonl", "weight": 0}, "weight must be a positive number"),
    ({"path": "a.jsonl", "revision": "main"}, "revision applies to Hub datasets"),
    ([], "empty list"),
])
def test_bad_source_specs(value, fragment):
    with pytest.raises(ConfigError) as info:
        parse(value, "sft.data.train")
    assert fragment in str(info.value)
