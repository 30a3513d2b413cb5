"""Several people label one run: each person's votes, the share of pairs two of them label, and the one label per
pair that the preferences stage trains on.

Each annotator has a `LabelStore` of their own at `<run>/labels/human/<name>.jsonl` (the page of `label --web`
writes these), beside the terminal's `<run>/labels/human.jsonl` (`label`), whose labels count as votes of the name
each was given under (--judge-name). Keeping one store per person gives every person the store's guarantees: each
vote is synced before the next pair is shown, and no one is asked about a pair they voted on.

A pair needs one vote, or two when it is among the `overlap` share (chosen by hashing pair ids: the same pairs for
every annotator and every run). Votes that agree decide the pair. Votes that disagree are settled by
`disagreement`: majority takes the winner most votes name, asking one more annotator while no winner has more than
half (a three-way split is a tie); drop leaves the pair out of the training data, counted.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from reward.agreement import cohens_kappa, fleiss_kappa
from reward.pairs import Label, LabelStore, Pair

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")  # a file name on every system, and readable in a URL
DROP = "drop"  # what `resolve` says of a disagreement the `drop` rule leaves out
MAX_VOTES = 3  # majority asks a third annotator to break a split, and no more

Votes = dict[str, Label]  # one pair's votes, by annotator name


def annotators_dir(run_dir: Path) -> Path:
    return run_dir / "labels" / "human"


def shared_pairs(pairs: list[Pair], overlap: float) -> set[str]:
    """The ids of the `overlap` share of `pairs` (rounded up) that need two votes. A pair is in or out by its hash
    alone, so more pairs added later leave earlier choices mostly in place and every process picks the same."""
    ranked = sorted((pair.id for pair in pairs), key=lambda pid: hashlib.sha256(f"overlap:{pid}".encode()).digest())
    return set(ranked[:math.ceil(overlap * len(ranked) - 1e-9)])


def resolve(winners: list[str], shared: bool, rule: str) -> str | None:
    """A pair's outcome from its votes' winners: a, b or tie; DROP (a disagreement the drop rule leaves out); or None
    while the pair needs more votes."""
    if len(winners) < (2 if shared else 1):
        return None
    counts = Counter(winners).most_common()
    if len(counts) == 1:
        return counts[0][0]
    if rule == DROP:
        return DROP
    if counts[0][1] * 2 > len(winners):
        return counts[0][0]
    return None if len(winners) < MAX_VOTES else "tie"


def read_votes(run_dir: Path) -> dict[str, Votes]:
    """Every person's votes in the run, by pair id: the terminal's store first, then each annotator's own."""
    from reward.build import human_labels_path

    votes: dict[str, Votes] = {}
    terminal = human_labels_path(run_dir)
    stores = ([terminal] if terminal.exists() else []) + sorted(annotators_dir(run_dir).glob("*.jsonl"))
    for path in stores:
        for label in LabelStore(path).labels():  # reading only: the file is not opened for writing
            name = label.judge if path == terminal else path.stem
            votes.setdefault(label.pair_id, {})[name] = label
    return votes


@dataclass
class Consensus:
    labels: list[Label] = field(default_factory=list)
    """One label per decided pair, in the order of the pairs."""
    pending: list[Pair] = field(default_factory=list)
    """Pairs that still need a vote (a first one, a second for a shared pair, a third to break a split)."""
    dropped: int = 0
    """Pairs the drop rule left out because their annotators disagreed."""


def consensus(pairs: list[Pair], votes: dict[str, Votes], overlap: float, rule: str) -> Consensus:
    """One label per pair that its votes decide. A single vote is that person's label as given; several become a
    label whose judge names them all, whose confidence is the share of votes for the winner, and whose verdicts
    keep each vote."""
    shared = shared_pairs(pairs, overlap)
    result = Consensus()
    for pair in pairs:
        mine = votes.get(pair.id, {})
        outcome = resolve([label.winner for label in mine.values()], pair.id in shared, rule)
        if outcome is None:
            result.pending.append(pair)
        elif outcome == DROP:
            result.dropped += 1
        elif len(mine) == 1:
            result.labels.append(next(iter(mine.values())))
        else:
            agreeing = sum(label.winner == outcome for label in mine.values())
            result.labels.append(Label(pair.id, outcome, "+".join(sorted(mine)), agreeing / len(mine),
                                       {"votes": {name: label.winner for name, label in sorted(mine.items())}}))
    return result


def annotator_agreement(votes: dict[str, Votes]) -> dict | None:
    """How far annotators agree on the pairs more than one of them voted on: the share where all agree, Fleiss' κ
    over all of them (any number of votes per pair), and Cohen's κ for each two annotators who share pairs. None
    while no pair has two votes."""
    multi = {pid: {name: label.winner for name, label in by_name.items()}
             for pid, by_name in votes.items() if len(by_name) >= 2}
    if not multi:
        return None
    names = sorted({name for by_name in multi.values() for name in by_name})
    pairwise = []
    for first, second in itertools.combinations(names, 2):
        both = [(v[first], v[second]) for v in multi.values() if first in v and second in v]
        if both:
            a, b = [x for x, _ in both], [y for _, y in both]
            pairwise.append({"annotators": [first, second], "pairs": len(both),
                             "raw": sum(x == y for x, y in both) / len(both), "kappa": cohens_kappa(a, b)})
    return {"pairs": len(multi), "annotators": names,
            "raw": sum(len(set(v.values())) == 1 for v in multi.values()) / len(multi),
            "kappa": fleiss_kappa([list(v.values()) for v in multi.values()]), "pairwise": pairwise}


def settled_for(name: str, pairs: list[Pair], votes: dict[str, Votes], overlap: float, rule: str) -> set[str]:
    """Ids of the pairs not to ask `name` about: those their votes decide, and those `name` voted on."""
    waiting = {pair.id for pair in consensus(pairs, votes, overlap, rule).pending}
    return {pair.id for pair in pairs if pair.id not in waiting or name in votes.get(pair.id, {})}
