"""The evaluation measures (stages.metrics) and what tracking logs and shows of them."""

from __future__ import annotations

import math

import pytest

from pipeline.tracking import headline, redact
from stages.metrics import binary_f1, loss_curves, overfitting, perplexity, text_overlap

FALLING = [(step, 3.0 - 0.1 * step) for step in range(1, 13)]


@pytest.mark.parametrize("held_out, train, expected", [
    # Held-out loss bottoms out at step 4 and climbs while training loss keeps falling: overfitting.
    ([(0, 2.5), (4, 2.0), (8, 2.2), (12, 2.4)], FALLING, True),
    # The baseline (step 0) is the best, and it only gets worse while training improves: overfitting from the start.
    ([(0, 2.0), (6, 2.3), (12, 2.6)], FALLING, True),
    # Both fall: learning.
    ([(0, 2.5), (4, 2.3), (8, 2.1), (12, 2.0)], FALLING, False),
    # Held-out rises but so does training loss: diverging, not overfitting.
    ([(0, 2.0), (6, 2.3), (12, 2.6)], [(step, 2.0 + 0.1 * step) for step in range(1, 13)], False),
    # A rise within the tolerance is noise.
    ([(0, 2.0), (6, 2.0), (12, 2.01)], FALLING, False),
    # One evaluation, or none: nothing to compare.
    ([(12, 2.0)], FALLING, False),
    ([], FALLING, False),
    # No training losses logged between the best and the last evaluation.
    ([(0, 2.0), (12, 2.6)], [(13, 1.0)], False),
])
def test_overfitting_rule(held_out, train, expected):
    assert overfitting(train, held_out) is expected


def test_loss_curves_read_a_trainer_log_history():
    history = [{"eval_loss": 2.0, "step": 0}, {"loss": 3.0, "step": 1}, {"loss": 2.5, "step": 2},
               {"eval_loss": 1.9, "eval_runtime": 0.1, "step": 2}, {"train_loss": 2.7, "step": 2}]
    assert loss_curves(history, "eval_loss") == ([(1, 3.0), (2, 2.5)], [(0, 2.0), (2, 1.9)])


def test_perplexity_is_exp_of_the_loss():
    assert perplexity(math.log(10)) == pytest.approx(10)
    assert math.isfinite(perplexity(1e6))


def test_text_overlap_is_one_for_identical_and_zero_for_disjoint_text():
    same = text_overlap(["the queen lays eggs in spring"], ["the queen lays eggs in spring"])
    assert same == pytest.approx({"bleu": 1.0, "rouge1": 1.0, "rougeL": 1.0})
    disjoint = text_overlap(["alpha beta gamma delta"], ["one two three four"])
    assert disjoint == pytest.approx({"bleu": 0.0, "rouge1": 0.0, "rougeL": 0.0})
    # ROUGE stems: "lays" and "laying" count as one word.
    assert text_overlap(["queens laying"], ["queen lays"])["rouge1"] == pytest.approx(1.0)


def test_binary_f1():
    # 2 true positives, 1 false positive, 1 false negative: precision = recall = 2/3.
    assert binary_f1([True, True, True, False, False], [True, True, False, True, False]) == pytest.approx(2 / 3)
    assert binary_f1([False, False], [False, False]) is None


def test_redact_hides_credentials_and_keeps_everything_else():
    config = {"sft": {"trainer": {"hub_token": "hf_secret", "max_new_tokens": 16, "learning_rate": 1e-3}},
              "evaluation": {"judge": {"api_key_env": "OPENAI_API_KEY", "api_key": "sk-123"}},
              "list": [{"password": "x"}], "unset_token": None}
    assert redact(config) == {
        "sft": {"trainer": {"hub_token": "<redacted>", "max_new_tokens": 16, "learning_rate": 1e-3}},
        "evaluation": {"judge": {"api_key_env": "OPENAI_API_KEY", "api_key": "<redacted>"}},
        "list": [{"password": "<redacted>"}], "unset_token": None}


def test_headline_flags_overfitting_and_shows_the_new_measures():
    text = headline({"eval/loss_before": 2.0, "eval/loss": 2.4, "eval/overfitting": True,
                     "eval/general_perplexity_before": 30.0, "eval/general_perplexity": 41.5,
                     "eval/bleu": 0.12, "eval/rougeL": 0.3})
    assert "overfitting" in text and "30.0 → 41.5" in text and "ROUGE-L 0.300" in text
    assert "overfitting" not in headline({"eval/loss_before": 2.0, "eval/loss": 1.8, "eval/overfitting": False})


