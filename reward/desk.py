"""The labelling desk behind `label --web`: which pair each person sees next, their answers, their undo.

Every answer is in the person's own `LabelStore` (reward.annotators) before the next pair is shown, so a closed tab
or a killed server loses nothing, and a person is never shown a pair they voted on. Two people labelling at once are
kept apart by holds: the pair on someone's screen counts as taken for `hold_seconds`, so it goes to a second person
only when it needs a second vote (a shared pair, or a split that majority breaks). Holds, skips and the undo history
live in memory: a restarted server forgets them, and undo then takes back the person's newest stored label.

Not thread-safe: the web app calls it from one event loop, one request at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from reward.annotators import (DROP, MAX_VOTES, NAME_PATTERN, Votes, annotators_dir, read_votes, resolve,
                               shared_pairs)
from reward.pairs import Label, LabelStore, Pair

CHOICES = ("a", "b", "tie", "skip")
MAX_COMMENT = 2000  # characters; a comment is a note on the label, not a document


class Refused(ValueError):
    """A request the desk turns down (an unknown pair, a second vote from the same person); the message says why,
    `status` is the HTTP status the web page gets."""

    status = 400


class AlreadyLabelled(Refused):
    status = 409


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise Refused(f"annotator name {name!r}: use 1-40 letters, digits, '.', '_' or '-', starting with a letter "
                      "or digit")


@dataclass(frozen=True)
class Progress:
    total: int  # pairs in the run
    decided: int  # pairs whose votes decide them (or that the drop rule left out)
    mine: int  # votes this person has given
    left_for_me: int  # pairs still waiting that this person could vote on, skipped ones included
    held_by_others: int  # of those, pairs on someone else's screen now


class Desk:
    def __init__(self, run_dir: Path, pairs: list[Pair], overlap: float, rule: str, hold_seconds: float = 600,
                 clock: Callable[[], float] = time.monotonic):
        self.run_dir, self.pairs, self.rule = run_dir, pairs, rule
        self.by_id = {pair.id: pair for pair in pairs}
        self.shared = shared_pairs(pairs, overlap)
        self.votes: dict[str, Votes] = read_votes(run_dir)
        self.hold_seconds, self.clock = hold_seconds, clock
        self._stores: dict[str, LabelStore] = {}
        self._holds: dict[str, tuple[str, float]] = {}  # person -> (pair id on their screen, until when)
        self._skipped: dict[str, list[str]] = {}  # person -> pair ids skipped, oldest first
        self._history: dict[str, list[tuple[str, str]]] = {}  # person -> [("label" | "skip", pair id)], newest last
        self._again: dict[str, str] = {}  # person -> the pair an undo brought back, shown next

    # ------------------------------------------------------------------------ what is asked

    def _outcome(self, pair_id: str) -> str | None:
        winners = [label.winner for label in self.votes.get(pair_id, {}).values()]
        return resolve(winners, pair_id in self.shared, self.rule)

    def _open_slots(self, pair_id: str) -> int:
        """How many more votes a waiting pair needs now: up to two for a shared pair, one to break a split."""
        have = len(self.votes.get(pair_id, {}))
        return max((2 if pair_id in self.shared else 1) - have, 1 if have < MAX_VOTES else 0)

    def _holders(self, pair_id: str, other_than: str) -> int:
        now = self.clock()
        return sum(1 for name, (held, until) in self._holds.items()
                   if held == pair_id and name != other_than and until > now)

    def _askable(self, name: str, pair_id: str) -> bool:
        return name not in self.votes.get(pair_id, {}) and self._outcome(pair_id) is None

    def next_pair(self, name: str) -> Pair | None:
        """The pair to show `name` now, held for them: one an undo brought back, else the first waiting pair in
        run order that nobody else holds every open slot of, else the pairs they skipped, oldest first."""
        check_name(name)
        skipped = self._skipped.get(name, [])
        again = self._again.get(name)
        if again and self._askable(name, again):
            chosen = again
        else:
            fresh = (pair.id for pair in self.pairs if pair.id not in skipped and self._askable(name, pair.id)
                     and self._holders(pair.id, name) < self._open_slots(pair.id))
            chosen = next(fresh, None) or next((pid for pid in skipped if self._askable(name, pid)), None)
        if chosen is None:
            self._holds.pop(name, None)
            return None
        self._holds[name] = (chosen, self.clock() + self.hold_seconds)
        return self.by_id[chosen]

    def progress(self, name: str) -> Progress:
        waiting = [pair.id for pair in self.pairs if self._askable(name, pair.id)]
        return Progress(
            total=len(self.pairs),
            decided=sum(self._outcome(pair.id) is not None for pair in self.pairs),
            mine=sum(name in self.votes.get(pair.id, {}) for pair in self.pairs),
            left_for_me=len(waiting),
            held_by_others=sum(self._holders(pid, name) >= self._open_slots(pid) for pid in waiting))

    # ------------------------------------------------------------------------ answers

    def _store(self, name: str) -> LabelStore:
        if name not in self._stores:
            self._stores[name] = LabelStore(annotators_dir(self.run_dir) / f"{name}.jsonl")
        return self._stores[name]

    def answer(self, name: str, pair_id: str, choice: str, comment: str = "") -> None:
        """Record `name`'s answer: a vote (a, b, tie), synced to disk before this returns, or a skip (the pair
        comes back after every other)."""
        check_name(name)
        if pair_id not in self.by_id:
            raise Refused(f"no pair {pair_id!r} in this run (was the preferences stage run again? reload the page)")
        if choice not in CHOICES:
            raise Refused(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if name in self.votes.get(pair_id, {}):
            raise AlreadyLabelled(f"{name} has already labelled this pair (in another tab?); reload the page")
        if len(comment) > MAX_COMMENT:
            raise Refused(f"a comment is at most {MAX_COMMENT} characters, got {len(comment)}")
        self._again.pop(name, None)
        self._holds.pop(name, None)
        if choice == "skip":
            skipped = self._skipped.setdefault(name, [])
            if pair_id in skipped:
                skipped.remove(pair_id)  # skipped again: to the back of the queue
            skipped.append(pair_id)
        else:
            label = Label(pair_id, choice, name, verdicts={"comment": comment} if comment.strip() else {})
            self._store(name).add(label)
            self.votes.setdefault(pair_id, {})[name] = label
        self._history.setdefault(name, []).append(("skip" if choice == "skip" else "label", pair_id))

    def undo(self, name: str) -> str | None:
        """Take back `name`'s last answer, which is shown to them next; the pair's id, or None if there is nothing
        to take back. After a server restart (no history in memory) that is their newest stored label."""
        check_name(name)
        history = self._history.get(name)
        kind, pair_id = history.pop() if history else ("label", None)
        if kind == "skip":
            if pair_id in self._skipped[name]:  # a pair skipped twice is in the list once
                self._skipped[name].remove(pair_id)
        else:
            store = self._store(name)
            removed = store.remove_last()
            if removed is None:
                return None
            pair_id = removed.pair_id
            del self.votes[pair_id][name]
        self._again[name] = pair_id
        return pair_id

    def outcomes(self) -> dict[str, int]:
        """How many pairs are decided, dropped or waiting: what `label --web` says when it stops."""
        states = [self._outcome(pair.id) for pair in self.pairs]
        return {"decided": sum(s not in (None, DROP) for s in states), "dropped": states.count(DROP),
                "waiting": states.count(None)}

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
