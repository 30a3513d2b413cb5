"""Existing preference datasets into `PreferenceRow`s (prompt messages, chosen, rejected), and unpaired feedback
files into `FeedbackRow`s (prompt messages, completion, label: see load_feedback), validated strictly.

Accepted formats (.jsonl or .json, via `pipeline.records.read_records`):
  - prompt:   {"prompt", "chosen", "rejected"}; each a string or a message list [{"role", "content"}].
              chosen/rejected may be the response's turn alone or the whole conversation, whose turns before the
              last (assistant) one must equal the prompt (TRL's and UltraFeedback's layouts). `chosen_messages` /
              `rejected_messages` (whole conversations) stand for chosen/rejected, with or without a prompt field.
  - hh:       Anthropic HH-RLHF: "chosen"/"rejected" transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."; the text up to
              the last "\\n\\nAssistant:" is the prompt and must be the same in both. Message lists without a
              "prompt" field are read the same way: every turn but the last is the prompt.
  - sharegpt: {"conversations": [{"from", "value"}], "chosen", "rejected", "system"}; chosen/rejected are a
              {"from", "value"} message or a string.
  - auto:     picked from the first record's fields.
In every format, `score_chosen` / `score_rejected` (UltraFeedback's ratings) are read when present: equal scores make
a tie (left out of training and counted by the caller), a chosen scored below its rejected is a bad row. A message's
content may be a list of parts (text parts are joined, others refused). Prompts alternate user and assistant turns
from a user turn to a user turn, as sft's conversations do.

`columns` renames fields: it maps our canonical name to the file's, e.g. {"chosen": "preferred"}.
Every malformed record is a DataError naming the file, the line and the field as the file spells it (e.g.
"conversations[1].from"); with a `BadRows`, the loaders gather them all in one pass instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from pipeline import data as data_formats
from pipeline.data import text_content
from pipeline.errors import ConfigError, DataError
from pipeline.records import BadRows, FieldUse, guarded, json_type, read_records, refuse_media
from reward.pairs import FeedbackRow, Pair, PreferenceRow

FORMATS = ("auto", "prompt", "hh", "sharegpt")
_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_ASSISTANT = "\n\nAssistant:"
# Canonical fields of preference records (`columns` may rename these) and of prompt records.
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "chosen_messages", "rejected_messages", "conversations",
                     "system", "score_chosen", "score_rejected")
PROMPT_FIELDS = ("prompt", "messages")


def check_columns(columns: Mapping[str, str], fields: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(columns) - set(fields))
    if unknown:
        raise ConfigError(f"columns {unknown} are not fields of {what}; they are: {', '.join(fields)}")


@dataclass(frozen=True)
class _Record:
    data: dict  # the record with canonical field names
    path: str
    line: int
    columns: Mapping[str, str]

    def error(self, field: str | None, message: str) -> DataError:
        if field:  # name the field as the file spells it
            head = re.match(r"[^.\[]+", field).group()
            field = self.columns.get(head, head) + field[len(head):]
        return DataError(self.path, self.line, field, message)

    def get(self, field: str) -> Any:
        if field not in self.data:
            raise self.error(field, "is required but missing")
        return self.data[field]

    def row(self, prompt: list[dict], chosen: str, rejected: str) -> PreferenceRow:
        return PreferenceRow(prompt, chosen, rejected, tie=self._tied(), source=f"{self.path}:{self.line}")

    def _tied(self) -> bool:
        """Whether score_chosen equals score_rejected; a pair scored the wrong way round is refused."""
        scores = [self.data.get(name) for name in ("score_chosen", "score_rejected")]
        if scores == [None, None]:
            return self.data.get("tie") is True  # a tie a judge gave, in a preferences.jsonl a run wrote
        for name, score in zip(("score_chosen", "score_rejected"), scores):
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise self.error(name, f"must be a number (with the other score), found {json_type(score)}")
        if scores[0] < scores[1]:
            raise self.error("score_chosen", f"is {scores[0]}, below score_rejected {scores[1]}: the pair is "
                                             "labelled the wrong way round")
        return scores[0] == scores[1]


def _canonical(data: dict, columns: Mapping[str, str]) -> dict:
    """The record under our field names: each `columns` entry's file field renamed to its canonical name."""
    renamed = {file_name: name for name, file_name in columns.items()}
    return {renamed.get(key, key): value for key, value in data.items()
            if key in renamed or key not in columns}  # a file field shadowed by a renamed one is not read


