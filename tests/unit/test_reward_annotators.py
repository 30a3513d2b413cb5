"""Several annotators: the votes each gives, how they become one label per pair, their agreement, and the desk that
hands out pairs to people labelling at once (reward.annotators, reward.desk). No web server here."""

from __future__ import annotations

import re

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from reward.agreement import cohens_kappa, fleiss_kappa
from reward.annotators import (annotator_agreement, annotators_dir, consensus, read_votes, resolve, settled_for,
                               shared_pairs)
from reward.build import human_labels_path
from reward.desk import AlreadyLabelled, Desk, Progress, Refused
from reward.pairs import Label, LabelStore, Pair

from conftest import REPO


def make_pairs(n: int) -> list[Pair]:
    return [Pair.create([{"role": "user", "content": f"question {i}"}], f"answer A{i}", f"answer B{i}", f"p:{i}")
            for i in range(n)]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("winners, shared, rule, outcome", [
    ([], False, "majority", None),
    (["a"], False, "majority", "a"),
    (["a"], True, "majority", None),  # a shared pair needs a second vote
    (["b", "b"], True, "drop", "b"),
    (["a", "b"], True, "drop", "drop"),
    (["a", "b"], True, "majority", None),  # a split asks a third annotator
    (["a", "b", "a"], True, "majority", "a"),
    (["a", "b", "tie"], True, "majority", "tie"),  # no majority among three: a tie
    (["a", "tie"], False, "majority", None),  # extra votes on a single pair are settled the same way
])
def test_resolve(winners, shared, rule, outcome):
    assert resolve(winners, shared, rule) == outcome


def test_shared_pairs_are_the_share_asked_for_and_stable():
    pairs = make_pairs(10)
    assert shared_pairs(pairs, 0.0) == set() and shared_pairs(pairs, 1.0) == {p.id for p in pairs}
    some = shared_pairs(pairs, 0.25)
    assert len(some) == 3  # rounded up
    assert shared_pairs(list(reversed(pairs)), 0.25) == some  # by the pairs' hashes, not their order
    assert some <= shared_pairs(pairs, 0.5)


def test_fleiss_kappa_matches_cohen_style_chance_correction():
    assert fleiss_kappa([["a", "a"], ["b", "b"], ["tie", "tie"]]) == pytest.approx(1.0)
    # Two raters on four items, three agreeing: observed 0.75; pooled shares a 3/8, b 5/8, so chance 34/64.
    assert fleiss_kappa([["a", "a"], ["b", "b"], ["a", "b"], ["b", "b"]]) == pytest.approx(
        (0.75 - 34 / 64) / (1 - 34 / 64))
    assert fleiss_kappa([["a", "a"], ["a", "a", "a"]]) is None  # one class throughout: chance agreement is 1
    # Items with three raters count each of their rater pairs: a, a, b agrees on 1 of 3; pooled a 2/5, b 3/5.
    assert fleiss_kappa([["a", "a", "b"], ["b", "b"]]) == pytest.approx(((1 / 3 + 1) / 2 - 13 / 25) / (1 - 13 / 25))


def test_votes_from_the_terminal_and_each_annotator_become_one_label_per_pair(tmp_path):
    pairs = make_pairs(4)
    with LabelStore(human_labels_path(tmp_path)) as store:  # the terminal, under --judge-name carol
        store.add(Label(pairs[0].id, "a", "carol"))
    for name, winners in {"alice": "abb", "bob": "aab"}.items():
        with LabelStore(annotators_dir(tmp_path) / f"{name}.jsonl") as store:
            for pair, winner in zip(pairs[1:], winners):
                store.add(Label(pair.id, winner, name, verdicts={"comment": "hm"}))
    votes = read_votes(tmp_path)
    assert set(votes[pairs[0].id]) == {"carol"} and set(votes[pairs[1].id]) == {"alice", "bob"}

    result = consensus(pairs, votes, overlap=0.0, rule="majority")
    by_pair = {label.pair_id: label for label in result.labels}
    assert by_pair[pairs[0].id].judge == "carol" and by_pair[pairs[0].id].confidence is None  # one vote: as given
    assert by_pair[pairs[1].id].winner == "a" and by_pair[pairs[1].id].judge == "alice+bob"
    assert by_pair[pairs[1].id].confidence == 1.0
    assert by_pair[pairs[1].id].verdicts == {"votes": {"alice": "a", "bob": "a"}}
    assert [pair.id for pair in result.pending] == [pairs[2].id]  # a split: one more annotator
    assert consensus(pairs, votes, 0.0, "drop").dropped == 1

    agreement = annotator_agreement(votes)
    assert agreement["pairs"] == 3 and agreement["raw"] == pytest.approx(2 / 3)
    assert agreement["kappa"] == pytest.approx(fleiss_kappa([["a", "a"], ["b", "a"], ["b", "b"]]))
    assert agreement["pairwise"] == [{"annotators": ["alice", "bob"], "pairs": 3, "raw": pytest.approx(2 / 3),
                                      "kappa": cohens_kappa(["a", "b", "b"], ["a", "a", "b"])}]
    assert annotator_agreement({pairs[0].id: votes[pairs[0].id]}) is None

    # The terminal asks no one about decided pairs, nor about ones they voted on: carol only about the split.
    assert settled_for("carol", pairs, votes, 0.0, "majority") == {pairs[0].id, pairs[1].id, pairs[3].id}
    assert settled_for("alice", pairs, votes, 0.0, "majority") == {pair.id for pair in pairs}


