"""Load dataset files into one internal schema, validating every record strictly.

Raw text for continued pretraining (`load_texts`) becomes `Document`s:
  - .txt:   documents separated by one or more blank lines (format text, the default), or one document per
            non-blank line (format lines)
  - .jsonl / .json: records with a "text" field

Chat data for SFT (`load_conversations`) becomes `Conversation`s, whose messages are
{"role": "system"|"user"|"assistant"|"tool", "content": str} (an assistant turn may add "tool_calls"), with the
record's tool definitions beside them. Accepted formats:
  - messages:  {"messages": [{"role": ..., "content": ...}, ...], "tools": [...]} (OpenAI's shape: content may be a
               list of parts, tool calls as "tool_calls" and results as role "tool")
  - sharegpt:  {"conversations": [{"from": "human"|"gpt"|"function_call"|"observation"|..., "value": ...}],
               "system": ..., "tools": ...}
  - alpaca:    {"instruction", "input", "output", "system", "history": [[user, assistant], ...]}
  - delimited: samples like "<start>question<sep>answer<eos>", repeated for more turns;
               one per non-blank line of a .txt file, or in the "text" field of a record
  - auto:      picked from the first record's fields (.txt files are delimited)

`columns` renames fields: it maps our canonical name to the file's, e.g. {"output": "response"}.
Errors are DataErrors naming the file, the line where the record starts, and the field as
the file spells it (e.g. "conversations[2].from"), so the user can fix the data directly. With a `BadRows`, the
loaders keep going past a bad record and gather them all (pipeline.records).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Iterator, Mapping

from pipeline import tool_calls
from pipeline.config import CONVERSATION_FORMATS, TEXT_FORMATS
from pipeline.errors import ConfigError, DataError
from pipeline.records import (
    RECORD_SUFFIXES, BadRows, FieldUse, check_suffix, guarded, json_type, lines, read_records, read_text,
    refuse_media,
)

FORMATS = ("text", *CONVERSATION_FORMATS)
_CHAT_FORMATS = ("auto",) + tuple(f for f in FORMATS if f != "text")
_ALL_SUFFIXES = (".txt",) + RECORD_SUFFIXES

# Canonical field names each format reads; `columns` may rename exactly these.
_FIELDS = {
    "text": ("text",),
    "delimited": ("text",),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "from", "value", "system", "tools"),
    "messages": ("messages", "role", "content", "tools"),
}
# Top-level fields a record may carry that mark an answer as desirable or not (KTO's label, LLaMA-Factory's kto_tag).
_DESIRABILITY = ("label", "kto_tag")
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system", "function_call": "assistant", "observation": "tool"}
# Content parts that hold text (OpenAI chat and Responses shapes); any other kind is refused.
_TEXT_PARTS = ("text", "input_text", "output_text")
_EXPECTED = {str: "a string", list: "an array"}
_SPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class Delimiters:
    start: str = "<start>"
    sep: str = "<sep>"
    eos: str = "<eos>"

    def __post_init__(self):
        # Empty or repeated delimiters would make every sample ambiguous.
        if not all((self.start, self.sep, self.eos)) or len({self.start, self.sep, self.eos}) < 3:
            raise ConfigError(f"delimiters must be non-empty and distinct, got {self!r}")


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "path:line"


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]
    source: str  # "path:line" where the record starts
    tools: tuple[dict, ...] = field(default=())
    """Tool definitions the chat template renders beside the messages ({"type": "function", "function": ...})."""


@dataclass
class Split:
    """A stage's records: (train, held-out), and what was left out on the way, counted for stage.json."""
    train: list
    held_out: list
    dropped: dict = field(default_factory=dict)
    """{"data/dropped_bad_rows": n, "data/dropped_ties": n, ...}"""

    def __iter__(self):  # train, held_out = split
        return iter((self.train, self.held_out))


# ---------------------------------------------------------------------------- record fields

@dataclass(frozen=True)
class _Record:
    data: dict
    path: str
    line: int
    columns: Mapping[str, str]

    def name(self, canonical: str) -> str:
        return self.columns.get(canonical, canonical)

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(self.path, self.line, field, message)

    def field(self, canonical: str, kind: type, required: bool = True, nonempty: bool = False) -> Any:
        name = self.name(canonical)
        # Exports often write absent optional columns as null, so null means "not given".
        if not required and self.data.get(name) is None:
            return None
        if name not in self.data:
            raise self.error(name, "is required but missing")
        value = self.data[name]
        if not isinstance(value, kind):
            raise self.error(name, f"must be {_EXPECTED[kind]}, found {json_type(value)}")
        if nonempty and not value.strip():
            raise self.error(name, "must be a non-empty string")
        return value


