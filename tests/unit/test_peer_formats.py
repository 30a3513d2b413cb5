"""The shapes other projects' data files come in (OpenAI, LLaMA-Factory, FastChat, HH-RLHF, UltraFeedback), on
small fixtures written by us in tests/fixtures/formats: each is read as its authors meant, or refused out loud."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.data import load_conversations, load_texts
from pipeline.errors import ConfigError, DataError
from pipeline.records import BadRows, BadRowsError
from pipeline.render import IGNORE, default_system_prompt, render_conversation, with_system_prompt
from reward.importers import load_preferences, load_prompts

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "formats"

# A ChatML template with tool support, in the shape of Qwen2.5's: tool definitions in the system turn, calls as
# <tool_call> JSON in the assistant's turn, results as tool turns. The tiny model's SmolLM2 template has none.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n"
    "{% endif %}# Tools\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}<|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}\n<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}"
    "{%- if message.tool_calls is defined %}{%- for call in message.tool_calls %}<tool_call>"
    "{{ call['function'] | tojson }}</tool_call>{%- endfor %}{%- endif %}<|im_end|>{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}\n<|im_start|>assistant\n{%- endif %}"
)


def fixture(name: str) -> Path:
    return FIXTURES / name


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------- content as a list of parts

def test_content_parts_text_joined_other_parts_refused():
    bad = BadRows()
    [conversation] = load_conversations(fixture("openai_parts.jsonl"), bad=bad)
    assert conversation.messages == (msg("system", "You are terse."), msg("user", "Capital of France? One word."),
                                     msg("assistant", "Paris."))
    [error] = bad.errors
    assert (error.line, error.field) == (2, "messages[0].content[1].type")
    assert "'image_url': only text parts" in str(error)


def test_content_parts_in_preference_rows(tmp_path):
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": parts}],
                                               "chosen": [{"role": "assistant", "content": parts}],
                                               "rejected": "Bye"}])
    [row] = load_preferences(path)
    assert (row.prompt, row.chosen) == ([msg("user", "Hello")], "Hello")


# ---------------------------------------------------------------------------- tool calls

def test_openai_tool_calls():
    [conversation] = load_conversations(fixture("openai_tools.jsonl"))
    user, call, result, answer = conversation.messages
    assert call == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}, "id": "call_1"}]}
    assert result == {"role": "tool", "content": '{"rain": true, "temp_c": 7}', "tool_call_id": "call_1"}
    assert answer["role"] == "assistant"
    assert conversation.tools[0]["function"]["name"] == "get_weather"


def test_sharegpt_function_call_and_observation():
    [conversation] = load_conversations(fixture("sharegpt_tools.jsonl"))
    roles = [m["role"] for m in conversation.messages]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert conversation.messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "multiply", "arguments": {"a": 7, "b": 6}}}]
    assert conversation.tools == ({"type": "function", "function": {
        "name": "multiply", "description": "Multiply two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}},)


@pytest.mark.parametrize("turns, field, fragment", [
    ([msg("user", "q"), {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}, msg("assistant", "a")],
     "messages[2].role", "followed by their results"),
    ([msg("user", "q"), msg("tool", "42"), msg("assistant", "a")], "messages[1].role", "must follow the assistant's"),
    ([msg("user", "q"), {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}],
     "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
])
def test_tool_turns_malformed(tmp_path, turns, field, fragment):
    with pytest.raises(DataError) as info:
        load_conversations(write_jsonl(tmp_path / "t.jsonl", [{"messages": turns}]))
    assert info.value.field == field and fragment in str(info.value)


def test_tool_calls_render_with_loss_on_the_call_not_the_result(tokenizer):
    [conversation] = load_conversations(fixture("openai_tools.jsonl"))
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = TOOL_TEMPLATE
        ids, labels = render_conversation(tokenizer, conversation.messages, conversation.tools)
    finally:
        tokenizer.chat_template = original
    trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    untrained = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE])
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in trained
    assert "Yes, it is raining in Oslo" in trained
    assert '"rain": true' in untrained and "Current weather in a city" in untrained  # the result, the definitions
    assert "Is it raining" in untrained


def test_a_template_without_tool_support_is_refused(tokenizer):
    [conversation] = load_conversations(fixture("sharegpt_tools.jsonl"))
    with pytest.raises(ConfigError, match=r"does not render tools.*\['multiply'\].*model.chat_template"):
        render_conversation(tokenizer, conversation.messages, conversation.tools)


# ---------------------------------------------------------------------------- preference layouts

def test_ultrafeedback_scores_make_ties_and_extra_fields_are_named(capsys):
    rows = load_preferences(fixture("ultrafeedback.jsonl"))
    assert [(r.prompt, r.chosen, r.rejected, r.tie) for r in rows] == [
        ([msg("user", "Name a prime.")], "7.", "9.", False), ([msg("user", "Say hi.")], "Hi!", "Hello!", True)]
    warning = " ".join(capsys.readouterr().err.split())
    assert "ignored: messages (2 of 2 records), prompt_id (2 of 2 records)" in warning


def test_scores_the_wrong_way_round_are_a_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 1,
                                               "score_rejected": 5}])
    with pytest.raises(DataError, match="below score_rejected 5: the pair is labelled the wrong way round"):
        load_preferences(path)


def test_chosen_messages_and_rejected_messages():
    [row] = load_preferences(fixture("chosen_messages.jsonl"))
    assert (row.prompt, row.chosen, row.rejected) == (
        [msg("user", "Is water wet?")], "Yes: it wets what it touches.", "No idea.")


def test_chosen_string_disagreeing_with_chosen_messages(tmp_path):
    record = json.loads(fixture("chosen_messages.jsonl").read_text())
    path = write_jsonl(tmp_path / "c.jsonl", [{**record, "chosen": "Something else."}])
    with pytest.raises(DataError, match="differs from the last turn of chosen_messages"):
        load_preferences(path)


def test_preference_columns_rename_and_name_file_fields_in_errors(tmp_path):
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    path = write_jsonl(tmp_path / "r.jsonl", [{"question": "q", "good": "a", "bad": "b"},
                                              {"question": "q", "good": "a", "bad": ""}])
    with pytest.raises(DataError) as info:
        load_preferences(path, columns=columns)
    assert (info.value.line, info.value.field) == (2, "bad")
    [row] = load_preferences(write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "good": "a", "bad": "b"}]),
                             columns=columns)
    assert (row.prompt, row.chosen, row.rejected) == ([msg("user", "q")], "a", "b")
    with pytest.raises(ConfigError, match="'choosen'"):
        load_preferences(path, columns={"choosen": "good"})


def test_prompt_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "Why?"}])
    assert load_prompts(path, columns={"prompt": "question"})[0][0] == [msg("user", "Why?")]


@pytest.mark.parametrize("transcript, fragment", [
    ("\n\nHuman: Hi\n\nAssistant: Hello\n\nAssistant: Anything else?\n\nHuman: No.\n\nAssistant: ", "turn 3 is "
     "Assistant"),
    ("\n\nHuman: Hi\n\nHuman: Hello?\n\nAssistant: ", "turn 2 is Human"),
    ("\n\nHuman: Hi\n\nAssistant: Yes\n\nAssistant: ", "two Assistant turns in a row"),
    ("\n\nHuman:  \n\nAssistant: ", "turn 1 (Human) is empty"),
])
def test_hh_as_strict_as_the_sft_reader(tmp_path, transcript, fragment):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": transcript + "Good.", "rejected": transcript + "Bad."}])
    with pytest.raises(DataError, match=re.escape(fragment)):
        load_preferences(path)


def test_preference_prompt_turns_must_alternate(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [msg("user", "a"), msg("user", "b")], "chosen": "x",
                                               "rejected": "y"}])
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert info.value.field == "prompt[1].role" and "must be the assistant's" in str(info.value)


# ---------------------------------------------------------------------------- loud instead of silent

def test_images_are_refused():
    with pytest.raises(DataError) as info:
        load_conversations(fixture("images.jsonl"))
    assert info.value.field == "images" and "<image>" in str(info.value)


def test_kto_undesirable_rows_are_refused_for_sft():
    bad = BadRows()
    [kept] = load_conversations(fixture("kto.jsonl"), bad=bad)
    assert kept.messages[-1]["content"] == "You did well today."
    [error] = bad.errors
    assert (error.line, error.field) == (2, "label") and "marked undesirable" in str(error)


def test_unread_fields_are_named_in_a_warning(tmp_path, capsys):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": 1, "messages": [msg("user", "q"), msg("assistant", "a")]}])
    load_conversations(path)
    assert "fields the messages format does not read, ignored: id (1 of 1 records)" in " ".join(
        capsys.readouterr().err.split())


def test_txt_one_document_per_line():
    documents = load_texts(fixture("cpt_lines.txt"), format="lines")
    assert [d.text for d in documents][:2] == ["First document on one line.", "Second document, also one line."]
    assert [d.source.rsplit(":", 1)[1] for d in documents] == ["1", "2", "3", "4"]
    assert len(load_texts(fixture("cpt_lines.txt"))) == 1  # paragraphs: what the cpt stage refuses to split


def test_default_system_prompt_found_and_replaced(tokenizer):
    assert default_system_prompt(tokenizer) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = with_system_prompt(original, "")
        text = tokenizer.apply_chat_template([msg("user", "q")], tokenize=False)
        assert "SmolLM" not in text and default_system_prompt(tokenizer) == ""
        tokenizer.chat_template = with_system_prompt(tokenizer.chat_template, "Be brief.")  # replaces, not stacks
        assert tokenizer.chat_template.count("set messages") == 1 and default_system_prompt(tokenizer) == "Be brief."
    finally:
        tokenizer.chat_template = original


# ---------------------------------------------------------------------------- every bad row in one pass

def test_every_bad_row_in_one_pass(tmp_path):
    good = {"messages": [msg("user", "q"), msg("assistant", "a")]}
    records = [good, {"messages": [msg("user", "q")]}] * 12 + [good]
    path = write_jsonl(tmp_path / "m.jsonl", records)
    lines = path.read_text().splitlines()
    lines[4] = "{broken"
    path.write_text("\n".join(lines) + "\n")
    bad = BadRows()
    kept = load_conversations(path, bad=bad)
    assert len(kept) == 12 and len(bad.errors) == 13
    assert [e.line for e in bad.errors][:3] == [2, 4, 5]
    with pytest.raises(BadRowsError) as info:
        bad.settle("error", "sft.data")
    message = str(info.value)
    assert message.startswith("sft.data: 13 bad rows:") and "... and 0 more" not in message
    assert message.count(str(path)) == 13 and "sft.data.bad_rows: drop" in message
    many = BadRows()
    many.errors = bad.errors * 3
    with pytest.raises(BadRowsError, match=r"39 bad rows:[\s\S]*\.\.\. and 19 more"):
        many.settle("error", "sft.data")
    assert bad.settle("drop", "sft.data") == 13
