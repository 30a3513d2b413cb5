"""Every reader of a file a user (or a killed run) hands the pipeline, fed arbitrary content: it returns, or raises
one of our errors (a PipelineError, which the CLI prints as one line); never a traceback from deep inside.

The records are drawn from the readers' own field names and role words, so the fuzz reaches past the JSON parser
into each format's checks, as well as raw bytes. max_examples keeps the whole file to a few seconds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import PipelineError

FIELDS = ["messages", "role", "content", "conversations", "from", "value", "instruction", "input", "output",
          "system", "history", "text", "prompt", "chosen", "rejected", "response_a", "response_b", "winner",
          "pair_id", "id", "source", "confidence", "judge", "created_at", "verdicts", "status", "stage", "metrics"]
WORDS = ["user", "assistant", "system", "human", "gpt", "model", "robot", "a", "b", "tie", "", " ", "\n\nHuman: q",
         "\n\nAssistant: r", "\n\nHuman: q\n\nAssistant: r", "<start>q<sep>a<eos>", "<sep>", "\u2028", "\ufeff"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.sampled_from(WORDS),
                    st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4)), max_leaves=12)
records = st.dictionaries(st.sampled_from(FIELDS), values, max_size=5)


def jsonl(items: list) -> bytes:
    return "\n".join(json.dumps(item) for item in items).encode()


contents = st.one_of(
    st.binary(max_size=200),
    st.lists(records, min_size=1, max_size=4).map(jsonl),
    st.lists(st.one_of(records, values), min_size=1, max_size=3).map(lambda items: json.dumps(items).encode()),
    st.lists(records, min_size=1, max_size=3).map(jsonl).map(lambda raw: raw[: len(raw) * 2 // 3]),  # torn
)


def _readers():
    from pipeline import data
    from pipeline.artifacts import read_json
    from pipeline.config import load_config
    from pipeline.report import read_jsonl
    from reward import importers
    from reward.judges import HumanFileJudge
    from reward.pairs import LabelStore

    readers = {
        "texts": (".txt", data.load_texts), "texts_jsonl": (".jsonl", data.load_texts),
        "labels": (".jsonl", lambda path: LabelStore(path).labels()),
        "human_file": (".jsonl", HumanFileJudge),
        "prompts": (".jsonl", importers.load_prompts), "pairs": (".json", importers.load_pairs),
        "manifest": (".json", read_json), "metrics": (".jsonl", read_jsonl), "config": (".yaml", load_config),
        "delimited_txt": (".txt", data.load_conversations),
    }
    for fmt in ("auto", "messages", "sharegpt", "alpaca", "delimited"):
        readers[f"conversations_{fmt}"] = (".jsonl", lambda path, fmt=fmt: data.load_conversations(path, fmt))
    for fmt in ("auto", "prompt", "hh", "sharegpt"):
        readers[f"preferences_{fmt}"] = (".jsonl", lambda path, fmt=fmt: importers.load_preferences(path, fmt))
    return readers


READERS = _readers()


@pytest.mark.parametrize("reader", READERS)
def test_reader_raises_only_our_errors(reader):
    suffix, read = READERS[reader]

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(content=contents)
    def check(content: bytes):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"input{suffix}"
            path.write_bytes(content)
            try:
                read(path)
            except PipelineError as exc:
                assert str(exc).strip()

    check()
