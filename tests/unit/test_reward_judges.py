import json

import pytest

from pipeline.errors import ConfigError, DataError, PipelineError
from reward.judges import HumanFileJudge, Judge, RuleJudge, combine_both_orders, load_callable, unlabelled
from reward.pairs import Pair

PROMPT = [{"role": "user", "content": "Describe the sky."}]
RULES = '''
def length(prompt, response):
    assert prompt[-1]["role"] == "user"
    return len(response)

def broken(prompt, response):
    return "long"

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def rules_module(tmp_path, monkeypatch):
    (tmp_path / "my_rules.py").write_text(RULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rules"


def pairs() -> list[Pair]:
    return [Pair.create(PROMPT, "Blue and wide.", "Blue.", "p.jsonl:1"),
            Pair.create(PROMPT, "Grey.", "Grey and low.", "p.jsonl:2"),
            Pair.create(PROMPT, "Blue!", "Grey!", "p.jsonl:3")]


@pytest.mark.parametrize("first, swapped, winner", [
    ("A", "B", "a"),  # a shown first wins, then a shown second wins
    ("B", "A", "b"),
    ("A", "A", "tie"),  # the judge picked the first position both times
    (" b ", "b", "tie"),
    ("tie", "TIE", "tie"),
])
def test_combine_both_orders(first, swapped, winner):
    result, verdicts = combine_both_orders(first, swapped)
    assert result == winner
    assert verdicts["ab"] == {"A": "a", "B": "b", "TIE": "tie"}[first.strip().upper()]
    assert verdicts["ba"] == {"A": "b", "B": "a", "TIE": "tie"}[swapped.strip().upper()]


def test_combine_both_orders_rejects_other_answers():
    with pytest.raises(ValueError, match="'A', 'B' or 'tie'"):
        combine_both_orders("A", "maybe")


def test_rule_judge_scores_both_responses(rules_module):
    judge = RuleJudge(f"{rules_module}:length")
    assert isinstance(judge, Judge) and judge.name == "rule:my_rules:length"
    labels = judge.judge(pairs())
    assert [label.winner for label in labels] == ["a", "b", "tie"]
    assert labels[0].verdicts == {"scores": {"a": 14.0, "b": 5.0}}
    assert {label.judge for label in labels} == {"rule:my_rules:length"}


def test_rule_judge_needs_a_number(rules_module):
    with pytest.raises(PipelineError, match="finite number"):
        RuleJudge(f"{rules_module}:broken").judge(pairs())


@pytest.mark.parametrize("target, message", [
    ("my_rules", "expected 'module:function'"),
    ("no_such_module_here:score", "no module named 'no_such_module_here'"),
    ("my_rules:missing", "has no 'missing'"),
    ("my_rules:NOT_A_FUNCTION", "not a function"),
])
def test_load_callable_errors(rules_module, target, message):
    with pytest.raises(ConfigError, match=message):
        load_callable(target)


def test_load_callable_reports_a_failing_import(tmp_path, monkeypatch):
    (tmp_path / "needs_dep.py").write_text("import a_dependency_that_is_absent\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="importing 'needs_dep' failed"):
        load_callable("needs_dep:f")


def test_human_file_judge_labels_only_what_the_file_has(tmp_path):
    ps = pairs()
    path = tmp_path / "human.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"pair_id": ps[0].id, "winner": "b", "confidence": 0.7},
        # The same pair as ps[1] but with the responses the other way round: the winner flips.
        {"prompt": "Describe the sky.", "response_a": "Grey and low.", "response_b": "Grey.", "winner": "a"},
        {"pair_id": "unknown-pair", "winner": "tie"},
    ]) + "\n")
    judge = HumanFileJudge(path)
    labels = judge.judge(ps)
    assert [(label.pair_id, label.winner) for label in labels] == [(ps[0].id, "b"), (ps[1].id, "b")]
    assert labels[0].confidence == 0.7 and labels[1].verdicts == {"source": f"{path}:2"}
    assert unlabelled(ps, labels) == [ps[2]]


@pytest.mark.parametrize("record, field", [
    ({"pair_id": "x"}, "winner"),
    ({"pair_id": "x", "winner": "left"}, "winner"),
    ({"prompt": "Hi", "response_a": "x", "winner": "a"}, "response_b"),
    ({"pair_id": "x", "winner": "a", "confidence": "sure"}, "confidence"),
])
def test_human_file_errors_name_line_and_field(tmp_path, record, field):
    path = tmp_path / "human.jsonl"
    path.write_text(json.dumps({"pair_id": "ok", "winner": "a"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as info:
        HumanFileJudge(path)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, field)


def test_human_file_rejects_a_pair_labelled_twice(tmp_path):
    path = tmp_path / "human.jsonl"
    path.write_text(json.dumps({"pair_id": "x", "winner": "a"}) + "\n" + json.dumps({"pair_id": "x", "winner": "b"}))
    with pytest.raises(DataError, match="already labelled on line 1"):
        HumanFileJudge(path)


def test_rule_judge_scores_pointwise(rules_module):
    judge = RuleJudge(f"{rules_module}:length")
    assert judge.score([[{"role": "user", "content": "q"}]] * 2, ["abc", "abcdef"]) == [3.0, 6.0]
    with pytest.raises(PipelineError, match="finite number"):
        RuleJudge(f"{rules_module}:broken").score([[{"role": "user", "content": "q"}]], ["x"])


def test_win_reward_is_two_p_win_minus_one():
    from reward.pairs import Label
    from stages.online import win_reward

    assert win_reward(Label("p", "a", "j", 0.9)) == pytest.approx(0.8)
    assert win_reward(Label("p", "b", "j", 0.9)) == pytest.approx(-0.8)
    assert win_reward(Label("p", "tie", "j", 0.5)) == 0.0
    assert win_reward(Label("p", "a", "j")) == 1.0 and win_reward(Label("p", "b", "j")) == -1.0
