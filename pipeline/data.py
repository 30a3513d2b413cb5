"""Load dataset files into one internal schema, validating every record strictly.

Raw text for continued pretraining (`load_texts`) becomes `Document`s:
  - .txt:   documents separated by one or more blank lines
  - .jsonl / .json: records with a "text" field

Chat data for SFT (`load_conversations`) becomes `Conversation`s, whose messages are
{"role": "system"|"user"|"assistant", "content": str}. Accepted formats:
  - messages:  {"messages": [{"role": ..., "content": ...}, ...]}
  - sharegpt:  {"conversations": [{"from": "human"|"gpt"|..., "value": ...}], "system": ...}
  - alpaca:    {"instruction", "input", "output", "system", "history": [[user, assistant], ...]}
  - delimited: samples like "<start>question<sep>answer<eos>", repeated for more turns;
               one per non-blank line of a .txt file, or in the "text" field of a record
  - auto:      picked from the first record's fields (.txt files are delimited)

`columns` renames fields: it maps our canonical name to the file's, e.g. {"output": "response"}.
Errors are DataErrors naming the file, the line where the record starts, and the field as
the file spells it (e.g. "conversations[2].from"), so the user can fix the data directly.
"""

from __future__ import annotations

import json
import re
from itertools import groupby
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from pipeline.errors import ConfigError, DataError

FORMATS = ("text", "delimited", "alpaca", "sharegpt", "messages")
_CHAT_FORMATS = ("auto",) + tuple(f for f in FORMATS if f != "text")
_RECORD_SUFFIXES = (".jsonl", ".json")
_ALL_SUFFIXES = (".txt",) + _RECORD_SUFFIXES

# Canonical field names each format reads; `columns` may rename exactly these.
_FIELDS = {
    "text": ("text",),
    "delimited": ("text",),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "from", "value", "system"),
    "messages": ("messages", "role", "content"),
}
_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system"}
_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number",
               str: "string", list: "array", dict: "object"}
_EXPECTED = {str: "a string", list: "an array"}
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
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


# ---------------------------------------------------------------------------- reading files

def _json_type(value: Any) -> str:
    return _JSON_TYPES[type(value)]


