import json

import pytest

from pipeline.errors import ConfigError, DataError
from reward.importers import detect_format, load_preferences


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


HH_PROMPT = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour."
HH = {"chosen": HH_PROMPT + "\n\nAssistant: Red.", "rejected": HH_PROMPT + "\n\nAssistant: I will not."}


# ---------------------------------------------------------------------------- formats load

def test_prompt_format_strings_and_conversations(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Name a colour.", "chosen": "Red.", "rejected": "No."},
        # UltraFeedback: the prompt as a string, chosen/rejected as whole conversations.
        {"prompt": "Hi", "chosen": [msg("user", "Hi"), msg("assistant", "Hello!")],
         "rejected": [msg("user", "Hi"), msg("assistant", "Go away.")]},
        # TRL conversational: prompt messages, responses as the assistant turn alone.
        {"prompt": [msg("system", "Be brief."), msg("user", "2+2?")],
         "chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")]},
    ])
    rows = load_preferences(path)
    assert [(r.prompt, r.chosen, r.rejected) for r in rows] == [
        ([msg("user", "Name a colour.")], "Red.", "No."),
        ([msg("user", "Hi")], "Hello!", "Go away."),
        ([msg("system", "Be brief."), msg("user", "2+2?")], "4", "5"),
    ]
    assert rows[1].source == f"{path}:2" and rows[0].judge is None


def test_hh_transcripts(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [HH, {"chosen": "Human: Yes?\n\nAssistant: Yes.",
                                                    "rejected": "Human: Yes?\n\nAssistant: No."}])
    rows = load_preferences(path)
    assert rows[0].prompt == [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Name a colour.")]
    assert (rows[0].chosen, rows[0].rejected) == ("Red.", "I will not.")
    assert rows[1].prompt == [msg("user", "Yes?")] and rows[1].chosen == "Yes."


def test_conversations_without_prompt_field(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"chosen": [msg("user", "Hi"), msg("assistant", "Hello")],
                                               "rejected": [msg("user", "Hi"), msg("assistant", "Bye")]}])
    [row] = load_preferences(path)
    assert (row.prompt, row.chosen, row.rejected) == ([msg("user", "Hi")], "Hello", "Bye")


def test_sharegpt_json_array(tmp_path):
    path = tmp_path / "s.json"
    first = {"conversations": [{"from": "human", "value": "Name a colour."}],
             "chosen": {"from": "gpt", "value": "Red."}, "rejected": {"from": "gpt", "value": "No."}}
    second = {"system": "Be brief.", "conversations": [{"from": "human", "value": "2+2?"}],
              "chosen": "4", "rejected": "5"}
    path.write_text(f"[\n  {json.dumps(first)},\n\n  {json.dumps(second)}\n]\n")
    rows = load_preferences(path)
    assert rows[0].prompt == [msg("user", "Name a colour.")] and rows[0].chosen == "Red."
    assert rows[1].prompt == [msg("system", "Be brief."), msg("user", "2+2?")] and rows[1].rejected == "5"
    assert rows[1].source == f"{path}:4"


def test_detect_format():
    assert detect_format({"prompt": "x", "chosen": "y"}) == "prompt"
    assert detect_format(HH) == "hh"
    assert detect_format({"conversations": [], "chosen": "y"}) == "sharegpt"
    with pytest.raises(ValueError, match="cannot detect"):
        detect_format({"text": "x"})


def test_unknown_format_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown preference format"):
        load_preferences(write_jsonl(tmp_path / "p.jsonl", [HH]), "dpo")


# ---------------------------------------------------------------------------- malformed records

GOOD = {"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}], "chosen": "Hello", "rejected": "Bye"}


@pytest.mark.parametrize("record, field, message", [
    ({"prompt": "Hi", "chosen": "Hello"}, "rejected", "missing"),
    ({"prompt": 3, "chosen": "Hello", "rejected": "Bye"}, "prompt", "array"),
    ({**GOOD, "chosen": "  "}, "chosen", "non-empty"),
    ({**GOOD, "rejected": [msg("user", "Something else"), msg("assistant", "Bye")]}, "rejected", "equal the prompt"),
    ({**GOOD, "prompt": [msg("customer", "Hi")]}, "prompt[0].role", "unknown role"),
    ({**GOOD, "prompt": [msg("user", "Hi"), msg("assistant", "Yo")]}, "prompt", "end with a user turn"),
    ({**GOOD, "chosen": [msg("user", "Hi")]}, "chosen[0].role", "assistant's response"),
    ({**GOOD, "chosen": [msg("assistant", 5)]}, "chosen[0].content", "must be a string"),
    ({**GOOD, "prompt": [msg("user", "Hi"), msg("system", "late")]}, "prompt[1].role", "first message"),
    ({**HH, "chosen": "\n\nHuman: Hi there"}, "chosen", "no '\\n\\nAssistant:' turn"),
    ({**HH, "rejected": "\n\nHuman: Hello\n\nAssistant: Bye"}, "rejected", "prompt differs"),
    ({**HH, "chosen": HH_PROMPT + "\n\nAssistant:  "}, "chosen", "is empty"),
    ({**HH, "chosen": "preamble\n\nHuman: Hi\n\nAssistant: x", "rejected": "preamble\n\nHuman: Hi\n\nAssistant: y"},
     "chosen", "before the first"),
    ({**HH, "chosen": 7}, "chosen", "string transcript"),
    ({**SHAREGPT, "conversations": [{"from": "alien", "value": "Hi"}]}, "conversations[0].from", "unknown role"),
    ({**SHAREGPT, "conversations": [{"from": "human"}]}, "conversations[0].value", "missing"),
    ({**SHAREGPT, "chosen": {"from": "human", "value": "Hello"}}, "chosen.from", "assistant's"),
    ({**SHAREGPT, "rejected": None}, "rejected", "message or a string, found null"),
    ({**GOOD, "chosen": {"role": "assistant", "content": "Hello"}}, "chosen", "string or an array"),
])
def test_malformed_records_name_path_line_field(tmp_path, record, field, message):
    # The bad record is the second one, after a blank line, so the line number must be counted, not guessed.
    first = SHAREGPT if "conversations" in record else HH if "prompt" not in record else GOOD
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(first) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as info:
        load_preferences(path)
    error = info.value
    assert (error.path, error.line, error.field) == (str(path), 3, field)
    assert message in str(error) and f"{path}:3" in str(error)


def test_undetectable_first_record(tmp_path):
    with pytest.raises(DataError, match="cannot detect") as info:
        load_preferences(write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}]))
    assert info.value.line == 1
