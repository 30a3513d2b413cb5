import pytest

from pipeline.errors import PipelineError
from reward.agreement import agreement, cohens_kappa, order_flip_rate
from reward.judges import combine_both_orders
from reward.pairs import Label

HUMAN = ["a", "a", "a", "a", "b", "b", "b", "tie", "tie", "a"]
MODEL = ["a", "a", "a", "b", "b", "b", "tie", "tie", "a", "a"]


def human_labels() -> list[Label]:
    return [Label(f"p{i}", w, "human") for i, w in enumerate(HUMAN)] + [Label("only-human", "a", "human")]


def model_labels() -> list[Label]:
    # Its two ties come from answers that flipped with the order; the other eight agree in both orders.
    answers = {"a": ("A", "B"), "b": ("B", "A"), "tie": ("A", "A")}
    labels = []
    for i, winner in enumerate(MODEL):
        combined, verdicts = combine_both_orders(*answers[winner])
        assert combined == winner
        labels.append(Label(f"p{i}", winner, "api:m", verdicts=verdicts))
    return labels


def test_agreement_against_hand_computed_values():
    result = agreement(human_labels(), model_labels())
    # 7 of 10 agree. Both give a 5×, b 3×, tie 2×: chance = (25 + 9 + 4) / 100 = 0.38.
    # kappa = (0.7 - 0.38) / (1 - 0.38) = 0.32 / 0.62 = 16/31.
    assert result.pairs == 10  # "only-human" is not shared
    assert result.raw == pytest.approx(0.7)
    assert result.kappa == pytest.approx(16 / 31)
    assert result.tie_rates == pytest.approx((0.2, 0.2))
    assert result.order_flip_rates[0] is None and result.order_flip_rates[1] == pytest.approx(0.2)
    assert result.to_dict()["kappa"] == pytest.approx(16 / 31)


def test_kappa_edge_cases():
    assert cohens_kappa(["a", "b", "tie"], ["a", "b", "tie"]) == pytest.approx(1.0)
    assert cohens_kappa(["a", "a"], ["a", "a"]) is None  # chance agreement is already 1
    assert cohens_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)


def test_order_flip_rate_ignores_labels_without_both_orders():
    labels = [Label("x", "a", "j", verdicts={"ab": "a", "ba": "a"}),
              Label("y", "tie", "j", verdicts={"ab": "a", "ba": "b"}),
              Label("z", "a", "rule", verdicts={"scores": {"a": 1.0, "b": 0.0}})]
    assert order_flip_rate(labels) == pytest.approx(0.5)
    assert order_flip_rate(labels[2:]) is None


def test_no_shared_pairs_or_duplicates_are_errors():
    with pytest.raises(PipelineError, match="no labelled pair in common"):
        agreement([Label("x", "a", "h")], [Label("y", "a", "m")])
    with pytest.raises(PipelineError, match="twice"):
        agreement([Label("x", "a", "h"), Label("x", "b", "h")], [Label("x", "a", "m")])


def test_reliability_against_hand_computed_bins():
    from reward.agreement import reliability

    confidences = [0.55, 0.58, 0.65, 0.95, 1.0, 0.92]
    correct = [True, False, True, True, True, False]
    table, ece = reliability(confidences, correct)
    bins = {row["confidence"]: row for row in table}
    assert bins["0.5-0.6"] == {"confidence": "0.5-0.6", "pairs": 2, "mean_confidence": 0.565, "accuracy": 0.5}
    assert bins["0.6-0.7"]["pairs"] == 1 and bins["0.6-0.7"]["accuracy"] == 1.0
    assert bins["0.7-0.8"]["pairs"] == 0 and bins["0.7-0.8"]["accuracy"] is None
    assert bins["0.9-1.0"] == {"confidence": "0.9-1.0", "pairs": 3, "mean_confidence": 0.9567,
                               "accuracy": 0.6667}  # 1.0 belongs to the last bin
    expected = (2 * abs(0.565 - 0.5) + 1 * abs(0.65 - 1.0) + 3 * abs((0.95 + 1.0 + 0.92) / 3 - 2 / 3)) / 6
    assert ece == pytest.approx(expected)


def test_judge_reliability_counts_only_pairs_both_decided():
    from reward.agreement import judge_reliability

    reference = [Label("p1", "a", "human"), Label("p2", "b", "human"), Label("p3", "tie", "human"),
                 Label("p4", "a", "human")]
    judged = [Label("p1", "a", "j", 0.9), Label("p2", "a", "j", 0.7), Label("p3", "a", "j", 0.99),
              Label("p4", "tie", "j", 0.5), Label("p5", "a", "j", 0.8)]
    table, ece = judge_reliability(judged, reference)
    assert sum(row["pairs"] for row in table) == 2  # p1 right at 0.9, p2 wrong at 0.7
    assert ece == pytest.approx((abs(0.9 - 1) + abs(0.7 - 0)) / 2)
    assert judge_reliability([Label("p1", "a", "j")], reference) is None  # no confidence given