def _check_suffix(path, supported: tuple[str, ...]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in supported:
        raise DataError(path, None, None, f"unsupported file extension {suffix or '(none)'!r}; "
                                          f"supported: {', '.join(supported)}")
    return suffix


def _read_text(path) -> str:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, None, "file not found") from None
    except OSError as e:
        raise DataError(path, None, None, f"cannot read the file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # editors on Windows add a BOM
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(path, line, None, f"not valid UTF-8 (byte {raw[e.start]:#04x}); "
                                          "re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(path, None, None, "the file is empty")
    return text


def _lines(text: str) -> Iterator[tuple[int, str]]:
    # Not str.splitlines(): it also splits on U+2028 and friends, which JSON strings may contain.
    for number, line in enumerate(text.split("\n"), 1):
        yield number, line.removesuffix("\r")


def _line_counter(text: str) -> Callable[[int], int]:
    """Offset -> 1-based line, counting incrementally because offsets only grow."""
    seen_pos, seen_line = 0, 1

    def line_of(pos: int) -> int:
        nonlocal seen_pos, seen_line
        seen_line += text.count("\n", seen_pos, pos)
        seen_pos = pos
        return seen_line
    return line_of


def _invalid_json(path, line: int, e: json.JSONDecodeError) -> DataError:
    return DataError(path, line, None, f"invalid JSON: {e.msg} (column {e.colno})")


def _as_object(path, line: int, value: Any) -> dict:
    if not isinstance(value, dict):
        raise DataError(path, line, None, f"expected a JSON object, found {_json_type(value)}")
    return value


def _jsonl_records(path, text: str) -> Iterator[tuple[int, dict]]:
    for number, line in _lines(text):
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise _invalid_json(path, number, e) from None
            yield number, _as_object(path, number, value)


def _json_records(path, text: str) -> Iterator[tuple[int, dict]]:
    # Step through the array element by element so each record knows the line it starts on.
    decoder, line_of = json.JSONDecoder(), _line_counter(text)

    def decode(pos: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _invalid_json(path, e.lineno, e) from None

    def skip_space(pos: int) -> int:
        return _JSON_SPACE.match(text, pos).end()

    pos = skip_space(0)
    if not text.startswith("[", pos):
        raise DataError(path, line_of(pos), None,
                        f"the top level must be a JSON array of objects, found {_json_type(decode(pos)[0])}")
    pos = skip_space(pos + 1)
    if text.startswith("]", pos):
        raise DataError(path, None, None, "the file is empty: the array has no records")
    while True:
        value, end = decode(pos)
        line = line_of(pos)
        yield line, _as_object(path, line, value)
        pos = skip_space(end)
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            problem = "the array is never closed with ']'" if pos == len(text) else "expected ',' or ']'"
            raise DataError(path, line_of(pos), None, f"invalid JSON: {problem} after an array element")
        pos = skip_space(pos + 1)
    pos = skip_space(pos + 1)
    if pos < len(text):
        raise DataError(path, line_of(pos), None, "invalid JSON: extra data after the top-level array")


def read_records(path) -> Iterator[tuple[int, dict]]:
    """Yield (line, object) for each record of a .jsonl (one object per non-blank line) or
    .json (a top-level array of objects) file; line is where the record starts, 1-based."""
    suffix = _check_suffix(path, _RECORD_SUFFIXES)
    text = _read_text(path)
    yield from (_jsonl_records if suffix == ".jsonl" else _json_records)(path, text)


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
            raise self.error(name, f"must be {_EXPECTED[kind]}, found {_json_type(value)}")
        if nonempty and not value.strip():
            raise self.error(name, "must be a non-empty string")
        return value


def _check_columns(columns: Mapping[str, str], fmt: str) -> None:
    unknown = sorted(set(columns) - set(_FIELDS[fmt]))
    if unknown:
        raise ConfigError(f"columns {unknown} are not fields of the {fmt!r} format; "
                          f"it has: {', '.join(_FIELDS[fmt])}")


# ---------------------------------------------------------------------------- pretraining text

def _paragraphs(text: str) -> Iterator[tuple[int, str]]:
    for blank, group in groupby(_lines(text), key=lambda numbered: not numbered[1].strip()):
        if not blank:
            lines = list(group)
            yield lines[0][0], "\n".join(line for _, line in lines)


def load_texts(path, columns: dict[str, str] | None = None) -> list[Document]:
    """Raw text documents for continued pretraining, from .txt, .jsonl or .json."""
    columns = columns or {}
    _check_columns(columns, "text")
    if _check_suffix(path, _ALL_SUFFIXES) == ".txt":
        return [Document(text, f"{path}:{line}") for line, text in _paragraphs(_read_text(path))]
    return [Document(_Record(data, str(path), line, columns).field("text", str, nonempty=True), f"{path}:{line}")
            for line, data in read_records(path)]


# ---------------------------------------------------------------------------- conversations

@dataclass(frozen=True)
class _Turn:
    role: Any  # as written in the file; the format's role table maps it
    content: Any
    role_field: str | None
    content_field: str | None


def _validate_conversation(turns: list[_Turn], rec: _Record, field: str | None,
                           roles: Mapping[str, str] = _ROLES) -> Conversation:
    """The rules every format shares; `field` names the list of turns in the file."""
    messages, exchanged = [], 0  # exchanged: user and assistant turns so far
    for index, turn in enumerate(turns):
        if not isinstance(turn.role, str):
            raise rec.error(turn.role_field, f"must be a string, found {_json_type(turn.role)}")
        role = roles.get(turn.role)
        if role is None:
            raise rec.error(turn.role_field, f"unknown role {turn.role!r}; valid roles: {', '.join(roles)}")
        if not isinstance(turn.content, str):
            raise rec.error(turn.content_field, f"must be a string, found {_json_type(turn.content)}")
        if role == "system":
            if index != 0:
                raise rec.error(turn.role_field, "a system message is only allowed as the first message")
        else:
            if not turn.content.strip():
                raise rec.error(turn.content_field, f"must be a non-empty string ({role} turn)")
            expected = ("user", "assistant")[exchanged % 2]
            if role != expected:
                raise rec.error(turn.role_field, f"is {turn.role!r}, but this turn must be the {expected}'s: "
                                                 "after an optional system message, turns alternate user, assistant")
            exchanged += 1
        messages.append({"role": role, "content": turn.content})
    if not exchanged:
        raise rec.error(field, "must contain at least one user and one assistant turn")
    if messages[-1]["role"] != "assistant":
        # Loss is on responses: a conversation without a final response teaches nothing.
        raise rec.error(turns[-1].role_field, "the conversation must end with an assistant turn")
    return Conversation(tuple(messages), f"{rec.path}:{rec.line}")


def _system_turn(rec: _Record) -> list[_Turn]:
    # Exports often carry an empty system column meaning "no system prompt".
    system = rec.field("system", str, required=False)
    name = rec.name("system")
    return [_Turn("system", system, name, name)] if system and system.strip() else []


def _listed_turns(rec: _Record, list_key: str, role_key: str, content_key: str) -> list[_Turn]:
    """Turns from a list of {role_key: ..., content_key: ...} objects (messages, sharegpt)."""
    items = rec.field(list_key, list)
    list_name, role_name, content_name = rec.name(list_key), rec.name(role_key), rec.name(content_key)
    turns = []
    for index, item in enumerate(items):
        where = f"{list_name}[{index}]"
        if not isinstance(item, dict):
            raise rec.error(where, f"must be an object, found {_json_type(item)}")
        for key in (role_name, content_name):
            if key not in item:
                raise rec.error(f"{where}.{key}", "is required but missing")
        turns.append(_Turn(item[role_name], item[content_name], f"{where}.{role_name}", f"{where}.{content_name}"))
    return turns


def _from_messages(rec: _Record) -> Conversation:
    return _validate_conversation(_listed_turns(rec, "messages", "role", "content"), rec, rec.name("messages"))


def _from_sharegpt(rec: _Record) -> Conversation:
    turns = _system_turn(rec) + _listed_turns(rec, "conversations", "from", "value")
    return _validate_conversation(turns, rec, rec.name("conversations"), _SHAREGPT_ROLES)


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
            found = f"{len(pair)} items" if isinstance(pair, list) else _json_type(pair)
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




def record_conversation(data: dict, path, line: int, format: str) -> Conversation:
    """One record of a .jsonl/.json file in the messages, sharegpt or alpaca format, by the same rules and with the
    same path:line:field errors as load_conversations (kto reads its feedback rows' conversations this way)."""
    converters = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca}
    return converters[format](_Record(data, str(path), line, {}))


def load_conversations(path, format: str = "auto", columns: dict[str, str] | None = None,
                       delimiters: Delimiters | None = None) -> list[Conversation]:
    """Chat data for SFT from .txt (delimited only), .jsonl or .json, in the internal schema."""
    _check_format(format)
    columns, delimiters = columns or {}, delimiters or Delimiters()
    if format != "auto":
        _check_columns(columns, format)
    if _check_suffix(path, _ALL_SUFFIXES) == ".txt":
        if format not in ("auto", "delimited"):
            raise DataError(path, None, None, f"a .txt file holds delimited samples; format {format!r} "
                                              f"needs a {' or '.join(_RECORD_SUFFIXES)} file")
        _check_columns(columns, "delimited")
        text = _read_text(path)
        return [_from_delimited(line, _Record({}, str(path), number, {}), None, delimiters)
                for number, line in _lines(text) if line.strip()]

    converters = {
        "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
        "delimited": lambda rec: _from_delimited(rec.field("text", str), rec, rec.name("text"), delimiters),
    }
    conversations = []
    for line, data in read_records(path):
        if format == "auto":
            # Detected on canonical names, so a file with renamed columns is recognised too.
            canonical = {file_name: name for name, file_name in columns.items()}
            format = detect_in_file(path, line, {canonical.get(key, key): value for key, value in data.items()})
            _check_columns(columns, format)
        conversations.append(converters[format](_Record(data, str(path), line, columns)))
    return conversations
