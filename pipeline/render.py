"""Turn loaded records into token ids and labels: the one place where loss masking is decided.

Conversations are rendered with the tokenizer's chat template; the loss falls on every assistant turn, including
its end-of-turn token (so the model learns to stop), and on nothing else. Raw text for continued pretraining is
concatenated with EOS between documents and cut into blocks, every token carrying loss.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def render_conversation(tokenizer, messages) -> tuple[list[int], list[int]]:
    """Token ids of the whole templated conversation, and labels masking everything but the assistant turns."""
    if not tokenizer.chat_template:
        raise ConfigError("the tokenizer has no chat template: set model.chat_template in the config")
    messages = list(messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    # Character spans of the assistant turns: the text each assistant message adds beyond the generation prompt.
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
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
        input_ids, labels = render_conversation(tokenizer, conversation.messages)
        result.longest = max(result.longest, len(input_ids))
        if len(input_ids) > max_length:
            result.dropped_too_long += 1
            continue
        result.rows.append({"input_ids": input_ids, "labels": labels})
    return result


def tokenize_documents(tokenizer, documents: list[Document], block_size: int) -> Tokenized:
    """Concatenate documents (EOS between them) and cut into blocks of block_size; nothing is dropped but the tail."""
    stream: list[int] = []
    for document in track(documents, "tokenizing documents"):
        stream += tokenizer(document.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    # A short final block still trains: keep it unless it is too short to carry signal.
    rows = [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]
    return Tokenized(rows=rows, longest=max((len(b) for b in blocks), default=0))


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