# ---------------------------------------------------------------------------- messages

def _messages(rec: _Record, field: str, value: Any, roles: Mapping[str, str] = _ROLES,
              role_key: str = "role", content_key: str = "content", follows_user: bool = False) -> list[dict]:
    """A list of {role_key, content_key} objects as messages: roles known, contents non-empty text, a system message
    only first, and the other turns alternating user, assistant from a user turn (or, `follows_user`, from an
    assistant turn answering one), as sft's conversations must."""
    if not isinstance(value, list):
        raise rec.error(field, f"must be an array of messages, found {json_type(value)}")
    if not value:
        raise rec.error(field, "must contain at least one message")
    messages = []
    for index, item in enumerate(value):
        where = f"{field}[{index}]"
        message = _message(rec, where, item, roles, role_key, content_key)
        if message["role"] == "system":
            if index or follows_user:
                raise rec.error(f"{where}.{role_key}", "a system message is only allowed as the first message")
        else:
            turns = sum(m["role"] != "system" for m in messages) + follows_user
            expected = ("user", "assistant")[turns % 2]
            if message["role"] != expected:
                raise rec.error(f"{where}.{role_key}", f"is {item[role_key]!r}, but this turn must be the "
                                                       f"{expected}'s: after an optional system message, turns "
                                                       "alternate user, assistant")
        messages.append(message)
    return messages


def _message(rec: _Record, where: str, item: Any, roles: Mapping[str, str], role_key: str, content_key: str) -> dict:
    if not isinstance(item, dict):
        raise rec.error(where, f"must be an object, found {json_type(item)}")
    for key in (role_key, content_key):
        if key not in item:
            raise rec.error(f"{where}.{key}", "is required but missing")
    role = item[role_key]
    content = text_content(item[content_key], f"{where}.{content_key}", rec.error)
    if not isinstance(role, str):
        raise rec.error(f"{where}.{role_key}", f"must be a string, found {json_type(role)}")
    if role not in roles:
        raise rec.error(f"{where}.{role_key}", f"unknown role {role!r}; valid roles: {', '.join(roles)}")
    if not isinstance(content, str):
        raise rec.error(f"{where}.{content_key}", f"must be a string, found {json_type(content)}")
    if roles[role] != "system" and not content.strip():
        raise rec.error(f"{where}.{content_key}", "must be a non-empty string")
    return {"role": roles[role], "content": content}


def _check_prompt(rec: _Record, field: str, messages: list[dict]) -> list[dict]:
    # A judge or reward model scores a response to the user's last turn; any other ending has nothing to answer.
    if messages[-1]["role"] != "user":
        raise rec.error(field, f"the prompt must end with a user turn, not {messages[-1]['role']!r}")
    return messages


def _response(rec: _Record, field: str, value: Any, prompt: list[dict] | None) -> tuple[list[dict] | None, str]:
    """(the turns before the response, the response) from a string, the response's turn alone, or a conversation
    ending in the response."""
    if isinstance(value, str):
        if not value.strip():
            raise rec.error(field, "must be a non-empty response")
        return None, value
    if not isinstance(value, list):
        raise rec.error(field, f"must be a string or an array of messages, found {json_type(value)}")
    if prompt is not None and value and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        # The response's turn alone (TRL's conversational layout), answering the prompt's last (user) turn.
        messages = _messages(rec, field, value, follows_user=True)
        if len(messages) > 1:
            raise rec.error(field, "must be the response's turn alone or the whole conversation, prompt included")
        return None, messages[0]["content"]
    messages = _messages(rec, field, value)
    if messages[-1]["role"] != "assistant":
        raise rec.error(f"{field}[{len(messages) - 1}].role", "the last turn must be the assistant's response")
    earlier = messages[:-1]
    if earlier and prompt is not None and earlier != prompt:
        raise rec.error(field, "the turns before the response must equal the prompt")
    return earlier or None, messages[-1]["content"]


# ---------------------------------------------------------------------------- formats

