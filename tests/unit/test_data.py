import json
from pathlib import Path

import pytest

from pipeline.data import (
    Conversation, Delimiters, Document, detect_format, load_conversations, load_texts,
)
from pipeline.errors import ConfigError, DataError
from pipeline.records import read_records

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "formats"


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# ---------------------------------------------------------------------------- formats load

def test_messages():
    path = fixture("messages.jsonl")
    convs = load_conversations(path, "messages")
    assert [c.source for c in convs] == [f"{path}:1", f"{path}:2", f"{path}:4"]  # line 3 is blank
    assert convs[1] == Conversation(
        (msg("system", "You are terse."), msg("user", "Capital of France?"), msg("assistant", "Paris.")), f"{path}:2")
    assert convs[2].messages[-1] == msg("assistant", "  Fine,\n thanks.  ")  # content kept as-is


def test_sharegpt():
    path = fixture("sharegpt.jsonl")
    convs = load_conversations(path, "sharegpt")
    assert len(convs) == 3
    assert convs[0].messages == (msg("user", "Name a primary colour."), msg("assistant", "Red."))
    assert convs[1].messages == (
        msg("system", "Answer in French."), msg("user", "Hello"), msg("assistant", "Bonjour"),
        msg("user", "Thanks"), msg("assistant", "Merci"))
    assert convs[2].messages[0] == msg("system", "Be brief.")


def test_alpaca_json_array_keeps_element_lines():
    path = fixture("alpaca.json")
    convs = load_conversations(path, "alpaca")
    assert [c.source for c in convs] == [f"{path}:2", f"{path}:7", f"{path}:12"]
    assert convs[0].messages == (msg("user", "Translate to German.\n\nGood morning"), msg("assistant", "Guten Morgen"))
    assert convs[1].messages == (msg("user", "Give a synonym for happy."), msg("assistant", "Joyful."))
    assert convs[2].messages == (
        msg("system", "You summarise documents."), msg("user", "Summarise the text."), msg("assistant", "It is short."))


def test_alpaca_history_comes_first():
    convs = load_conversations(fixture("alpaca_history.jsonl"), "alpaca")
    assert len(convs) == 2
    assert convs[0].messages == (
        msg("user", "What is 1 + 1?"), msg("assistant", "2"), msg("user", "And 2 + 2?"), msg("assistant", "4"),
        msg("user", "And 3 + 3?"), msg("assistant", "6"))
    assert convs[1].messages == (msg("user", "Say hi."), msg("assistant", "Hi!"))


def test_delimited_txt_one_sample_per_line():
    path = fixture("delimited.txt")
    convs = load_conversations(path, "delimited")
    assert [c.source for c in convs] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert convs[0].messages == (msg("user", "What is the capital of Italy?"), msg("assistant", "Rome"))
    assert convs[1].messages == (
        msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "What can you do?"),
        msg("assistant", "Answer questions."))


def test_delimited_jsonl_samples_may_span_lines():
    convs = load_conversations(fixture("delimited.jsonl"), "delimited")
    assert convs[0].messages == (
        msg("user", "Write a haiku line."), msg("assistant", "An old silent pond\nA frog jumps in"))
    assert convs[1].messages == (msg("user", "Q1"), msg("assistant", "A1"), msg("user", "Q2"), msg("assistant", "A2"))