def test_wilson_interval_against_the_formula():
    from stages.metrics import wilson_interval

    # 70 of 100: centre (0.7 + 1.96²/200) / (1 + 1.96²/100), half-width 1.96 sqrt(0.21/100 + 1.96²/40000) / (same).
    z = 1.96
    centre = (0.7 + z * z / 200) / (1 + z * z / 100)
    half = z * math.sqrt(0.7 * 0.3 / 100 + z * z / 40000) / (1 + z * z / 100)
    low, high = wilson_interval(70, 100)
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert low == pytest.approx(0.6041, abs=1e-4) and high == pytest.approx(0.7810, abs=1e-4)
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and 0.69 < low < 0.73  # never outside [0, 1]
    assert wilson_interval(5.5, 10)[0] < 0.55 < wilson_interval(5.5, 10)[1]  # ties count half


def test_degenerate_answers_repeat_a_phrase():
    from stages.metrics import is_degenerate

    assert is_degenerate("Feed 2:1 syrup. Tip: Tip: Tip: Tip: Tip: Tip:")
    assert is_degenerate("the bees are calm and the bees are calm and the bees are calm")
    assert not is_degenerate("Feed 2:1 syrup in autumn, about 10 kg per colony. Tip: feed in the evening.")
    assert not is_degenerate("Tip: Tip:")


def test_win_rate_counts_ties_half_and_leaves_unjudged_out():
    from stages.evaluate import win_rate

    result = win_rate(["a", "a", "b", "tie", None], "eval/x/")
    assert result["eval/x/win_rate"] == pytest.approx(2.5 / 4)
    assert (result["eval/x/wins"], result["eval/x/ties"], result["eval/x/losses"], result["eval/x/unjudged"]) == \
        (2, 1, 1, 1)
    assert result["eval/x/win_rate_low"] < 2.5 / 4 < result["eval/x/win_rate_high"]
    assert win_rate([None], "eval/")["eval/win_rate"] is None


def test_the_report_headline_says_whether_it_aligned_and_warns_of_reward_hacking():
    from pipeline.report import Table, alignment_section, Stage

    config = {"evaluation": {"judge": {"type": "reward_model", "model": "rm"}, "judges": [{"type": "contrastive"}]}}
    dpo = Stage("dpo", {"metrics": {
        "eval/wins": 80, "eval/win_rate": 0.8, "eval/win_rate_low": 0.71, "eval/win_rate_high": 0.87,
        "eval/contrastive/win_rate": 0.75, "eval/contrastive/win_rate_low": 0.66,
        "eval/contrastive/win_rate_high": 0.82, "eval/measure_before": 0.2, "eval/measure_after": 0.6,
        "eval/kl_to_start": 1.5, "eval/degenerate_before": 0.0, "eval/degenerate_after": 0.0}}, [])
    ppo = Stage("ppo", {"metrics": {  # sorted keys, as stage.json holds them: the extra judge comes first
        "eval/contrastive/win_rate": 0.5, "eval/contrastive/win_rate_high": 0.6,
        "eval/contrastive/win_rate_low": 0.4, "eval/win_rate": 0.62, "eval/win_rate_high": 0.71,
        "eval/win_rate_low": 0.52, "eval/wins": 60, "ppo/reward_mean_first": 1.0, "ppo/reward_mean": 3.0,
        "eval/degenerate_before": 0.0, "eval/degenerate_after": 0.1}}, [])
    section = alignment_section([dpo, ppo], config)
    [table] = [block for block in section.blocks if isinstance(block, Table)]
    verdicts = {(row[0], row[1]): row[4] for row in table.rows}
    assert verdicts == {("dpo", "reward_model"): "better", ("dpo", "contrastive"): "better",
                        ("ppo", "reward_model"): "better", ("ppo", "contrastive"): "no clear difference"}
    warnings = [block for block in section.blocks if isinstance(block, str) and block.startswith("Warning")]
    assert len(warnings) == 2 and all(w.startswith("Warning: ppo") for w in warnings)
    assert "reward hacking" in warnings[0] and "repeat a three-word phrase" in warnings[1]
    assert alignment_section([Stage("sft", {"metrics": {}}, [])], config) is None
