import json

import pytest

from pipeline.errors import DataError
from reward.pairs import Label, LabelStore, Pair, pair_id, preference_rows, write_preferences

PROMPT = [{"role": "user", "content": "Name a colour."}]


def make_pairs(n: int) -> list[Pair]:
    return [Pair.create(PROMPT, f"red {i}", f"blue {i}", f"prompts.jsonl:{i + 1}") for i in range(n)]


def test_pair_id_is_stable_and_order_sensitive():
    assert pair_id(PROMPT, "x", "y") == pair_id([dict(PROMPT[0])], "x", "y")
    assert pair_id(PROMPT, "x", "y") != pair_id(PROMPT, "y", "x")
    # A fixed value: the id must not depend on the interpreter's hash seed or version, or resume would break.
    assert pair_id(PROMPT, "x", "y") == Pair.create(PROMPT, "x", "y", "f:1").id == "75d9a19c6c48a0992c8b"


def test_label_rejects_unknown_winner():
    with pytest.raises(ValueError, match="winner"):
        Label("p", "c", "rule")


def test_store_resumes_after_reopen(tmp_path):
    path = tmp_path / "labels.jsonl"
    pairs = make_pairs(4)
    with LabelStore(path) as store:
        for pair, winner in zip(pairs, ("a", "b", "tie")):
            store.add(Label(pair.id, winner, "rule:t", verdicts={"ab": winner, "ba": winner}))
        with pytest.raises(ValueError, match="already labelled"):
            store.add(Label(pairs[0].id, "b", "rule:t"))
    assert len(path.read_text().splitlines()) == 3

    store = LabelStore(path)
    assert [store.is_labelled(p.id) for p in pairs] == [True, True, True, False]
    assert store.get(pairs[1].id).winner == "b"
    assert store.get(pairs[0].id).verdicts == {"ab": "a", "ba": "a"}
    store.add(Label(pairs[3].id, "a", "rule:t"))
    store.close()
    assert len(LabelStore(path)) == 4


def test_truncated_last_line_is_ignored_with_a_warning_and_cut_before_appending(tmp_path, capsys):
    path = tmp_path / "labels.jsonl"
    pairs = make_pairs(3)
    with LabelStore(path) as store:
        store.add(Label(pairs[0].id, "a", "human"))
        store.add(Label(pairs[1].id, "b", "human"))
    full = path.read_bytes()
    path.write_bytes(full + b'{"pair_id": "' + pairs[2].id.encode()[:7])  # a crash mid-write

    store = LabelStore(path)
    err = " ".join(capsys.readouterr().err.split())
    assert "warning" in err and "incomplete" in err
    assert len(store) == 2 and not store.is_labelled(pairs[2].id)
    store.add(Label(pairs[2].id, "tie", "human"))
    store.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["winner"] == "tie"
    assert len(LabelStore(path)) == 3


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "labels.jsonl"
    pairs = make_pairs(2)
    with LabelStore(path) as store:
        store.add(Label(pairs[0].id, "a", "human"))
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with LabelStore(path) as store:
        assert store.is_labelled(pairs[0].id)
        store.add(Label(pairs[1].id, "b", "human"))
    assert len(LabelStore(path)) == 2


@pytest.mark.parametrize("bad, field", [
    ("{not json", None),
    ('{"pair_id": "x", "winner": "c", "judge": "h", "created_at": "t"}', "winner"),
    ('{"winner": "a", "judge": "h", "created_at": "t"}', "pair_id"),
    ('{"pair_id": "x", "winner": "a", "judge": "h", "created_at": "t", "confidence": "high"}', "confidence"),
])
def test_bad_middle_line_is_a_data_error(tmp_path, bad, field):
    path = tmp_path / "labels.jsonl"
    good = json.dumps(Label("p1", "a", "h").to_dict())
    path.write_text(f"{good}\n{bad}\n{json.dumps(Label('p2', 'b', 'h').to_dict())}\n")
    with pytest.raises(DataError) as info:
        LabelStore(path)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, field)


def test_duplicate_pair_in_store_is_a_data_error(tmp_path):
    path = tmp_path / "labels.jsonl"
    line = json.dumps(Label("p1", "a", "h").to_dict())
    path.write_text(f"{line}\n{line}\n")
    with pytest.raises(DataError, match="labelled twice") as info:
        LabelStore(path)
    assert info.value.line == 2


def test_preference_rows_exclude_and_count_ties(tmp_path):
    pairs = make_pairs(4)
    labels = [Label(pairs[0].id, "a", "j", 0.9), Label(pairs[1].id, "b", "j"), Label(pairs[2].id, "tie", "j"),
              Label("not-a-pair", "a", "j")]
    rows, counts = preference_rows(pairs, labels)
    assert (counts.rows, counts.ties, counts.unlabelled, counts.unknown_labels) == (2, 1, 1, 1)
    assert (rows[0].chosen, rows[0].rejected, rows[0].confidence) == ("red 0", "blue 0", 0.9)
    assert (rows[1].chosen, rows[1].rejected, rows[1].tie) == ("blue 1", "red 1", False)
    assert rows[1].source == "prompts.jsonl:2" and rows[1].prompt == PROMPT

    with_ties, counts = preference_rows(pairs, labels, include_ties=True)
    assert counts.rows == 3 and with_ties[2].tie

    out = tmp_path / "prefs" / "train.jsonl"
    assert write_preferences(out, rows) == 2
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(written[0]) >= {"prompt", "chosen", "rejected", "judge", "tie", "confidence"}
    assert written[1]["chosen"] == "blue 1" and not (tmp_path / "prefs" / "train.jsonl.partial").exists()
