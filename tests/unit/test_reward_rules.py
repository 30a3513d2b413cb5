"""The demo preference data (data/preferences/) and the rule scorers that check its labelling rule (reward/rules.py).

The pairs were labelled "prefer the specific answer (figures written with digits) over the vague one"; these tests hold
the data to that rule, to balanced positions, lengths and "Tip:" markers (so none is a shortcut a reward model could
learn instead), hold the cue-breaking probe to its design (the marker always on the rejected answer), and check that
the `rule` judge with reward.rules:specificity agrees with every label.
"""

import json
import re
from pathlib import Path

import pytest

from reward.importers import load_pairs, load_prompts
from reward.judges import HumanFileJudge, RuleJudge
from reward.rules import HEDGE_PHRASES, has_tip, hedges, is_specific, shorter, specificity

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "data" / "preferences" / "beekeeping_pairs.jsonl"
PROMPTS = REPO / "data" / "preferences" / "prompts.jsonl"
EVAL_PROMPTS = REPO / "data" / "preferences" / "eval_prompts.jsonl"
PROBE = REPO / "data" / "preferences" / "cue_probe_pairs.jsonl"
SFT = REPO / "data" / "sft" / "beekeeping_qa.jsonl"
USER = [{"role": "user", "content": "How much syrup should I feed?"}]


def words(text: str) -> int:
    return len(text.split())


def read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def chosen_rejected(records: list[dict]) -> list[tuple[dict, str, str]]:
    """(record, chosen, rejected) for every pair that is not a tie."""
    rows = []
    for record in records:
        if record["winner"] != "tie":
            loser = "b" if record["winner"] == "a" else "a"
            rows.append((record, record[f"response_{record['winner']}"], record[f"response_{loser}"]))
    return rows


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return read(PAIRS)


@pytest.fixture(scope="module")
def decided(records) -> list[tuple[dict, str, str]]:
    return chosen_rejected(records)


@pytest.fixture(scope="module")
def probe() -> list[tuple[dict, str, str]]:
    return [(record, record["chosen"], record["rejected"]) for record in read(PROBE)]


@pytest.fixture(scope="module")
def sft_questions() -> set[str]:
    questions = set()
    with open(SFT, encoding="utf-8") as f:
        for line in f:
            for message in json.loads(line)["messages"]:
                if message["role"] == "user":
                    questions.add(message["content"].strip().lower())
    return questions


# ---------------------------------------------------------------------------- the rules

@pytest.mark.parametrize("response, score", [
    ("Feed 2:1 syrup in autumn. Tip: Feed in the evening.", 1.0),
    ("Feed heavy syrup in autumn. Tip: Feed in the evening.", 0.0),  # the marker is not the property
    ("Feed about 10 litres of syrup in autumn.", 1.0),
    ("It depends. Generally speaking, feed when they are light.", -2.0),
    ("IT DEPENDS on the colony; give 5 kg. Tip: Heft first.", 0.0),
    ("It depends, and it depends again.", -1.0),  # a phrase costs once, however often it appears
])
def test_specificity(response, score):
    assert specificity(USER, response) == score


def test_tip_must_start_a_sentence():
    assert has_tip("Tip: Heft the hive.") and has_tip("Feed 5 kg.\nTip: Heft the hive.")
    assert has_tip('He said "stop." Tip: Heft the hive.')
    assert not has_tip("A useful tip: heft the hive.") and not has_tip("My Tip: heft it.")
    assert not has_tip("Feed 5 kg. Tip:")  # nothing after it


def test_hedges_match_whole_words_case_insensitively():
    assert hedges("Every  situation is\ndifferent, so CONSULT an experienced keeper.") == [
        "every situation is different", "consult an experienced"]
    assert hedges("The bit depends on the hive.") == []
    assert 6 <= len(HEDGE_PHRASES) <= 10


def test_is_specific_and_shorter():
    assert is_specific(USER, "Give 2 kg. Tip: Heft first.") == 1.0
    assert is_specific(USER, "Give 2 kg, but it depends. Tip: Heft first.") == 0.0
    assert is_specific(USER, "Give 2 kg.") == 1.0
    assert is_specific(USER, "Give plenty. Tip: Heft first.") == 0.0
    assert shorter(USER, "one two three") == -3.0 and shorter(USER, "") == 0.0


