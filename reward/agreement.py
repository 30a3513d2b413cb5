"""How far two label sources agree, e.g. an AI judge against a person on the same pairs, before trusting the AI.

Only pairs both sources labelled count. Cohen's kappa corrects raw agreement for what two judges with the same
label frequencies would reach by chance, over the three classes a, b and tie. The order-flip rate is how often a
judge that saw both orders answered differently in each: a judge that flips often is reading positions. Between
several people (reward.annotators), Fleiss' kappa does the same over any number of raters per pair. Reliability
is whether a judge's confidence comes true: of the pairs it was 80% sure of, did it pick the reference's winner 80%
of the time?
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from pipeline.errors import PipelineError
from reward.pairs import WINNERS, Label


@dataclass(frozen=True)
class Agreement:
    pairs: int
    """Pairs labelled by both sources."""
    raw: float
    """Fraction of those pairs with the same winner."""
    kappa: float | None
    """Cohen's kappa over a/b/tie; None when chance agreement is 1 (both gave one and the same class throughout)."""
    tie_rates: tuple[float, float]
    """Fraction of ties from each source."""
    order_flip_rates: tuple[float | None, float | None]
    """Per source, the fraction of its both-order labels whose two orders disagree; None without such labels."""

    def to_dict(self) -> dict:
        return asdict(self)


def _by_pair(labels: Iterable[Label], which: str) -> dict[str, Label]:
    by_id: dict[str, Label] = {}
    for label in labels:
        if label.pair_id in by_id:
            raise PipelineError(f"the {which} labels hold pair {label.pair_id} twice")
        by_id[label.pair_id] = label
    return by_id


def order_flip_rate(labels: Iterable[Label]) -> float | None:
    both = [label.verdicts for label in labels if "ab" in label.verdicts and "ba" in label.verdicts]
    return sum(v["ab"] != v["ba"] for v in both) / len(both) if both else None


def cohens_kappa(first: list[str], second: list[str]) -> float | None:
    n = len(first)
    observed = sum(x == y for x, y in zip(first, second)) / n
    chance = sum((first.count(c) / n) * (second.count(c) / n) for c in WINNERS)
    return None if chance == 1 else (observed - chance) / (1 - chance)


def agreement(first: Iterable[Label], second: Iterable[Label]) -> Agreement:
    one, two = _by_pair(first, "first"), _by_pair(second, "second")
    shared = [pair for pair in one if pair in two]
    if not shared:
        raise PipelineError("the two label sources have no labelled pair in common")
    a, b = [one[p].winner for p in shared], [two[p].winner for p in shared]
    n = len(shared)
    return Agreement(
        pairs=n,
        raw=sum(x == y for x, y in zip(a, b)) / n,
        kappa=cohens_kappa(a, b),
        tie_rates=(a.count("tie") / n, b.count("tie") / n),
        order_flip_rates=(order_flip_rate(one[p] for p in shared), order_flip_rate(two[p] for p in shared)),
    )


def fleiss_kappa(items: list[list[str]]) -> float | None:
    """Fleiss' kappa of several raters over a/b/tie, each item rated by two or more of them (not necessarily the
    same ones, nor the same number: each item's observed agreement is the share of its rater pairs that agree).
    None when chance agreement is 1 (every rating one and the same class)."""
    observed = sum(sum(n * (n - 1) for n in (ratings.count(c) for c in WINNERS)) / (len(ratings) * (len(ratings) - 1))
                   for ratings in items) / len(items)
    everything = [rating for ratings in items for rating in ratings]
    chance = sum((everything.count(c) / len(everything)) ** 2 for c in WINNERS)
    return None if chance == 1 else (observed - chance) / (1 - chance)


CALIBRATION_BINS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def reliability(confidences: list[float], correct: list[bool]) -> tuple[list[dict], float]:
    """A reliability table over confidences in [0.5, 1] (a judge's confidence in its own pick), binned by
    CALIBRATION_BINS, against how often the pick was right; and the expected calibration error (ECE), the
    pair-weighted mean gap between confidence and accuracy."""
    table, ece = [], 0.0
    for low, high in zip(CALIBRATION_BINS, CALIBRATION_BINS[1:]):
        members = [(c, ok) for c, ok in zip(confidences, correct) if low <= c < high or (high == 1.0 and c == 1.0)]
        if not members:
            table.append({"confidence": f"{low:.1f}-{high:.1f}", "pairs": 0, "mean_confidence": None,
                          "accuracy": None})
            continue
        confidence = sum(c for c, _ in members) / len(members)
        accuracy = sum(ok for _, ok in members) / len(members)
        ece += len(members) / len(confidences) * abs(confidence - accuracy)
        table.append({"confidence": f"{low:.1f}-{high:.1f}", "pairs": len(members),
                      "mean_confidence": round(confidence, 4), "accuracy": round(accuracy, 4)})
    return table, ece


def judge_reliability(labels: Iterable[Label], reference: Iterable[Label]) -> tuple[list[dict], float] | None:
    """`reliability` of a judge's labels against reference labels, over the pairs both decided (neither a tie) and
    the judge gave a confidence for; None when there are none."""
    mine, theirs = _by_pair(labels, "judge"), _by_pair(reference, "reference")
    decided = [(mine[p], theirs[p]) for p in mine if p in theirs and mine[p].winner != "tie"
               and theirs[p].winner != "tie" and mine[p].confidence is not None]
    if not decided:
        return None
    return reliability([m.confidence for m, _ in decided], [m.winner == t.winner for m, t in decided])
