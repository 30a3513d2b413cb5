"""Labelling in the terminal, driven by a scripted `read` in place of the person."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from reward.interactive import QUESTION, label_interactively
from reward.pairs import LabelStore, Pair


def make_pairs(n: int) -> list[Pair]:
    return [Pair.create([{"role": "user", "content": f"question {i}"}], f"answer A{i}", f"answer B{i}", f"p:{i}")
            for i in range(n)]


class Script:
    """Answers the questions in order; records which pair was on screen each time it was asked."""

    def __init__(self, answers, console_file: io.StringIO, on_read=None):
        self.answers, self.file, self.on_read = list(answers), console_file, on_read
        self.shown: list[str] = []  # the header of the pair on screen at each question

    def __call__(self, question: str) -> str:
        assert question == QUESTION
        headers = [line for line in self.file.getvalue().splitlines() if "pair " in line and " of " in line]
        self.shown.append(headers[-1])
        if self.on_read:
            self.on_read(len(self.shown))
        if not self.answers:
            raise EOFError
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def session(pairs, path, answers, judge_name="human", on_read=None):
    file = io.StringIO()
    script = Script(answers, file, on_read)
    with LabelStore(path) as store:
        result = label_interactively(pairs, store, judge_name, read=script,
                                     console=Console(file=file, width=100, color_system=None))
    return result, script, file.getvalue()


def shown_numbers(script: Script) -> list[int]:
    return [int(header.split("pair ")[1].split(" of")[0]) for header in script.shown]


def test_answers_are_stored_with_winner_and_judge(tmp_path):
    pairs, path = make_pairs(3), tmp_path / "labels.jsonl"
    result, _, output = session(pairs, path, ["a", " B ", "TiE"], judge_name="alice")
    assert (result.labelled, result.skipped, result.remaining, result.quit) == (3, 0, 0, False)
    labels = {label.pair_id: label for label in LabelStore(path).labels()}
    assert [labels[p.id].winner for p in pairs] == ["a", "b", "tie"]
    assert {label.judge for label in labels.values()} == {"alice"}
    assert "pair 1 of 3 · 0 labelled · 3 to go" in output
    assert "pair 3 of 3 · 2 labelled · 1 to go" in output
    assert "0 of 3 pairs still unlabelled" in output


def test_short_answers_and_whitespace(tmp_path):
    pairs, path = make_pairs(4), tmp_path / "labels.jsonl"
    result, _, _ = session(pairs, path, ["t", "s", "  a\t", "q"])
    assert (result.labelled, result.skipped, result.quit) == (2, 1, True)
    assert [label.winner for label in LabelStore(path).labels()] == ["tie", "a"]


def test_skipped_pair_stays_unlabelled_and_comes_back(tmp_path):
    pairs, path = make_pairs(3), tmp_path / "labels.jsonl"
    first, script, _ = session(pairs, path, ["skip", "a", "b"])
    assert (first.labelled, first.skipped, first.remaining, first.quit) == (2, 1, 1, False)
    assert not LabelStore(path).is_labelled(pairs[0].id)
    second, script, output = session(pairs, path, ["tie"])
    assert shown_numbers(script) == [1]
    assert "pair 1 of 3 · 2 labelled · 1 to go" in output
    assert (second.labelled, second.remaining) == (1, 0)
    assert LabelStore(path).get(pairs[0].id).winner == "tie"


def test_quit_stops_at_once_and_the_next_session_resumes_at_the_first_unlabelled(tmp_path):
    pairs, path = make_pairs(5), tmp_path / "labels.jsonl"
    first, script, _ = session(pairs, path, ["a", "s", "b", "quit", "a"])
    assert first.quit and (first.labelled, first.skipped, first.remaining) == (2, 1, 3)
    assert shown_numbers(script) == [1, 2, 3, 4]  # the answer after quit was never read
    second, script, _ = session(pairs, path, ["a", "b", "tie"])
    assert shown_numbers(script) == [2, 4, 5]  # labelled pairs are never shown again
    assert not second.quit and second.remaining == 0
    assert len(LabelStore(path)) == 5


def test_nothing_to_label_asks_nothing(tmp_path):
    pairs, path = make_pairs(2), tmp_path / "labels.jsonl"
    session(pairs, path, ["a", "b"])
    result, script, output = session(pairs, path, [])
    assert script.shown == [] and (result.labelled, result.remaining, result.quit) == (0, 0, False)
    assert "0 of 2 pairs still unlabelled" in output


def test_bad_input_asks_again(tmp_path):
    pairs, path = make_pairs(1), tmp_path / "labels.jsonl"
    result, script, output = session(pairs, path, ["", "c", "ab", "[red]", "b"])
    assert result.labelled == 1 and LabelStore(path).get(pairs[0].id).winner == "b"
    assert shown_numbers(script) == [1] * 5
    assert output.count("is not an answer") == 4
    assert "'[red]' is not an answer" in output


def test_end_of_input_is_quit(tmp_path):
    pairs, path = make_pairs(3), tmp_path / "labels.jsonl"
    result, script, _ = session(pairs, path, ["a"])  # the script raises EOFError once out of answers
    assert result.quit and (result.labelled, result.remaining) == (1, 2)
    assert len(LabelStore(path)) == 1


def test_each_label_is_on_disk_before_the_next_question(tmp_path):
    pairs, path = make_pairs(3), tmp_path / "labels.jsonl"
    on_disk = []

    def check(question_number):
        # Re-read from the file, as a new process after a crash would.
        on_disk.append(len(LabelStore(path)) if path.exists() else 0)

    session(pairs, path, ["a", "b", "tie"], on_read=check)
    assert on_disk == [0, 1, 2]


def test_ctrl_c_keeps_the_labels_and_propagates(tmp_path):
    pairs, path = make_pairs(3), tmp_path / "labels.jsonl"
    file = io.StringIO()
    with LabelStore(path) as store, pytest.raises(KeyboardInterrupt):
        label_interactively(pairs, store, read=Script(["a", KeyboardInterrupt()], file),
                            console=Console(file=file, width=100, color_system=None))
    assert "interrupted" in file.getvalue() and "first pair still unlabelled" in file.getvalue()
    assert [label.pair_id for label in LabelStore(path).labels()] == [pairs[0].id]


def test_model_text_is_printed_literally(tmp_path):
    pair = Pair.create([{"role": "system", "content": "be [italic]brief[/italic]"},
                        {"role": "user", "content": "what does [bold] do?"}],
                       "It makes text [bold]bold[/bold].", "Closing tags like [/red] alone are fine.", "p:1")
    _, _, output = session([pair], tmp_path / "labels.jsonl", ["a"])
    for text in ("be [italic]brief[/italic]", "what does [bold] do?", "It makes text [bold]bold[/bold].",
                 "Closing tags like [/red] alone are fine."):
        assert text in output
    assert "system:" in output and "user:" in output
    assert "Response A" in output and "Response B" in output


def test_pairs_settled_elsewhere_are_not_asked(tmp_path):
    """Pairs other people's votes decided on the web page (or this person voted on there) are passed over."""
    pairs, path = make_pairs(3), tmp_path / "labels.jsonl"
    file = io.StringIO()
    script = Script(["a", "b"], file)
    with LabelStore(path) as store:
        result = label_interactively(pairs, store, read=script, settled={pairs[1].id},
                                     console=Console(file=file, width=100, color_system=None))
    assert shown_numbers(script) == [1, 3] and (result.labelled, result.remaining) == (2, 0)
    assert [label.pair_id for label in LabelStore(path).labels()] == [pairs[0].id, pairs[2].id]
