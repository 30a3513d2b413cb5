"""Existing preference datasets into `PreferenceRow`s (prompt messages, chosen, rejected), and unpaired feedback
files into `FeedbackRow`s (prompt messages, completion, label: see load_feedback), validated strictly.

Accepted formats (.jsonl or .json, via `pipeline.data.read_records`):
  - prompt:   {"prompt", "chosen", "rejected"}; each a string or a message list [{"role", "content"}].
              chosen/rejected may be the response's turn alone or the whole conversation, whose turns before the
              last (assistant) one must equal the prompt (TRL's and UltraFeedback's layouts).
  - hh:       Anthropic HH-RLHF: "chosen"/"rejected" transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."; the text up to
              the last "\\n\\nAssistant:" is the prompt and must be the same in both. Message lists without a
              "prompt" field are read the same way: every turn but the last is the prompt.
  - sharegpt: {"conversations": [{"from", "value"}], "chosen", "rejected", "system"}; chosen/rejected are a
              {"from", "value"} message or a string.
  - auto:     picked from the first record's fields.

Every malformed record is a DataError naming the file, the line and the field (e.g. "conversations[1].from").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from pipeline import data as data_formats
from pipeline.data import read_records
from pipeline.errors import ConfigError, DataError
from reward.pairs import FeedbackRow, Pair, PreferenceRow

FORMATS = ("auto", "prompt", "hh", "sharegpt")
_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_ASSISTANT = "\n\nAssistant:"
_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number",
               str: "string", list: "array", dict: "object"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class _Record:
    data: dict
    path: str
    line: int

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(self.path, self.line, field, message)

    def get(self, field: str) -> Any:
        if field not in self.data:
            raise self.error(field, "is required but missing")
        return self.data[field]

    def row(self, prompt: list[dict], chosen: str, rejected: str) -> PreferenceRow:
        return PreferenceRow(prompt, chosen, rejected, source=f"{self.path}:{self.line}")


# ---------------------------------------------------------------------------- messages

def _messages(rec: _Record, field: str, value: Any, roles: Mapping[str, str] = _ROLES,
              role_key: str = "role", content_key: str = "content") -> list[dict]:
    """A list of {role_key, content_key} objects as messages; roles known, contents non-empty strings."""
    if not isinstance(value, list):
        raise rec.error(field, f"must be an array of messages, found {_json_type(value)}")
    if not value:
        raise rec.error(field, "must contain at least one message")
    messages = []
    for index, item in enumerate(value):
        where = f"{field}[{index}]"
        messages.append(_message(rec, where, item, roles, role_key, content_key))
        if messages[-1]["role"] == "system" and index:
            raise rec.error(f"{where}.{role_key}", "a system message is only allowed as the first message")
    return messages


def _message(rec: _Record, where: str, item: Any, roles: Mapping[str, str], role_key: str, content_key: str) -> dict:
    if not isinstance(item, dict):
        raise rec.error(where, f"must be an object, found {_json_type(item)}")
    for key in (role_key, content_key):
        if key not in item:
            raise rec.error(f"{where}.{key}", "is required but missing")
    role, content = item[role_key], item[content_key]
    if not isinstance(role, str):
        raise rec.error(f"{where}.{role_key}", f"must be a string, found {_json_type(role)}")
    if role not in roles:
        raise rec.error(f"{where}.{role_key}", f"unknown role {role!r}; valid roles: {', '.join(roles)}")
    if not isinstance(content, str):
        raise rec.error(f"{where}.{content_key}", f"must be a string, found {_json_type(content)}")
    if roles[role] != "system" and not content.strip():
        raise rec.error(f"{where}.{content_key}", "must be a non-empty string")
    return {"role": roles[role], "content": content}


def _check_prompt(rec: _Record, field: str, messages: list[dict]) -> list[dict]:
    # A judge or reward model scores a response to the user's last turn; any other ending has nothing to answer.
    if messages[-1]["role"] != "user":
        raise rec.error(field, f"the prompt must end with a user turn, not {messages[-1]['role']!r}")
    return messages


def _response(rec: _Record, field: str, value: Any, prompt: list[dict] | None) -> tuple[list[dict] | None, str]:
    """(the turns before the response, the response) from a string or a conversation ending in the response."""
    if isinstance(value, str):
        if not value.strip():
            raise rec.error(field, "must be a non-empty response")
        return None, value
    if not isinstance(value, list):
        raise rec.error(field, f"must be a string or an array of messages, found {_json_type(value)}")
    messages = _messages(rec, field, value)
    if messages[-1]["role"] != "assistant":
        raise rec.error(f"{field}[{len(messages) - 1}].role", "the last turn must be the assistant's response")
    earlier = messages[:-1]
    if earlier and prompt is not None and earlier != prompt:
        raise rec.error(field, "the turns before the response must equal the prompt")
    return earlier or None, messages[-1]["content"]


# ---------------------------------------------------------------------------- formats

def _from_prompt(rec: _Record) -> PreferenceRow:
    value = rec.get("prompt")
    if isinstance(value, str):
        if not value.strip():
            raise rec.error("prompt", "must be a non-empty string")
        prompt = [{"role": "user", "content": value}]
    elif not isinstance(value, list):
        raise rec.error("prompt", f"must be a string or an array of messages, found {_json_type(value)}")
    else:
        prompt = _check_prompt(rec, "prompt", _messages(rec, "prompt", value))
    chosen = _response(rec, "chosen", rec.get("chosen"), prompt)[1]
    rejected = _response(rec, "rejected", rec.get("rejected"), prompt)[1]
    return rec.row(prompt, chosen, rejected)


def _hh_split(rec: _Record, field: str) -> tuple[str, str]:
    """A transcript's prompt text (up to its last Assistant marker) and the response after it."""
    text = rec.get(field)
    if not isinstance(text, str):
        raise rec.error(field, f"must be a string transcript, found {_json_type(text)}")
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
    parts = _HH_TURN.split(text)  # [before the first turn, role, content, role, content, ...]
    if parts[0].strip():
        raise rec.error(field, f"text before the first '\\n\\nHuman:' turn: {parts[0][:40]!r}")
    messages = [{"role": _HH_ROLES[role], "content": content.strip()}
                for role, content in zip(parts[1::2], parts[2::2])]
    if not any(m["role"] == "user" for m in messages):
        raise rec.error(field, "the transcript has no '\\n\\nHuman:' turn before the response")
    return _check_prompt(rec, field, messages)