def _check_columns(columns: Mapping[str, str], fmt: str) -> None:
    unknown = sorted(set(columns) - set(_FIELDS[fmt]))
    if unknown:
        raise ConfigError(f"columns {unknown} are not fields of the {fmt!r} format; "
                          f"it has: {', '.join(_FIELDS[fmt])}")


def text_content(value: Any, field: str | None, error) -> Any:
    """A message's content as text: a string as it is, a list of parts (OpenAI's shape) as its text parts joined as
    chat templates render them, one after the other. A part of another kind (an image, audio) is refused: a text-only
    model cannot use it. Anything else is returned as it is, for the caller's type check."""
    if not isinstance(value, list):
        return value
    texts = []
    for index, part in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(part, dict):
            raise error(where, f"must be a content part {{\"type\": \"text\", \"text\": ...}}, found {json_type(part)}")
        kind = part.get("type", "text" if "text" in part else None)
        if kind not in _TEXT_PARTS:
            raise error(f"{where}.type", f"is {kind!r}: only text parts can be trained on (this pipeline trains "
                                         "text-only language models); remove the part, or the record")
        text = part.get("text")
        if not isinstance(text, str):
            raise error(f"{where}.text", f"must be a string, found {json_type(text)}")
        texts.append(text)
    return "".join(texts)


def refuse_undesirable(data: dict, error) -> None:
    """A KTO-style record marked undesirable (label: false): supervised training would teach the model its answer."""
    for name in _DESIRABILITY:
        if data.get(name) is False:
            raise error(name, "is false: this is a KTO-style record whose answer is marked undesirable, and "
                              "supervised fine-tuning would teach the model to give it; remove such records (or set "
                              "data.bad_rows: drop to leave them out, counted)")


# ---------------------------------------------------------------------------- pretraining text

def text_documents(numbered: Iterator[tuple[int, str]], path, format: str) -> Iterator[Document]:
    """The documents of a .txt file's (line number, line) pairs: blank-line-separated paragraphs (format text or
    auto), or each non-blank line (lines). Lazy, so a streamed file is never held whole."""
    found = numbered if format == "lines" else _paragraphs(numbered)
    return (Document(body, f"{path}:{line}") for line, body in found if body.strip())