def test_custom_delimiters(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("### Q: hi ### A: hello <END>\n")
    convs = load_conversations(path, delimiters=Delimiters("### Q:", "### A:", "<END>"))
    assert convs[0].messages == (msg("user", " hi "), msg("assistant", " hello "))


def test_delimiters_must_be_distinct_and_non_empty():
    with pytest.raises(ConfigError):
        Delimiters(start="")
    with pytest.raises(ConfigError):
        Delimiters(sep="<eos>")


def test_cpt_txt_documents_split_on_blank_lines():
    path = fixture("cpt.txt")
    assert load_texts(path) == [
        Document("The first document has\ntwo lines.", f"{path}:1"),
        Document("The second document is one line.", f"{path}:4"),
        Document("  The third document starts indented\nand ends here.", f"{path}:8"),
    ]


def test_cpt_jsonl():
    path = fixture("cpt.jsonl")
    assert load_texts(path) == [
        Document("Plain text for pretraining.", f"{path}:1"),
        Document("Second document,\nwith a newline.", f"{path}:3"),
    ]


@pytest.mark.parametrize("name, fmt, count", [
    ("messages.jsonl", "messages", 3),
    ("sharegpt.jsonl", "sharegpt", 3),
    ("alpaca.json", "alpaca", 3),
    ("alpaca_history.jsonl", "alpaca", 2),
    ("delimited.txt", "delimited", 3),
    ("delimited.jsonl", "delimited", 2),
])
def test_auto_detects_each_format(name, fmt, count):
    auto = load_conversations(fixture(name))
    assert len(auto) == count
    assert auto == load_conversations(fixture(name), fmt)


@pytest.mark.parametrize("record, fmt", [
    ({"messages": []}, "messages"),
    ({"conversations": []}, "sharegpt"),
    ({"instruction": "a", "output": "b"}, "alpaca"),
    ({"text": "<start>a<sep>b<eos>"}, "delimited"),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_detect_format_rejects_unknown_shape():
    with pytest.raises(ValueError, match="cannot detect"):
        detect_format({"question": "a", "answer": "b"})


# ---------------------------------------------------------------------------- columns and config

RENAMED = {"instruction": "prompt", "input": "context", "output": "response", "system": "sys"}


@pytest.mark.parametrize("fmt", ["alpaca", "auto"])
def test_column_mapping(fmt):
    convs = load_conversations(fixture("alpaca_renamed.jsonl"), fmt, columns=RENAMED)
    assert convs[0].messages == (
        msg("system", "You play with words."), msg("user", "Reverse the word.\n\nstressed"),
        msg("assistant", "desserts"))
    assert convs[1].messages == (msg("user", "Spell cat backwards."), msg("assistant", "tac"))


def test_column_mapping_names_file_fields_in_errors(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"turns": [{"speaker": "human", "said": "hi"}, {"speaker": "bot", "said": "yo"}]}))
    with pytest.raises(DataError) as info:
        load_conversations(path, "sharegpt", columns={"conversations": "turns", "from": "speaker", "value": "said"})
    assert (info.value.line, info.value.field) == (1, "turns[1].speaker")
    assert "unknown role 'bot'" in str(info.value)


def test_column_mapping_for_texts(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"body": "hello"}\n')
    assert load_texts(path, columns={"text": "body"}) == [Document("hello", f"{path}:1")]


def test_unknown_column_is_config_error():
    with pytest.raises(ConfigError, match="outptu"):
        load_conversations(fixture("alpaca.json"), "alpaca", columns={"outptu": "response"})


@pytest.mark.parametrize("fmt, fragment", [("chatml", "unknown data format 'chatml'"), ("text", "pretraining")])
def test_bad_format_is_config_error(fmt, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        load_conversations(fixture("messages.jsonl"), fmt)
    assert "auto, delimited, alpaca, sharegpt, messages" in str(info.value)


def test_read_records_lines(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('[{"a": 1},\n\n  {"b": [\n 2]}, {"c": 3}\n]\n')
    assert list(read_records(path)) == [(1, {"a": 1}), (3, {"b": [2]}), (4, {"c": 3})]


def test_data_error_message_format(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "x", "output": "y"}\n' * 2 + '{"instruction": "x", "output": ""}\n')
    with pytest.raises(DataError) as info:
        load_conversations(path, "alpaca")
    assert str(info.value).startswith(f"{path}:3: field 'output' must be a non-empty string")


# ---------------------------------------------------------------------------- malformed input

def line(obj) -> str:
    return json.dumps(obj) + "\n"


def turns(*pairs) -> dict:
    return {"messages": [msg(role, content) for role, content in pairs]}


GOOD = line(turns(("user", "q"), ("assistant", "a")))
ALPACA = {"instruction": "q", "output": "a"}

# id, file name, content (bytes for raw), loader, kwargs, line, field, message fragment
MALFORMED = [
    ("bad-json-line-3", "m.jsonl", GOOD * 2 + '{"messages": [\n', "conv", {}, 3, None, "invalid JSON"),
    ("json-array-not-closed", "a.json", '[\n  {"instruction": "q", "output": "a"}\n', "conv", {}, 3, None,
     "never closed"),
    ("bad-json-array-line-3", "a.json", '[\n  {"instruction": "q", "output": "a"}\n  {"x": 1}\n]', "conv", {},
     3, None, "expected ',' or ']'"),
    ("missing-field", "a.jsonl", line({"instruction": "q"}), "conv", {"format": "alpaca"}, 1, "output",
     "required but missing"),
    ("wrong-type", "a.jsonl", line({"instruction": "q", "output": 5}), "conv", {"format": "alpaca"}, 1, "output",
     "must be a string, found number"),
    ("empty-response", "a.jsonl", line(ALPACA) + line({"instruction": "q", "output": "  "}), "conv", {}, 2,
     "output", "non-empty"),
    ("empty-instruction", "a.jsonl", line({"instruction": "", "input": "x", "output": "a"}), "conv", {}, 1,
     "instruction", "non-empty"),
    ("unknown-role", "m.jsonl", line(turns(("bot", "q"), ("assistant", "a"))), "conv", {}, 1, "messages[0].role",
     "unknown role 'bot'; valid roles: system, user, assistant"),
    ("content-null", "m.jsonl", line({"messages": [msg("user", None), msg("assistant", "a")]}), "conv", {}, 1,
     "messages[0].content", "found null"),
    ("empty-file", "m.jsonl", "", "conv", {}, None, None, "empty"),
    ("blank-lines-only", "m.jsonl", "\n  \n\n", "conv", {}, None, None, "empty"),
    ("empty-array", "m.json", "[ ]", "conv", {}, None, None, "empty"),
    ("non-utf8-line-2", "t.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "text", {}, 2, None, "UTF-8"),
    ("top-level-not-array", "m.json", "\n" + json.dumps(turns(("user", "q"), ("assistant", "a"))), "conv", {}, 2,
     None, "must be a JSON array of objects, found object"),
    ("element-not-object", "a.json", '[\n  {"instruction": "q", "output": "a"},\n  42\n]', "conv", {}, 3, None,
     "expected a JSON object, found number"),
    ("jsonl-line-not-object", "m.jsonl", GOOD + "[1, 2]\n", "conv", {}, 2, None, "found array"),
    ("ends-with-user", "m.jsonl", line(turns(("user", "q"), ("assistant", "a"), ("user", "q2"))), "conv", {}, 1,
     "messages[2].role", "end with an assistant turn"),
    ("not-alternating", "m.jsonl", line(turns(("user", "q"), ("user", "q2"), ("assistant", "a"))), "conv", {}, 1,
     "messages[1].role", "is 'user', but this turn must be the assistant's"),
    ("starts-with-assistant", "m.jsonl", line(turns(("assistant", "a"), ("user", "q"))), "conv", {}, 1,
     "messages[0].role", "must be the user's"),
    ("system-not-first", "m.jsonl", line(turns(("user", "q"), ("system", "s"), ("assistant", "a"))), "conv", {}, 1,
     "messages[1].role", "only allowed as the first message"),
    ("system-only", "m.jsonl", line(turns(("system", "s"))), "conv", {}, 1, "messages", "at least one user"),
    ("messages-not-list", "m.jsonl", line({"messages": "hi"}), "conv", {}, 1, "messages",
     "must be an array, found string"),
    ("messages-empty", "m.jsonl", line({"messages": []}), "conv", {}, 1, "messages", "at least one user"),
    ("delimited-missing-sep", "d.txt", "<start>q<sep>a<eos>\n<start>q a<eos>\n", "conv", {}, 2, None,
     "turn 1 is missing '<sep>'"),
    ("delimited-missing-eos", "d.txt", "<start>q<sep>a\n", "conv", {}, 1, None, "turn 1 is missing '<eos>'"),
    ("delimited-missing-eos-mid", "d.txt", "<start>q<sep>a<start>q2<sep>a2<eos>\n", "conv", {}, 1, None,
     "turn 1 is missing '<eos>'"),
    ("delimited-missing-start", "d.txt", "q<sep>a<eos>\n", "conv", {}, 1, None, "text outside a turn"),
    ("delimited-stray-text", "d.txt", "<start>q<sep>a<eos> thanks\n", "conv", {}, 1, None,
     "text outside a turn: 'thanks'"),
    ("delimited-two-seps", "d.txt", "<start>q<sep>a<sep>b<eos>\n", "conv", {}, 1, None, "more than one '<sep>'"),
    ("delimited-empty-answer", "d.jsonl", line({"text": "<start>q<sep>a<eos><start>q2<sep> <eos>"}), "conv", {}, 1,
     "text", "turn 2 has an empty answer"),
    ("delimited-empty-question", "d.txt", "<start><sep>a<eos>\n", "conv", {}, 1, None, "empty question"),
    ("alpaca-history-not-pair", "a.jsonl", line({**ALPACA, "history": [["q0", "a0"], ["only one"]]}), "conv", {},
     1, "history[1]", "pair, found 1 items"),
    ("alpaca-history-not-list", "a.jsonl", line({**ALPACA, "history": "q0"}), "conv", {}, 1, "history",
     "must be an array, found string"),
    ("alpaca-history-empty-answer", "a.jsonl", line({**ALPACA, "history": [["q0", ""]]}), "conv", {}, 1,
     "history[0][1]", "non-empty"),
    ("sharegpt-value-not-string", "s.jsonl",
     line({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]}), "conv", {}, 1,
     "conversations[1].value", "must be a string, found number"),
    ("sharegpt-unknown-from", "s.jsonl", line({"conversations": [{"from": "bot", "value": "q"}]}), "conv", {}, 1,
     "conversations[0].from", "valid roles: human, user, gpt"),
    ("sharegpt-missing-from", "s.jsonl", line({"conversations": [{"value": "q"}]}), "conv", {}, 1,
     "conversations[0].from", "required but missing"),
    ("sharegpt-turn-not-object", "s.jsonl", line({"conversations": ["hi"]}), "conv", {}, 1, "conversations[0]",
     "must be an object, found string"),
    ("sharegpt-system-twice", "s.jsonl", line({"system": "s", "conversations": [
        {"from": "system", "value": "s2"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
     "conv", {}, 1, "conversations[0].from", "only allowed as the first message"),
    ("auto-undetectable", "x.jsonl", line({"question": "q", "answer": "a"}), "conv", {}, 1, None, "cannot detect"),
    ("auto-later-record-differs", "x.jsonl", GOOD + line(ALPACA), "conv", {}, 2, "messages", "required but missing"),
    ("txt-for-record-format", "a.txt", "hello\n", "conv", {"format": "alpaca"}, None, None, "delimited samples"),
    ("file-not-found", None, None, "conv", {}, None, None, "file not found"),
    ("unsupported-extension", "data.csv", "instruction,output\n", "conv", {}, None, None,
     "unsupported file extension '.csv'; supported: .txt, .jsonl, .json"),
    ("records-unsupported-extension", "data.txt", "hello\n", "records", {}, None, None, "supported: .jsonl, .json"),
    ("cpt-empty-text", "t.jsonl", line({"text": "ok"}) + line({"text": "   "}), "text", {}, 2, "text", "non-empty"),
    ("cpt-missing-text", "t.json", '[\n {"body": "x"}\n]', "text", {}, 2, "text", "required but missing"),
    ("cpt-empty-txt", "t.txt", " \n\n", "text", {}, None, None, "empty"),
]

LOADERS = {"conv": load_conversations, "text": load_texts, "records": lambda path: list(read_records(path))}


@pytest.mark.parametrize("name, content, loader, kwargs, line_no, field, fragment",
                         [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed(tmp_path, name, content, loader, kwargs, line_no, field, fragment):
    path = tmp_path / (name or "missing.jsonl")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        LOADERS[loader](str(path), **kwargs)
    error = info.value
    assert (error.path, error.line, error.field) == (str(path), line_no, field)
    assert fragment in str(error)