def test_remove_last_cuts_the_newest_label_off_the_file(tmp_path):
    path = tmp_path / "alice.jsonl"
    with LabelStore(path) as store:
        for pair_id, winner in (("p1", "a"), ("p2", "b")):
            store.add(Label(pair_id, winner, "alice"))
        assert store.remove_last().pair_id == "p2"
        store.add(Label("p3", "tie", "alice"))
    store = LabelStore(path)  # as a new process reads it
    assert [(label.pair_id, label.winner) for label in store.labels()] == [("p1", "a"), ("p3", "tie")]
    assert store.remove_last().pair_id == "p3" and store.remove_last().pair_id == "p1"
    assert store.remove_last() is None
    store.close()
    assert path.read_text() == ""


def test_desk_keeps_two_people_apart_and_asks_no_one_twice(tmp_path):
    pairs, clock = make_pairs(3), Clock()
    desk = Desk(tmp_path, pairs, overlap=0.0, rule="majority", hold_seconds=60, clock=clock)
    first, second = desk.next_pair("alice"), desk.next_pair("bob")
    assert (first.id, second.id) == (pairs[0].id, pairs[1].id)  # the pair on alice's screen is hers
    desk.answer("alice", first.id, "a", "clear winner")
    with pytest.raises(AlreadyLabelled):
        desk.answer("alice", first.id, "b")
    assert desk.next_pair("alice").id == pairs[2].id  # bob holds pair 1
    clock.now = 61  # bob walked away: his hold lapses
    assert desk.next_pair("carol").id == pairs[1].id
    desk.close()
    assert LabelStore(annotators_dir(tmp_path) / "alice.jsonl").get(first.id).verdicts == {"comment": "clear winner"}
    assert Desk(tmp_path, pairs, 0.0, "majority").progress("bob").decided == 1  # a restarted server knows


def test_shared_pairs_go_to_two_people_then_majority_asks_a_third(tmp_path):
    pairs = make_pairs(1)
    desk = Desk(tmp_path, pairs, overlap=1.0, rule="majority")
    assert desk.next_pair("alice").id == desk.next_pair("bob").id == pairs[0].id  # two open slots
    desk.answer("alice", pairs[0].id, "a")
    assert desk.next_pair("alice") is None
    desk.answer("bob", pairs[0].id, "b")
    assert desk.outcomes() == {"decided": 0, "dropped": 0, "waiting": 1}
    assert desk.next_pair("bob") is None and desk.next_pair("carol").id == pairs[0].id
    desk.answer("carol", pairs[0].id, "a")
    assert desk.outcomes() == {"decided": 1, "dropped": 0, "waiting": 0}
    assert desk.next_pair("dave") is None


def test_skip_comes_back_last_and_undo_takes_back_the_last_answer(tmp_path):
    pairs = make_pairs(3)
    desk = Desk(tmp_path, pairs, 0.0, "majority")
    desk.answer("alice", desk.next_pair("alice").id, "skip")
    assert desk.next_pair("alice").id == pairs[1].id
    desk.answer("alice", pairs[1].id, "b")
    assert desk.undo("alice") == pairs[1].id
    assert desk.next_pair("alice").id == pairs[1].id  # shown again at once
    assert not LabelStore(annotators_dir(tmp_path) / "alice.jsonl").is_labelled(pairs[1].id)
    desk.answer("alice", pairs[1].id, "a")
    desk.answer("alice", desk.next_pair("alice").id, "tie")
    assert desk.next_pair("alice").id == pairs[0].id  # the skipped one, after the others
    assert desk.progress("alice") == Progress(total=3, decided=2, mine=2, left_for_me=1, held_by_others=0)

    desk.close()

    restarted = Desk(tmp_path, pairs, 0.0, "majority")  # no history in memory: undo takes the newest stored label
    assert restarted.undo("alice") == pairs[2].id and restarted.undo("alice") == pairs[1].id
    assert restarted.undo("alice") is None
    restarted.close()


def test_undo_walks_back_through_skips_and_labels(tmp_path):
    pairs = make_pairs(2)
    desk = Desk(tmp_path, pairs, 0.0, "majority")
    for pair, choice in ((pairs[0], "skip"), (pairs[1], "a"), (pairs[0], "skip")):  # the same pair skipped twice
        desk.answer("alice", pair.id, choice)
    assert [desk.undo("alice") for _ in range(4)] == [pairs[0].id, pairs[1].id, pairs[0].id, None]
    assert desk.next_pair("alice").id == pairs[0].id and desk.progress("alice").mine == 0
    desk.close()


@pytest.mark.parametrize("name, pair_id, choice, comment, message", [
    ("../etc", None, "a", "", "annotator name"),
    ("alice", "nope", "a", "", "no pair 'nope'"),
    ("alice", None, "c", "", "choice must be one of a, b, tie, skip"),
    ("alice", None, "a", "x" * 2001, "at most 2000 characters"),
])
def test_desk_refuses_bad_answers(tmp_path, name, pair_id, choice, comment, message):
    pairs = make_pairs(1)
    desk = Desk(tmp_path, pairs, 0.0, "majority")
    with pytest.raises(Refused, match=message):
        desk.answer(name, pair_id or pairs[0].id, choice, comment)
    assert not annotators_dir(tmp_path).exists()


@pytest.mark.parametrize("override, message", [
    ("preferences.judge.overlap=1.5", "preferences.judge.overlap must be a share between 0 and 1, got 1.5"),
    ("preferences.judge.disagreement=majorty", "preferences.judge.disagreement must be majority or drop, got "
                                               "'majorty' (did you mean 'majority'?)"),
    ("preferences.judge.overlapp=0.5", "unknown key 'preferences.judge.overlapp' (did you mean 'overlap'?)"),
    ("preferences.judge.overlap=lots", "'preferences.judge.overlap' must be float"),
])
def test_config_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(REPO / "configs" / "smoke.yaml", ["preferences.judge.type=human", override])