def _paragraphs(numbered: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    for blank, group in groupby(numbered, key=lambda item: not item[1].strip()):
        if not blank:
            found = list(group)
            yield found[0][0], "\n".join(line for _, line in found)


def record_document(data: dict, path, line: int, columns: Mapping[str, str]) -> Document:
    """One record's document: its (renamed) text field, a non-empty string; media fields are refused."""
    rec = _Record(data, str(path), line, columns)
    refuse_media(data, rec.error)
    return Document(rec.field("text", str, nonempty=True), f"{path}:{line}")


def check_text_options(columns: Mapping[str, str], format: str) -> None:
    if format not in TEXT_FORMATS:
        raise ConfigError(f"unknown text format {format!r}; cpt reads {', '.join(TEXT_FORMATS)}")
    _check_columns(columns, "text")


def load_texts(path, columns: dict[str, str] | None = None, format: str = "auto",
               bad: BadRows | None = None) -> list[Document]:
    """Raw text documents for continued pretraining, from .txt (format text or auto: documents separated by blank
    lines; lines: one document per non-blank line), .jsonl or .json (a "text" field per record)."""
    columns = columns or {}
    check_text_options(columns, format)
    if check_suffix(path, _ALL_SUFFIXES) == ".txt":
        return list(text_documents(lines(read_text(path)), path, format))
    if format == "lines":
        raise ConfigError(f"format 'lines' reads a .txt file one document per line; {path} holds records (their "
                          "'text' field is a document each): use format auto or text")
    documents, use = [], FieldUse(path)

    def read(line: int, data: dict) -> Document:
        document = record_document(data, path, line, columns)
        use.note(data, {columns.get("text", "text")})
        return document
    for line, data in read_records(path, bad):
        document = guarded(bad, lambda: read(line, data))
        if document is not None:
            documents.append(document)
    use.report("text format")
    return documents


# ---------------------------------------------------------------------------- conversations

@dataclass(frozen=True)
class _Turn:
    role: Any  # as written in the file; the format's role table maps it
    content: Any
    role_field: str | None
    content_field: str | None
    calls: list | None = None  # an assistant turn's tool calls, in the chat templates' shape
    extra: dict = field(default_factory=dict)  # a tool result's tool_call_id / name, passed to the template


# What may come after each kind of turn: tool calls are answered by their results, then the assistant goes on.
_NEXT = {"start": ("user",), "user": ("assistant",), "assistant": ("user",), "call": ("tool",),
         "tool": ("tool", "assistant")}


def _order_error(turn: _Turn, state: str, expected: tuple[str, ...]) -> str:
    if state == "call":
        return (f"is {turn.role!r}, but an assistant turn that calls tools must be followed by their results "
                "(role tool, or from observation)")
    if expected == ("tool", "assistant") or turn.role in ("tool", "observation"):
        return f"is {turn.role!r}, but a tool result must follow the assistant's tool call"
    return (f"is {turn.role!r}, but this turn must be the {expected[0]}'s: after an optional system message, turns "
            "alternate user, assistant")


def _validate_conversation(turns: list[_Turn], rec: _Record, field: str | None,
                           roles: Mapping[str, str] = _ROLES, tools: tuple = ()) -> Conversation:
    """The rules every format shares; `field` names the list of turns in the file."""
    messages, state, answered = [], "start", False
    for index, turn in enumerate(turns):
        if not isinstance(turn.role, str):
            raise rec.error(turn.role_field, f"must be a string, found {json_type(turn.role)}")
        role = roles.get(turn.role)
        if role is None:
            raise rec.error(turn.role_field, f"unknown role {turn.role!r}; valid roles: {', '.join(roles)}")
        content = text_content(turn.content, turn.content_field, rec.error)
        if turn.calls is not None and content is None:
            content = ""  # OpenAI writes null content beside tool calls
        if not isinstance(content, str):
            raise rec.error(turn.content_field, f"must be a string, found {json_type(content)}")
        if role == "system":
            if index != 0:
                raise rec.error(turn.role_field, "a system message is only allowed as the first message")
        else:
            if not content.strip() and not turn.calls:
                raise rec.error(turn.content_field, f"must be a non-empty string ({role} turn)")
            if role not in _NEXT[state]:
                raise rec.error(turn.role_field, _order_error(turn, state, _NEXT[state]))
            state = "call" if turn.calls else role
            answered = answered or role == "assistant"
        message = {"role": role, "content": content, **turn.extra}
        if turn.calls:
            message["tool_calls"] = turn.calls
        messages.append(message)
    if not answered:
        raise rec.error(field, "must contain at least one user and one assistant turn")
    if messages[-1]["role"] != "assistant":
        # Loss is on responses: a conversation without a final response teaches nothing.
        raise rec.error(turns[-1].role_field, "the conversation must end with an assistant turn")
    return Conversation(tuple(messages), f"{rec.path}:{rec.line}", tools)


def _system_turn(rec: _Record) -> list[_Turn]:
    # Exports often carry an empty system column meaning "no system prompt".
    system = rec.field("system", str, required=False)
    name = rec.name("system")
    return [_Turn("system", system, name, name)] if system and system.strip() else []


def _tools(rec: _Record) -> tuple[dict, ...]:
    value = rec.data.get(rec.name("tools"))
    if value in (None, "", []):
        return ()
    return tool_calls.tools(value, rec.name("tools"), rec.error)


def _message_turn(rec: _Record, item: dict, where: str, role_name: str, content_name: str) -> _Turn:
    """One OpenAI-shaped message: content (or, beside tool calls, none), tool_calls, a tool result's ids."""
    calls = None
    if item.get("tool_calls") not in (None, []):
        calls = tool_calls.openai_calls(item["tool_calls"], f"{where}.tool_calls", rec.error)
        if item.get(role_name) != "assistant":
            raise rec.error(f"{where}.tool_calls", "only an assistant turn can call tools")
    elif content_name not in item:
        raise rec.error(f"{where}.{content_name}", "is required but missing")
    extra = {key: item[key] for key in ("tool_call_id", "name")
             if item.get(role_name) == "tool" and isinstance(item.get(key), str)}
    return _Turn(item[role_name], item.get(content_name), f"{where}.{role_name}", f"{where}.{content_name}",
                 calls, extra)


def _listed_turns(rec: _Record, list_key: str, role_key: str, content_key: str) -> list[_Turn]:
    """Turns from a list of {role_key: ..., content_key: ...} objects (messages, sharegpt)."""
    items = rec.field(list_key, list)
    list_name, role_name, content_name = rec.name(list_key), rec.name(role_key), rec.name(content_key)
    turns = []
    for index, item in enumerate(items):
        where = f"{list_name}[{index}]"
        if not isinstance(item, dict):
            raise rec.error(where, f"must be an object, found {json_type(item)}")
        if role_name not in item:
            raise rec.error(f"{where}.{role_name}", "is required but missing")
        if list_key == "messages":
            turns.append(_message_turn(rec, item, where, role_name, content_name))
            continue
        if content_name not in item:
            raise rec.error(f"{where}.{content_name}", "is required but missing")
        if item[role_name] == "function_call":  # the call is the turn's value, as JSON
            calls = tool_calls.sharegpt_calls(item[content_name], f"{where}.{content_name}", rec.error)
            turns.append(_Turn(item[role_name], "", f"{where}.{role_name}", f"{where}.{content_name}", calls))
            continue
        turns.append(_Turn(item[role_name], item[content_name], f"{where}.{role_name}", f"{where}.{content_name}"))
    return turns


def _from_messages(rec: _Record) -> Conversation:
    return _validate_conversation(_listed_turns(rec, "messages", "role", "content"), rec, rec.name("messages"),
                                  tools=_tools(rec))


def _from_sharegpt(rec: _Record) -> Conversation:
    turns = _system_turn(rec) + _listed_turns(rec, "conversations", "from", "value")
    return _validate_conversation(turns, rec, rec.name("conversations"), _SHAREGPT_ROLES, _tools(rec))


def _from_alpaca(rec: _Record) -> Conversation:
    instruction = rec.field("instruction", str, nonempty=True)
    extra = rec.field("input", str, required=False)
    output = rec.field("output", str)
    history = rec.field("history", list, required=False) or []
    turns = _system_turn(rec)
    name = rec.name("history")
    for index, pair in enumerate(history):
        where = f"{name}[{index}]"
        if not isinstance(pair, list) or len(pair) != 2:
            found = f"{len(pair)} items" if isinstance(pair, list) else json_type(pair)
            raise rec.error(where, f"must be a [user, assistant] pair, found {found}")
        turns += [_Turn("user", pair[0], where, f"{where}[0]"), _Turn("assistant", pair[1], where, f"{where}[1]")]
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    asked, answered = rec.name("instruction"), rec.name("output")
    turns += [_Turn("user", prompt, asked, asked), _Turn("assistant", output, answered, answered)]
    return _validate_conversation(turns, rec, None)


def _from_delimited(sample: str, rec: _Record, field: str | None, d: Delimiters) -> Conversation:
    """Parse start + question + sep + answer + eos, repeated for multi-turn samples."""
    turns: list[_Turn] = []
    pos = 0
    while (pos := _SPACE.match(sample, pos).end()) < len(sample):
        number = len(turns) // 2 + 1
        if not sample.startswith(d.start, pos):
            raise rec.error(field, f"text outside a turn: {sample[pos:pos + 40]!r}; "
                                   f"each turn must look like {d.start}question{d.sep}answer{d.eos}")
        body = pos + len(d.start)
        end, next_start = sample.find(d.eos, body), sample.find(d.start, body)
        if end == -1 or -1 < next_start < end:
            # The turn runs into the next one (or the end); say which delimiter is absent.
            cut = next_start if next_start != -1 else len(sample)
            missing = d.eos if d.sep in sample[body:cut] else d.sep
            raise rec.error(field, f"turn {number} is missing {missing!r}")
        question, sep, answer = sample[body:end].partition(d.sep)
        if not sep:
            raise rec.error(field, f"turn {number} is missing {d.sep!r}")
        if d.sep in answer:
            raise rec.error(field, f"turn {number} has more than one {d.sep!r}")
        for part, text in (("question", question), ("answer", answer)):
            if not text.strip():
                raise rec.error(field, f"turn {number} has an empty {part}")
        turns += [_Turn("user", question, field, field), _Turn("assistant", answer, field, field)]
        pos = end + len(d.eos)
    return _validate_conversation(turns, rec, field)


# How `format: auto` recognises a conversation format: (format, the field that tells it, how an error names it), in
# order of precedence. "instruction" alone suffices so a record missing "output" gets a missing-field error.
CONVERSATION_SIGNS = (("messages", "messages", "'messages'"), ("sharegpt", "conversations", "'conversations'"),
                      ("alpaca", "instruction", "'instruction' and 'output'"), ("delimited", "text", "'text'"))


def detect_format(record: dict, signs=CONVERSATION_SIGNS, kind: str = "") -> str:
    """The format a record's (canonical) field names point to: the first of `signs` whose field it has."""
    for format, field, _ in signs:
        if field in record:
            return format
    expected = [f"{described} ({format})" for format, _, described in signs]
    raise ValueError(f"cannot detect the {kind}format from fields {sorted(record)}; expected "
                     f"{', '.join(expected[:-1])} or {expected[-1]}")


def detect_in_file(path, line: int, record: dict, signs=CONVERSATION_SIGNS, kind: str = "") -> str:
    """detect_format for `format: auto`, which the first record of a file decides (later ones must match it); an
    undetectable record is a DataError naming the file and line."""
    try:
        return detect_format(record, signs, kind)
    except ValueError as e:
        raise DataError(path, line, None, f"{e}; or set the format explicitly") from None


def _check_format(format: str) -> None:
    if format == "text":
        raise ConfigError("format 'text' is raw text for continued pretraining (cpt), not conversations; "
                          f"conversation formats: {', '.join(_CHAT_FORMATS)}")
    if format not in _CHAT_FORMATS:
        raise ConfigError(f"unknown data format {format!r}; valid formats: {', '.join(_CHAT_FORMATS)}")




def conversation_fields(format: str) -> tuple[str, ...]:
    """The canonical fields a conversation format reads (those `columns` may rename)."""
    return _FIELDS[format]


def record_conversation(data: dict, path, line: int, format: str,
                        columns: Mapping[str, str] | None = None) -> Conversation:
    """One record of a record file in the messages, sharegpt or alpaca format, by the same rules, `columns` and
    path:line:field errors as load_conversations (kto reads its feedback rows' conversations this way)."""
    converters = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca}
    rec = _Record(data, str(path), line, columns or {})
    refuse_media(rec.data, rec.error)
    return converters[format](rec)