def _from_hh(rec: _Record) -> PreferenceRow:
    if isinstance(rec.get("chosen"), list):
        return _from_conversations(rec)
    chosen_prompt, chosen = _hh_split(rec, "chosen")
    rejected_prompt, rejected = _hh_split(rec, "rejected")
    if chosen_prompt != rejected_prompt:
        at = next((i for i, (x, y) in enumerate(zip(chosen_prompt, rejected_prompt)) if x != y),
                  min(len(chosen_prompt), len(rejected_prompt)))
        raise rec.error("rejected", f"its prompt differs from chosen's at character {at}: both transcripts must "
                                    "share everything before the last '\\n\\nAssistant:'")
    return rec.row(_hh_messages(rec, "chosen", chosen_prompt), chosen, rejected)


def _from_conversations(rec: _Record) -> PreferenceRow:
    """chosen/rejected as whole conversations with no prompt field: the shared turns before the last are the prompt."""
    prompt, chosen = _response(rec, "chosen", rec.get("chosen"), None)
    if prompt is None:
        raise rec.error("chosen", "without a 'prompt' field, the conversation must hold the prompt's turns too")
    _check_prompt(rec, "chosen", prompt)
    rejected_prompt, rejected = _response(rec, "rejected", rec.get("rejected"), prompt)
    if rejected_prompt is None:
        raise rec.error("rejected", "must hold the same prompt turns as chosen")
    return rec.row(prompt, chosen, rejected)


def _sharegpt_response(rec: _Record, field: str) -> str:
    value = rec.get(field)
    if isinstance(value, str):
        if not value.strip():
            raise rec.error(field, "must be a non-empty response")
        return value
    if not isinstance(value, dict):
        raise rec.error(field, f"must be a {{from, value}} message or a string, found {_json_type(value)}")
    message = _message(rec, field, value, _SHAREGPT_ROLES, "from", "value")
    if message["role"] != "assistant":
        raise rec.error(f"{field}.from", f"is {value['from']!r}, but the response must be the assistant's")
    return message["content"]


def _from_sharegpt(rec: _Record) -> PreferenceRow:
    prompt = _messages(rec, "conversations", rec.get("conversations"), _SHAREGPT_ROLES, "from", "value")
    system = rec.data.get("system")
    if system is not None and not isinstance(system, str):
        raise rec.error("system", f"must be a string, found {_json_type(system)}")
    if system and system.strip():
        if prompt[0]["role"] == "system":
            raise rec.error("system", "the conversation already starts with a system message")
        prompt.insert(0, {"role": "system", "content": system})
    _check_prompt(rec, "conversations", prompt)
    return rec.row(prompt, _sharegpt_response(rec, "chosen"), _sharegpt_response(rec, "rejected"))


_CONVERTERS = {"prompt": _from_prompt, "hh": _from_hh, "sharegpt": _from_sharegpt}


# How `format: auto` recognises a preference format (pipeline.data.detect_format), in order of precedence. "chosen"
# alone suffices so a record missing "rejected" gets a missing-field error.
PREFERENCE_SIGNS = (("sharegpt", "conversations", "'conversations'"), ("prompt", "prompt", "'prompt'"),
                    ("hh", "chosen", "'chosen' and 'rejected' transcripts"))


def detect_format(record: dict) -> str:
    """The preference format a record's field names point to."""
    return data_formats.detect_format(record, PREFERENCE_SIGNS, "preference ")