def _prompt(rec: _Record) -> list[dict] | None:
    if "prompt" not in rec.data:
        return None
    value = rec.data["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise rec.error("prompt", "must be a non-empty string")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise rec.error("prompt", f"must be a string or an array of messages, found {json_type(value)}")
    return _check_prompt(rec, "prompt", _messages(rec, "prompt", value))


def _sides(rec: _Record) -> tuple[str, str]:
    """The fields holding the chosen and rejected responses: chosen_messages / rejected_messages when given."""
    if "chosen_messages" in rec.data or "rejected_messages" in rec.data:
        for side in ("chosen", "rejected"):
            if f"{side}_messages" not in rec.data:
                raise rec.error(f"{side}_messages", "is required but missing (its counterpart is given)")
            # Some exports write the response beside its conversation too: it must be the same response.
            alone, whole, where = rec.data.get(side), rec.data[f"{side}_messages"], f"{side}_messages[-1].content"
            if isinstance(alone, str) and isinstance(whole, list) and whole and isinstance(whole[-1], dict) \
                    and text_content(whole[-1].get("content"), where, rec.error) != alone:
                raise rec.error(side, f"differs from the last turn of {side}_messages; which one was meant?")
        return "chosen_messages", "rejected_messages"
    return "chosen", "rejected"


def _from_prompt(rec: _Record) -> PreferenceRow:
    prompt = _prompt(rec)
    chosen_field, rejected_field = _sides(rec)
    if prompt is None:
        return _from_conversations(rec, chosen_field, rejected_field)
    chosen = _response(rec, chosen_field, rec.get(chosen_field), prompt)[1]
    rejected = _response(rec, rejected_field, rec.get(rejected_field), prompt)[1]
    return rec.row(prompt, chosen, rejected)


def _hh_split(rec: _Record, field: str) -> tuple[str, str]:
    """A transcript's prompt text (up to its last Assistant marker) and the response after it."""
    text = rec.get(field)
    if not isinstance(text, str):
        raise rec.error(field, f"must be a string transcript, found {json_type(text)}")
    if text.startswith("Human:"):
        text = "\n\n" + text  # some exports strip the leading blank line
    cut = text.rfind(_HH_ASSISTANT)
    if cut == -1:
        raise rec.error(field, "the transcript has no '\\n\\nAssistant:' turn")
    response = text[cut + len(_HH_ASSISTANT):]
    if "\n\nHuman:" in response:
        raise rec.error(field, "the transcript must end with an Assistant turn (the response)")
    response = response.strip()
    if not response:
        raise rec.error(field, "the last Assistant turn (the response) is empty")
    return text[:cut], response


def _hh_messages(rec: _Record, field: str, text: str) -> list[dict]:
    """The prompt's turns, held to sft's rules: Human first, then Human and Assistant in turn, none empty."""
    parts = _HH_TURN.split(text)  # [before the first turn, role, content, role, content, ...]
    if parts[0].strip():
        raise rec.error(field, f"text before the first '\\n\\nHuman:' turn: {parts[0][:40]!r}")
    messages = []
    for number, (role, content) in enumerate(zip(parts[1::2], parts[2::2]), 1):
        expected = ("Human", "Assistant")[len(messages) % 2]
        if role != expected:
            raise rec.error(field, f"turn {number} is {role}, but turns must alternate Human, Assistant from a "
                                   f"Human turn (two {role} turns in a row?)")
        if not content.strip():
            raise rec.error(field, f"turn {number} ({role}) is empty")
        messages.append({"role": _HH_ROLES[role], "content": content.strip()})
    if not messages:
        raise rec.error(field, "the transcript has no '\\n\\nHuman:' turn before the response")
    if messages[-1]["role"] != "user":
        raise rec.error(field, "two Assistant turns in a row: the turn before the response must be a Human turn")
    return messages


def _from_hh(rec: _Record) -> PreferenceRow:
    chosen_field, rejected_field = _sides(rec)
    if isinstance(rec.get(chosen_field), list):
        return _from_conversations(rec, chosen_field, rejected_field)
    chosen_prompt, chosen = _hh_split(rec, "chosen")
    rejected_prompt, rejected = _hh_split(rec, "rejected")
    if chosen_prompt != rejected_prompt:
        at = next((i for i, (x, y) in enumerate(zip(chosen_prompt, rejected_prompt)) if x != y),
                  min(len(chosen_prompt), len(rejected_prompt)))
        raise rec.error("rejected", f"its prompt differs from chosen's at character {at}: both transcripts must "
                                    "share everything before the last '\\n\\nAssistant:'")
    return rec.row(_hh_messages(rec, "chosen", chosen_prompt), chosen, rejected)


def _from_conversations(rec: _Record, chosen_field: str = "chosen", rejected_field: str = "rejected") -> PreferenceRow:
    """chosen/rejected as whole conversations with no prompt field: the shared turns before the last are the prompt."""
    prompt, chosen = _response(rec, chosen_field, rec.get(chosen_field), None)
    if prompt is None:
        raise rec.error(chosen_field, "without a 'prompt' field, the conversation must hold the prompt's turns too")
    _check_prompt(rec, chosen_field, prompt)
    rejected_prompt, rejected = _response(rec, rejected_field, rec.get(rejected_field), prompt)
    if rejected_prompt is None:
        raise rec.error(rejected_field, "must hold the same prompt turns as chosen")
    return rec.row(prompt, chosen, rejected)


def _sharegpt_response(rec: _Record, field: str) -> str:
    value = rec.get(field)
    if isinstance(value, str):
        if not value.strip():
            raise rec.error(field, "must be a non-empty response")
        return value
    if not isinstance(value, dict):
        raise rec.error(field, f"must be a {{from, value}} message or a string, found {json_type(value)}")
    message = _message(rec, field, value, _SHAREGPT_ROLES, "from", "value")
    if message["role"] != "assistant":
        raise rec.error(f"{field}.from", f"is {value['from']!r}, but the response must be the assistant's")
    return message["content"]


def _from_sharegpt(rec: _Record) -> PreferenceRow:
    prompt = _messages(rec, "conversations", rec.get("conversations"), _SHAREGPT_ROLES, "from", "value")
    system = rec.data.get("system")
    if system is not None and not isinstance(system, str):
        raise rec.error("system", f"must be a string, found {json_type(system)}")
    if system and system.strip():
        if prompt[0]["role"] == "system":
            raise rec.error("system", "the conversation already starts with a system message")
        prompt.insert(0, {"role": "system", "content": system})
    _check_prompt(rec, "conversations", prompt)
    return rec.row(prompt, _sharegpt_response(rec, "chosen"), _sharegpt_response(rec, "rejected"))


_CONVERTERS = {"prompt": _from_prompt, "hh": _from_hh, "sharegpt": _from_sharegpt}
# The fields each format reads; any other a record holds is named in a warning.
_USED = {"prompt": {"prompt", "chosen", "rejected", "chosen_messages", "rejected_messages"},
         "hh": {"chosen", "rejected", "chosen_messages", "rejected_messages"},
         "sharegpt": {"conversations", "system", "chosen", "rejected"}}
# A preferences.jsonl the preferences stage wrote carries each row's provenance (reward.pairs.PreferenceRow): read
# as such, not named as unread; "tie" marks a tie.
_ROW_FIELDS = {"judge", "tie", "confidence", "source", "pair_id"}


# How `format: auto` recognises a preference format (pipeline.data.detect_format), in order of precedence. "chosen"
# alone suffices so a record missing "rejected" gets a missing-field error.
PREFERENCE_SIGNS = (("sharegpt", "conversations", "'conversations'"), ("prompt", "prompt", "'prompt'"),
                    ("prompt", "chosen_messages", "'chosen_messages'"),
                    ("hh", "chosen", "'chosen' and 'rejected' transcripts"))


def detect_format(record: dict) -> str:
    """The preference format a record's field names point to."""
    return data_formats.detect_format(record, PREFERENCE_SIGNS, "preference ")


def load_preferences(path, format: str = "auto", columns: Mapping[str, str] | None = None,
                     bad: BadRows | None = None) -> list[PreferenceRow]:
    """Chosen/rejected rows from a .jsonl or .json preference dataset; tied rows (equal scores) have tie=True."""
    if format not in FORMATS:
        raise ConfigError(f"unknown preference format {format!r}; valid formats: {', '.join(FORMATS)}")
    columns = dict(columns or {})
    check_columns(columns, PREFERENCE_FIELDS, "preference records")
    rows, use = [], FieldUse(path)

    def convert(rec: _Record, raw: dict) -> PreferenceRow:
        refuse_media(rec.data, rec.error)
        use.note(raw, {columns.get(name, name) for name in _USED[format] | {"score_chosen", "score_rejected"}}
                 | _ROW_FIELDS)
        return _CONVERTERS[format](rec)

    for line, raw in read_records(path, bad):
        data = _canonical(raw, columns)
        if format == "auto":
            format = data_formats.detect_in_file(path, line, data, PREFERENCE_SIGNS, "preference ")
        row = guarded(bad, lambda: convert(_Record(data, str(path), line, columns), raw))
        if row is not None:
            rows.append(row)
    if format != "auto":
        use.report(f"{format} preference format")
    return rows


# ---------------------------------------------------------------------------- unpaired feedback (KTO)

FEEDBACK_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")
# How `format: auto` recognises a feedback format: a conversation in one of sft's formats, or TRL's unpaired layout.
FEEDBACK_SIGNS = (*data_formats.CONVERSATION_SIGNS[:3],
                  ("prompt_completion", "completion", "'prompt' and 'completion'"))
# TRL, and LLaMA-Factory's own KTO demo file, call the thumbs up or down `label`; LLaMA-Factory's dataset_info.json
# names that column `kto_tag`, which its README's examples also use as the field's name.
LABEL_FIELDS = ("label", "kto_tag")


def _feedback_label(rec: _Record) -> bool:
    given = [field for field in LABEL_FIELDS if field in rec.data]
    if not given:
        raise rec.error("label", "is required but missing: true for a desirable response, false for an undesirable "
                                 "one (LLaMA-Factory's kto_tag is read too)")
    if len(given) > 1:
        raise rec.error("kto_tag", "label and kto_tag are both given; keep one")
    value = rec.data[given[0]]
    if not isinstance(value, bool):
        raise rec.error(given[0], f"must be true or false, found {json_type(value)} {value!r}")
    return value


def _prompt_completion(rec: _Record) -> tuple[list[dict], str]:
    """TRL's unpaired layout: "prompt" (a string or messages) and "completion" (a string, the assistant's turn, or the
    whole conversation ending in it)."""
    prompt = _prompt_messages(rec) if "prompt" in rec.data else None
    if prompt is None:
        raise rec.error("prompt", "is required but missing")
    return prompt, _response(rec, "completion", rec.get("completion"), prompt)[1]


def feedback_fields(format: str) -> tuple[str, ...]:
    """The canonical fields a feedback format reads (those `columns` may rename)."""
    read = ("prompt", "completion") if format == "prompt_completion" else data_formats.conversation_fields(format)
    return (*read, *LABEL_FIELDS)


def load_feedback(path, format: str = "auto", columns: Mapping[str, str] | None = None,
                  bad: BadRows | None = None) -> list[FeedbackRow]:
    """Unpaired thumbs-up/down rows from a record file: a conversation in the messages, sharegpt or alpaca format
    whose last assistant turn is the response judged (LLaMA-Factory's KTO files), or {"prompt", "completion"}
    (TRL's); with a boolean "label" (or "kto_tag"). `columns` renames fields as in load_preferences. Every malformed
    record is a DataError naming path, line, field; with a `BadRows`, they are gathered in one pass instead."""
    if format not in FEEDBACK_FORMATS:
        raise ConfigError(f"unknown feedback format {format!r}; valid formats: {', '.join(FEEDBACK_FORMATS)}")
    columns = dict(columns or {})
    if format != "auto":
        check_columns(columns, feedback_fields(format), f"{format} feedback records")
    rows, use = [], FieldUse(path)

    def convert(line: int, raw: dict) -> FeedbackRow:
        rec = _Record(_canonical(raw, columns), str(path), line, columns)
        refuse_media(rec.data, rec.error)
        use.note(raw, {columns.get(name, name) for name in feedback_fields(format)})
        if format == "prompt_completion":
            prompt, completion = _prompt_completion(rec)
        else:
            conversation = data_formats.record_conversation(raw, path, line, format, columns)
            if conversation.tools or any(m["role"] == "tool" or m.get("tool_calls") for m in conversation.messages):
                raise rec.error(None, "holds tool calls: kto trains on one plain-text response per row; remove "
                                      "the record")
            messages = list(conversation.messages)
            prompt, completion = messages[:-1], messages[-1]["content"]
        return FeedbackRow(prompt, completion, _feedback_label(rec), f"{path}:{line}")

    for line, raw in read_records(path, bad):
        if format == "auto":
            format = data_formats.detect_in_file(path, line, _canonical(raw, columns), FEEDBACK_SIGNS, "feedback ")
            check_columns(columns, feedback_fields(format), f"{format} feedback records")
        row = guarded(bad, lambda: convert(line, raw))
        if row is not None:
            rows.append(row)
    if format != "auto":
        use.report(f"{format} feedback format")
    return rows


# ---------------------------------------------------------------------------- prompts and unlabelled pairs

def _prompt_messages(rec: _Record) -> list[dict]:
    """The prompt of a record: "prompt" (a string or messages), or "messages" whose trailing assistant turn (an sft
    answer) is dropped, so an sft file doubles as a prompt file."""
    prompt = _prompt(rec)
    if prompt is not None:
        return prompt
    if "messages" in rec.data:
        messages = _messages(rec, "messages", rec.data["messages"])
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise rec.error("messages", "has no user turn to answer")
        return _check_prompt(rec, "messages", messages)
    raise rec.error("prompt", "is required but missing (or give 'messages')")


def load_prompts(path, columns: Mapping[str, str] | None = None,
                 bad: BadRows | None = None) -> list[tuple[list[dict], str]]:
    """(prompt messages, "path:line") for every record of a prompt file: {"prompt"} or {"messages"} per line."""
    columns = dict(columns or {})
    check_columns(columns, PROMPT_FIELDS, "prompt records")
    prompts, use = [], FieldUse(path)

    def convert(line: int, raw: dict) -> list[dict]:
        rec = _Record(_canonical(raw, columns), str(path), line, columns)
        refuse_media(rec.data, rec.error)
        use.note(raw, {columns.get(name, name) for name in PROMPT_FIELDS})
        return _prompt_messages(rec)

    for line, raw in read_records(path, bad):
        prompt = guarded(bad, lambda: convert(line, raw))
        if prompt is not None:
            prompts.append((prompt, f"{path}:{line}"))
    use.report("prompt format")
    return prompts


# A labelled file (pairs with the winner a person gave) is also a valid pairs file: the label fields are ignored here.
_PAIR_FIELDS = {"id", "prompt", "response_a", "response_b", "source", "winner", "confidence", "note"}


def load_pairs(path) -> list[Pair]:
    """Unlabelled pairs from {"prompt", "response_a", "response_b"} records (a pairs.jsonl a run wrote adds "id" and
    "source"; a stored id must match the pair's content, so an edited file cannot pair old labels with new text)."""
    pairs, seen = [], {}
    for line, data in read_records(path):
        rec = _Record(data, str(path), line, {})
        unknown = sorted(set(data) - _PAIR_FIELDS)
        if unknown:
            raise rec.error(unknown[0], f"is not a pair field (expected {', '.join(sorted(_PAIR_FIELDS))})")
        prompt = _prompt_messages(rec)
        responses = []
        for field in ("response_a", "response_b"):
            value = rec.get(field)
            if not isinstance(value, str) or not value.strip():
                raise rec.error(field, f"must be a non-empty string, found {json_type(value)}")
            responses.append(value)
        source = data.get("source", f"{path}:{line}")
        if not isinstance(source, str):
            raise rec.error("source", f"must be a string, found {json_type(source)}")
        pair = Pair.create(prompt, responses[0], responses[1], source)
        if "id" in data and data["id"] != pair.id:
            raise rec.error("id", f"is {data['id']!r} but the prompt and responses hash to {pair.id!r}; "
                                  "was the file edited?")
        if pair.id in seen:
            raise rec.error(None, f"the same pair is already on line {seen[pair.id]}")
        seen[pair.id] = line
        pairs.append(pair)
    return pairs