def _used_fields(format: str, rec: _Record) -> set[str]:
    return {rec.name(name) for name in _FIELDS[format]} | set(_DESIRABILITY)


def load_conversations(path, format: str = "auto", columns: dict[str, str] | None = None,
                       delimiters: Delimiters | None = None, bad: BadRows | None = None) -> list[Conversation]:
    """Chat data for SFT from .txt (delimited only), .jsonl or .json, in the internal schema. With `bad`, every bad
    record is gathered there and left out; without, the first one raises."""
    _check_format(format)
    columns, delimiters = columns or {}, delimiters or Delimiters()
    if format != "auto":
        _check_columns(columns, format)
    if check_suffix(path, _ALL_SUFFIXES) == ".txt":
        if format not in ("auto", "delimited"):
            raise DataError(path, None, None, f"a .txt file holds delimited samples; format {format!r} "
                                              f"needs a {' or '.join(RECORD_SUFFIXES)} file")
        _check_columns(columns, "delimited")
        text = read_text(path)
        found = (guarded(bad, lambda: _from_delimited(line, _Record({}, str(path), number, {}), None, delimiters))
                 for number, line in lines(text) if line.strip())
        return [conversation for conversation in found if conversation is not None]

    converters = {
        "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
        "delimited": lambda rec: _from_delimited(rec.field("text", str), rec, rec.name("text"), delimiters),
    }
    conversations, use = [], FieldUse(path)

    def convert(rec: _Record) -> Conversation:
        refuse_media(rec.data, rec.error)
        refuse_undesirable(rec.data, rec.error)
        use.note(rec.data, _used_fields(format, rec))
        return converters[format](rec)

    for line, data in read_records(path, bad):
        if format == "auto":
            # Detected on canonical names, so a file with renamed columns is recognised too.
            canonical = {file_name: name for name, file_name in columns.items()}
            format = detect_in_file(path, line, {canonical.get(key, key): value for key, value in data.items()})
            _check_columns(columns, format)
        conversation = guarded(bad, lambda: convert(_Record(data, str(path), line, columns)))
        if conversation is not None:
            conversations.append(conversation)
    if format != "auto":
        use.report(f"{format} format")
    return conversations
