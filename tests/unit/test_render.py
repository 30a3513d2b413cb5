"""Tokenization and loss masking: the loss falls on assistant turns plus their end-of-turn token, nothing else."""

from __future__ import annotations

import copy

import pytest

from pipeline.data import Conversation, Document
from pipeline.errors import ConfigError
from pipeline.render import IGNORE, render_conversation, show_sample, tokenize_conversations, tokenize_documents

END = "<|im_end|>"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def loss_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive loss-carrying tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def assert_loss_on_assistant_only(tokenizer, messages):
    ids, labels = render_conversation(tokenizer, messages)
    assert len(ids) == len(labels)
    assert all(label in (token, IGNORE) for token, label in zip(ids, labels))  # labels are the ids, or masked
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    runs = [tokenizer.decode(run) for run in loss_runs(ids, labels)]
    expected = [m["content"] + END for m in messages if m["role"] == "assistant"]
    assert runs == expected
    masked = tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in masked
    return ids, labels


SINGLE = [msg("user", "How many eyes does a honeybee have?"), msg("assistant", "Five: two compound eyes and three ocelli.")]
MULTI = [
    msg("system", "You are a terse beekeeping assistant."),
    msg("user", "When do bees swarm?"),
    msg("assistant", "Mostly in late spring."),
    msg("user", "Why?"),
    msg("assistant", "The colony has grown and\nthe old queen leaves with half of it."),
    msg("user", "Thanks"),
    msg("assistant", "You're welcome!"),
]


def test_single_turn(tokenizer):
    ids, labels = assert_loss_on_assistant_only(tokenizer, SINGLE)
    # The template's default system prompt is present and masked.
    masked = tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE])
    assert "You are a helpful AI assistant" in masked


def test_multi_turn_with_system(tokenizer):
    ids, labels = assert_loss_on_assistant_only(tokenizer, MULTI)
    assert len(loss_runs(ids, labels)) == 3


def test_end_of_turn_carries_loss_but_following_newline_does_not(tokenizer):
    ids, labels = render_conversation(tokenizer, SINGLE)
    end_id = tokenizer.convert_tokens_to_ids(END)
    assert end_id == tokenizer.eos_token_id
    end_positions = [i for i, t in enumerate(ids) if t == end_id]
    # system, user, assistant each end with <|im_end|>; only the assistant's carries loss.
    assert [labels[i] != IGNORE for i in end_positions] == [False, False, True]
    last = end_positions[-1]
    assert all(label == IGNORE for label in labels[last + 1:])


@pytest.mark.parametrize("content", [
    "Trailing spaces  ", "Two\n\nparagraphs\n", "Ünïcödé: 蜜蜂 🐝", "42", "", "\nleading newline", "<b>html</b>",
])
def test_unusual_assistant_content(tokenizer, smollm2_tokenizer, content):
    for tok in (tokenizer, smollm2_tokenizer):
        assert_loss_on_assistant_only(tok, [msg("user", "q"), msg("assistant", content)])


@pytest.mark.xfail(strict=True, reason=(
    "Known limitation: with content starting with two spaces the BPE token '\\n ' straddles the start of the "
    "assistant span; it carries loss (so the answer's first space is trained), and with it the prompt's newline"))
def test_leading_spaces_in_assistant_content(smollm2_tokenizer):
    assert_loss_on_assistant_only(smollm2_tokenizer, [msg("user", "q"), msg("assistant", "  indented answer")])


def test_show_sample_wraps_loss_in_brackets(tokenizer):
    ids, labels = render_conversation(tokenizer, MULTI)
    shown = show_sample(tokenizer, {"input_ids": ids, "labels": labels})
    for m in MULTI:
        if m["role"] == "assistant":
            assert f"⟦{m['content']}{END}⟧" in shown
        else:
            assert f"⟦{m['content']}" not in shown and m["content"] in shown
    assert shown.count("⟦") == shown.count("⟧") == 3
    assert shown.replace("⟦", "").replace("⟧", "") == tokenizer.decode(ids)


def test_show_sample_all_and_nothing(tokenizer):
    ids = tokenizer("plain text", add_special_tokens=False)["input_ids"]
    assert show_sample(tokenizer, {"input_ids": ids, "labels": list(ids)}) == "⟦plain text⟧"
    assert show_sample(tokenizer, {"input_ids": ids, "labels": [IGNORE] * len(ids)}) == "plain text"
    assert show_sample(tokenizer, {"input_ids": [], "labels": []}) == ""


