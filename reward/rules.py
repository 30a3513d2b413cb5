"""Rule scorers for the `rule` judge (`preferences.judge.type: rule`, `function: reward.rules:<name>`).

They exist so the demo preference can be checked without a person or a paid model: the labeller of
data/preferences/beekeeping_pairs.jsonl preferred the specific answer (concrete figures written with digits) over the
vague one (hedges, no figures), whichever of them closes with the sft data's "Tip:" sentence. `specificity` scores
that property and `is_specific` turns it into a yes/no, so "fraction of specific answers" can be measured on held-out
prompts before and after DPO/PPO, and a reward model's ranking can be compared with an independent check. `has_tip`
stays as the marker the pairs were built to make useless: a policy or reward model that learnt it learnt the cue.

These are heuristics, not the labeller: the labels came from reading each pair, and the vague answers in the data use
far more hedging wordings than the short list below. A response can fool the rules (a stray digit), so use them as a
cheap signal next to human or model judgements, not instead of them.

Every scorer has the rule judge's signature, score(prompt: list[dict], response: str) -> float, and uses only the
standard library.
"""

from __future__ import annotations

import re

# A short, general list of hedges that stand in for advice; matched case-insensitively on whole words. Each phrase
# found costs 1 point once, however often it appears.
HEDGE_PHRASES = (
    "it depends",
    "it varies",
    "every situation is different",
    "there is no single answer",
    "generally speaking",
    "consult an experienced",
    "hard to say",
    "no hard and fast rule",
)

_DIGIT = re.compile(r"\d")
# "Tip:" at the start of the response, of a line, or of a sentence (after . ! or ?, maybe a closing quote or bracket).
_TIP = re.compile(r"(?:^|\n|[.!?][\"')\]]*\s)\s*Tip:\s*\S")
_HEDGES = tuple(re.compile(r"\b" + r"\s+".join(map(re.escape, phrase.split())) + r"\b", re.IGNORECASE)
                for phrase in HEDGE_PHRASES)


def has_figure(response: str) -> bool:
    """A concrete figure: any digit (the demo data writes quantities, temperatures and durations with digits)."""
    return bool(_DIGIT.search(response))


def has_tip(response: str) -> bool:
    """A sentence that starts with "Tip:" and says something after it."""
    return bool(_TIP.search(response))


def hedges(response: str) -> list[str]:
    """The phrases of HEDGE_PHRASES found in the response."""
    return [phrase for phrase, pattern in zip(HEDGE_PHRASES, _HEDGES) if pattern.search(response)]


def specificity(prompt: list[dict], response: str) -> float:
    """+1 for a figure written with digits, -1 for each hedge phrase found."""
    return float(has_figure(response)) - len(hedges(response))


def is_specific(prompt: list[dict], response: str) -> float:
    """1.0 when the response has a digit and none of the hedge phrases, else 0.0."""
    return 1.0 if has_figure(response) and not hedges(response) else 0.0


def shorter(prompt: list[dict], response: str) -> float:
    """Minus the number of words: prefers the shorter response (a simple, predictable judge for tests)."""
    return -float(len(response.split()))