def load_preferences(path, format: str = "auto") -> list[PreferenceRow]:
    """Chosen/rejected rows from a .jsonl or .json preference dataset."""
    if format not in FORMATS:
        raise ConfigError(f"unknown preference format {format!r}; valid formats: {', '.join(FORMATS)}")
    rows = []
    for line, data in read_records(path):
        if format == "auto":
            format = data_formats.detect_in_file(path, line, data, PREFERENCE_SIGNS, "preference ")
        rows.append(_CONVERTERS[format](_Record(data, str(path), line)))
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
        raise rec.error(given[0], f"must be true or false, found {_json_type(value)} {value!r}")
    return value


def _prompt_completion(rec: _Record) -> tuple[list[dict], str]:
    """TRL's unpaired layout: "prompt" (a string or messages) and "completion" (a string, the assistant's turn, or the
    whole conversation ending in it)."""
    prompt = _prompt_messages(rec) if "prompt" in rec.data else None
    if prompt is None:
        raise rec.error("prompt", "is required but missing")
    return prompt, _response(rec, "completion", rec.get("completion"), prompt)[1]


def load_feedback(path, format: str = "auto") -> list[FeedbackRow]:
    """Unpaired thumbs-up/down rows from a .jsonl or .json file: a conversation in the messages, sharegpt or alpaca
    format whose last assistant turn is the response judged (LLaMA-Factory's KTO files), or {"prompt", "completion"}
    (TRL's); with a boolean "label" (or "kto_tag"). Every malformed record is a DataError naming path, line, field."""
    if format not in FEEDBACK_FORMATS:
        raise ConfigError(f"unknown feedback format {format!r}; valid formats: {', '.join(FEEDBACK_FORMATS)}")
    rows = []
    for line, data in read_records(path):
        if format == "auto":
            format = data_formats.detect_in_file(path, line, data, FEEDBACK_SIGNS, "feedback ")
        rec = _Record(data, str(path), line)
        if format == "prompt_completion":
            prompt, completion = _prompt_completion(rec)
        else:
            messages = list(data_formats.record_conversation(data, path, line, format).messages)
            prompt, completion = messages[:-1], messages[-1]["content"]
        rows.append(FeedbackRow(prompt, completion, _feedback_label(rec), f"{path}:{line}"))
    return rows


# ---------------------------------------------------------------------------- prompts and unlabelled pairs

def _prompt_messages(rec: _Record) -> list[dict]:
    """The prompt of a record: "prompt" (a string or messages), or "messages" whose trailing assistant turn (an sft
    answer) is dropped, so an sft file doubles as a prompt file."""
    if "prompt" in rec.data:
        value = rec.data["prompt"]
        if isinstance(value, str):
            if not value.strip():
                raise rec.error("prompt", "must be a non-empty string")
            return [{"role": "user", "content": value}]
        if not isinstance(value, list):
            raise rec.error("prompt", f"must be a string or an array of messages, found {_json_type(value)}")
        return _check_prompt(rec, "prompt", _messages(rec, "prompt", value))
    if "messages" in rec.data:
        messages = _messages(rec, "messages", rec.data["messages"])
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise rec.error("messages", "has no user turn to answer")
        return _check_prompt(rec, "messages", messages)
    raise rec.error("prompt", "is required but missing (or give 'messages')")


def load_prompts(path) -> list[tuple[list[dict], str]]:
    """(prompt messages, "path:line") for every record of a prompt file: {"prompt"} or {"messages"} per line."""
    prompts = []
    for line, data in read_records(path):
        rec = _Record(data, str(path), line)
        prompts.append((_prompt_messages(rec), f"{path}:{line}"))
    return prompts


# A labelled file (pairs with the winner a person gave) is also a valid pairs file: the label fields are ignored here.
_PAIR_FIELDS = {"id", "prompt", "response_a", "response_b", "source", "winner", "confidence", "note"}


def load_pairs(path) -> list[Pair]:
    """Unlabelled pairs from {"prompt", "response_a", "response_b"} records (a pairs.jsonl a run wrote adds "id" and
    "source"; a stored id must match the pair's content, so an edited file cannot pair old labels with new text)."""
    pairs, seen = [], {}
    for line, data in read_records(path):
        rec = _Record(data, str(path), line)
        unknown = sorted(set(data) - _PAIR_FIELDS)
        if unknown:
            raise rec.error(unknown[0], f"is not a pair field (expected {', '.join(sorted(_PAIR_FIELDS))})")
        prompt = _prompt_messages(rec)
        responses = []
        for field in ("response_a", "response_b"):
            value = rec.get(field)
            if not isinstance(value, str) or not value.strip():
                raise rec.error(field, f"must be a non-empty string, found {_json_type(value)}")
            responses.append(value)
        source = data.get("source", f"{path}:{line}")
        if not isinstance(source, str):
            raise rec.error("source", f"must be a string, found {_json_type(source)}")
        pair = Pair.create(prompt, responses[0], responses[1], source)
        if "id" in data and data["id"] != pair.id:
            raise rec.error("id", f"is {data['id']!r} but the prompt and responses hash to {pair.id!r}; "
                                  "was the file edited?")
        if pair.id in seen:
            raise rec.error(None, f"the same pair is already on line {seen[pair.id]}")
        seen[pair.id] = line
        pairs.append(pair)
    return pairs
