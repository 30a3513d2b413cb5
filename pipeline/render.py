"""Turn loaded records into token ids and labels: the one place where loss masking is decided.

Conversations are rendered with the tokenizer's chat template; the loss falls on every assistant turn, including
its end-of-turn token (so the model learns to stop), and on nothing else. Raw text for continued pretraining is
concatenated with EOS between documents and cut into blocks, every token carrying loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from pipeline.data import Conversation, Document
from pipeline.errors import ConfigError
from pipeline.log import track

IGNORE = -100


@dataclass
class Tokenized:
    rows: list[dict]
    """Each {"input_ids": [...], "labels": [...]}, labels IGNORE where no loss is taken."""
    dropped_too_long: int = 0
    """Samples longer than max_length, left out (and reported) rather than truncated mid-answer."""
    longest: int = 0


def render_conversation(tokenizer, messages, tools=()) -> tuple[list[int], list[int]]:
    """Token ids of the whole templated conversation, and labels masking everything but the assistant turns (their
    tool calls included: the model learns to make them; tool results carry no loss). `tools`: the tool definitions
    the template renders beside the messages."""
    if not tokenizer.chat_template:
        raise ConfigError("the tokenizer has no chat template: set model.chat_template in the config")
    messages, tools = list(messages), list(tools) or None

    def render(turns, **kwargs) -> str:
        return tokenizer.apply_chat_template(turns, tools=tools, tokenize=False, **kwargs)

    text = render(messages)
    _check_renders_tools(text, tools, messages)
    # Character spans of the assistant turns: the text each assistant message adds beyond the generation prompt.
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True)
        through = render(messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise ConfigError(
                "the chat template renders earlier turns differently once later turns are added; "
                "loss masking needs a prefix-stable template (set model.chat_template)"
            )
        spans.append((len(before), len(through.rstrip())))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # A token straddling a span's start (a template ending its prompt in a space merges it with the answer's first
    # word) still carries loss: masking it would hide the first word of every answer.
    labels = [
        token if any(lo < end and hi > start for start, end in spans) else IGNORE
        for token, (lo, hi) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    return encoded["input_ids"], labels


def _check_renders_tools(text: str, tools, messages) -> None:
    """A template without tool support drops tool definitions and calls without a word: refuse instead."""
    from pipeline.tool_calls import names

    missing = sorted({name for name in names(tools or (), messages) if name not in text})
    if missing:
        raise ConfigError(f"the chat template does not render tools or tool calls (the function(s) {missing} are "
                          "missing from the rendered text): set model.chat_template to a template with tool support")


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template adds to a conversation that has none (SmolLM2's "You are a helpful AI
    assistant named SmolLM..."), or None when it adds none. Found by rendering a user turn alone and with a marked
    system turn: what the template writes where the marked one was is its default."""
    if not tokenizer.chat_template:
        return None
    user = {"role": "user", "content": "\x00user\x00"}
    try:
        alone = tokenizer.apply_chat_template([user], tokenize=False)
        marked = tokenizer.apply_chat_template([{"role": "system", "content": "\x00system\x00"}, user], tokenize=False)
    except Exception:  # a template that refuses a system turn has no default one either
        return None
    opening, _, rest = marked.partition("\x00system\x00")
    closing = rest.partition("\x00user\x00")[0]
    if not opening or not alone.startswith(opening) or closing not in alone[len(opening):]:
        return None
    return alone[len(opening):alone.index(closing, len(opening))]


def system_prompt_note(model_cfg, tokenizer) -> str:
    """What system message a conversation without one gets: the template's default is said out loud."""
    if model_cfg.system_prompt is not None:
        shown = repr(model_cfg.system_prompt) if model_cfg.system_prompt else "an empty one"
        return f"conversations without a system message get {shown} (model.system_prompt)"
    default = default_system_prompt(tokenizer)
    if default is None:
        return "the chat template adds no system message of its own"
    return (f"the chat template gives every conversation without a system message its default {default!r}; "
            "set model.system_prompt to replace it ('' for an empty one)")