def test_tokenize_conversations_drops_and_counts_too_long(tokenizer):
    short = Conversation((msg("user", "Hi"), msg("assistant", "Hello.")), "f:1")
    long = Conversation((msg("user", "Tell me everything."), msg("assistant", "bees " * 200)), "f:2")
    short_len = len(render_conversation(tokenizer, short.messages)[0])
    long_len = len(render_conversation(tokenizer, long.messages)[0])
    assert short_len < long_len

    result = tokenize_conversations(tokenizer, [short, long, short], max_length=short_len)  # == limit is kept
    assert result.dropped_too_long == 1
    assert len(result.rows) == 2
    assert result.longest == long_len
    assert all(len(row["input_ids"]) == short_len for row in result.rows)
    assert result.rows[0] == dict(zip(("input_ids", "labels"), render_conversation(tokenizer, short.messages)))

    everything = tokenize_conversations(tokenizer, [short, long], max_length=long_len)
    assert everything.dropped_too_long == 0 and len(everything.rows) == 2

    nothing = tokenize_conversations(tokenizer, [short, long], max_length=short_len - 1)
    assert nothing.dropped_too_long == 2 and nothing.rows == []

    empty = tokenize_conversations(tokenizer, [], max_length=10)
    assert (empty.rows, empty.dropped_too_long, empty.longest) == ([], 0, 0)


def test_tokenize_documents_blocks(tokenizer):
    texts = ["Bees make honey from nectar.", "A colony has one queen.", "Drones do not sting, but workers do."]
    docs = [Document(text, f"f:{i}") for i, text in enumerate(texts)]
    block = 5
    result = tokenize_documents(tokenizer, docs, block)
    eos = tokenizer.eos_token_id

    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    assert len(stream) % block != 1  # so no single-token tail is left out in this example

    joined = [token for row in result.rows for token in row["input_ids"]]
    assert joined == stream
    assert all(len(row["input_ids"]) == block for row in result.rows[:-1])
    assert 1 < len(result.rows[-1]["input_ids"]) <= block
    assert all(row["labels"] == row["input_ids"] for row in result.rows)  # every token carries loss
    assert result.longest == block and result.dropped_too_long == 0
    # EOS separates (and ends) the documents: splitting the stream at EOS gives the documents back.
    assert joined.count(eos) == len(texts)
    pieces, current = [], []
    for token in joined:
        if token == eos:
            pieces.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    assert pieces == texts

    # A one-token tail is too short to train on and is the only thing ever left out.
    tail_block = next(b for b in range(3, 20) if len(stream) % b == 1)
    cut = tokenize_documents(tokenizer, docs, tail_block)
    assert [t for row in cut.rows for t in row["input_ids"]] == stream[:-1]


def test_tokenize_documents_single_block_and_empty(tokenizer):
    docs = [Document("Short.", "f:1")]
    result = tokenize_documents(tokenizer, docs, block_size=1024)
    assert len(result.rows) == 1
    assert result.rows[0]["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenize_documents(tokenizer, [], block_size=8).rows == []


def test_no_chat_template_is_config_error(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        render_conversation(bare, SINGLE)
    with pytest.raises(ConfigError, match="model.chat_template"):
        tokenize_conversations(bare, [Conversation(tuple(SINGLE), "f:1")], max_length=100)
    assert tokenizer.chat_template  # the shared fixture is untouched


def custom_template_tokenizer(tiny_model_dir, template):
    from pipeline.config import ModelConfig
    from pipeline.models import load_tokenizer

    tok = load_tokenizer(ModelConfig("tiny-random-smollm2", chat_template=template), tiny_model_dir)
    assert tok.chat_template == template
    return tok


def test_configured_chat_template_replaces_tokenizer_own(tiny_model_dir):
    template = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    assert_loss_on_assistant_only(custom_template_tokenizer(tiny_model_dir, template), MULTI)


def test_generation_prompt_ending_in_space(tiny_model_dir):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    tok = custom_template_tokenizer(tiny_model_dir, template)
    ids, labels = render_conversation(tok, MULTI)
    first_words = [tok.decode(run).split()[0] for run in loss_runs(ids, labels)]
    assert first_words == ["Mostly", "The", "You're"]


def test_pad_token_differs_from_eos(tokenizer):
    assert tokenizer.eos_token == END
    assert tokenizer.pad_token is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"


def test_tiny_model_config_matches_tokenizer(tiny_model_dir, tokenizer):
    import json

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_token_id
    assert config["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id