@pytest.mark.parametrize("name", ["specificity", "is_specific", "shorter"])
def test_rule_judge_loads_each_rule(name):
    assert RuleJudge(f"reward.rules:{name}").name == f"rule:reward.rules:{name}"


# ---------------------------------------------------------------------------- the pairs file

def test_every_pair_loads_and_the_file_labels_all_of_them(records):
    pairs = load_pairs(PAIRS)
    assert len(pairs) == len(records) == 192
    labels = HumanFileJudge(PAIRS).judge(pairs)
    assert [label.winner for label in labels] == [record["winner"] for record in records]
    assert [record["winner"] for record in records].count("tie") == 12


def test_pair_prompts_are_distinct_and_not_sft_questions(records, sft_questions):
    prompts = [record["prompt"].strip().lower() for record in records]
    assert len(set(prompts)) == len(prompts)
    assert not set(prompts) & sft_questions


def test_prompt_file_is_distinct_from_pairs_and_sft(records, sft_questions):
    loaded = load_prompts(PROMPTS) + load_prompts(EVAL_PROMPTS)
    assert len(loaded) == 120 + 113
    assert all(len(messages) == 1 and messages[0]["role"] == "user" for messages, _ in loaded)
    prompts = [messages[0]["content"].strip().lower() for messages, _ in loaded]
    assert len(set(prompts)) == len(prompts)
    assert not set(prompts) & sft_questions
    assert not set(prompts) & {record["prompt"].strip().lower() for record in records}


def test_the_winner_is_always_the_specific_answer(decided):
    for record, chosen, rejected in decided:
        assert is_specific(USER, chosen) == 1.0, record["prompt"]
        assert is_specific(USER, rejected) == 0.0, record["prompt"]
        # The vague answer has no figure at all, not just fewer of them.
        assert not re.search(r"\d", rejected), record["prompt"]


def test_the_tip_marker_is_not_the_cue(decided):
    """The sft data closes every answer with "Tip:", so a marker on the chosen side only would teach the reward model
    and DPO what sft already does. Each of the four (chosen, rejected) marker combinations is a quarter of the pairs."""
    combos = [(has_tip(chosen), has_tip(rejected)) for _, chosen, rejected in decided]
    for combo in [(True, True), (True, False), (False, True), (False, False)]:
        assert 0.2 <= combos.count(combo) / len(combos) <= 0.3, combo


def test_the_probe_puts_the_marker_on_the_rejected_answer(probe, records):
    """data/preferences/cue_probe_pairs.jsonl (rm.data.probes): a reward model that learnt "Tip:" scores it below
    chance. Its prompts are in no other file, so the demo's rm never trains on them."""
    assert len(probe) == 48
    for record, chosen, rejected in probe:
        assert is_specific(USER, chosen) == 1.0 and not has_tip(chosen), record["prompt"]
        assert is_specific(USER, rejected) == 0.0 and has_tip(rejected), record["prompt"]
    others = {record["prompt"].lower() for record in records}
    others |= {messages[0]["content"].lower() for messages, _ in load_prompts(PROMPTS) + load_prompts(EVAL_PROMPTS)}
    assert not {record["prompt"].lower() for record, _, _ in probe} & others


def test_ties_are_two_specific_answers(records):
    for record in records:
        if record["winner"] == "tie":
            assert is_specific(USER, record["response_a"]) == is_specific(USER, record["response_b"]) == 1.0


def test_responses_are_20_to_70_words_and_of_comparable_length(records):
    for record in records:
        a, b = words(record["response_a"]), words(record["response_b"])
        assert 20 <= a <= 70 and 20 <= b <= 70, record["prompt"]
        assert max(a, b) <= 1.35 * min(a, b), record["prompt"]


def test_position_is_not_the_cue(decided):
    first = sum(record["winner"] == "a" for record, _, _ in decided)
    assert 0.40 <= first / len(decided) <= 0.60


def test_length_is_not_the_cue(decided):
    longer = sum(words(chosen) > words(rejected) for _, chosen, rejected in decided)
    assert 0.35 <= longer / len(decided) <= 0.65


def test_the_specificity_rule_agrees_with_every_label(records):
    pairs = load_pairs(PAIRS)
    labels = RuleJudge("reward.rules:specificity").judge(pairs)
    for record, label in zip(records, labels):
        if record["winner"] != "tie":
            assert label.winner == record["winner"], record["prompt"]