def with_system_prompt(template: str, system_prompt: str) -> str:
    """`template` giving every conversation without a system turn `system_prompt` as its first message, so the
    template's own default (if any) is never used. Applied to the tokenizer, it holds for every rendering: training,
    TRL's own templating in dpo, sampling, judging, and the saved tokenizer of every stage's result."""
    import json

    literal = json.dumps(system_prompt)  # ASCII with escapes: a valid Jinja string literal
    # A tokenizer saved by an earlier stage already carries the wrapper: replace it rather than stack another.
    template = _SYSTEM_WRAPPER.sub("", template, count=1)
    return ("{%- if messages and messages[0]['role'] != 'system' %}{%- set messages = [{'role': 'system', "
            f"'content': {literal}}}] + messages %}}{{%- endif %}}" + template)


_SYSTEM_WRAPPER = re.compile(r"^\{%- if messages and messages\[0\]\['role'\] != 'system' %\}\{%- set messages = "
                             r"\[\{'role': 'system', 'content': \"(?:[^\"\\]|\\.)*\"\}\] \+ messages %\}\{%- endif %\}")


def response_ids(tokenizer, prompt: list[dict], response: str) -> list[int]:
    """Token ids of `prompt` answered by `response`, templated exactly as sft trained on it; what reward models
    are trained and scored on, so training and scoring never see different text."""
    return render_conversation(tokenizer, [*prompt, {"role": "assistant", "content": response}])[0]


def prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    """Token ids of `prompt` followed by the template's opening of the assistant's turn: where sampling starts."""
    if not tokenizer.chat_template:
        raise ConfigError("the tokenizer has no chat template: set model.chat_template in the config")
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversations(tokenizer, conversations: list[Conversation], max_length: int) -> Tokenized:
    result = Tokenized(rows=[])
    for conversation in track(conversations, "tokenizing conversations"):
        input_ids, labels = render_conversation(tokenizer, conversation.messages, conversation.tools)
        result.longest = max(result.longest, len(input_ids))
        if len(input_ids) > max_length:
            result.dropped_too_long += 1
            continue
        result.rows.append({"input_ids": input_ids, "labels": labels})
    return result


def tokenize_documents(tokenizer, documents: list[Document], block_size: int) -> Tokenized:
    """Concatenate documents (EOS between them) and cut into blocks of block_size; nothing is dropped but the tail."""
    blocks = list(pack_documents(tokenizer, track(documents, "tokenizing documents"), block_size))
    return Tokenized(rows=list(block_rows(blocks)), longest=max((len(b) for b in blocks), default=0))


def pack_documents(tokenizer, documents: Iterable[Document], block_size: int) -> Iterator[list[int]]:
    """The token ids of `documents`, each followed by EOS, cut into blocks of block_size as they fill (the last one
    shorter): the same blocks whether the documents are a list or a stream read as training goes."""
    buffer: list[int] = []
    for document in documents:
        buffer += tokenizer(document.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        start = 0
        while len(buffer) - start >= block_size:
            yield buffer[start : start + block_size]
            start += block_size
        del buffer[:start]
    if buffer:
        yield buffer


def block_rows(blocks: Iterable[list[int]]) -> Iterator[dict]:
    """Training rows of packed blocks, every token carrying loss. A short final block still trains: it is kept
    unless it is too short to carry signal."""
    return ({"input_ids": block, "labels": list(block)} for block in blocks if len(block) > 1)


def show_sample(tokenizer, row: dict) -> str:
    """The rendered sample as text with the loss-carrying parts wrapped in ⟦ ⟧, for `validate` and the log."""
    pieces, current, in_loss = [], [], None
    for token, label in zip(row["input_ids"], row["labels"]):
        carries = label != IGNORE
        if carries != in_loss and current:
            pieces.append((in_loss, tokenizer.decode(current)))
            current = []
        in_loss = carries
        current.append(token)
    if current:
        pieces.append((in_loss, tokenizer.decode(current)))
    return "".join(f"⟦{text}⟧" if loss else text for loss, text in pieces)
