"""Judges: anything that looks at pairs of responses and says which is better.

Every judge has one shape (`Judge`), so the preferences stage swaps a person for a model by one config key
(`preferences.judge.type`). Here: `RuleJudge` (a Python scoring function) and `HumanFileJudge` (labels someone
already gave, in a file). The model judges (reward.api_judge, reward.llm_judge, reward.rm_judge) live in their
own modules; the LLM ones share `judge_messages`, the question they are asked, and see every pair in both orders,
because models favour one position: `combine_both_orders` turns the two answers into one label and keeps both.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Callable, Iterable, Protocol, runtime_checkable

from pipeline.records import read_records
from pipeline.errors import ConfigError, DataError, PipelineError
from reward.pairs import WINNERS, Label, Pair, is_number, pair_id


@runtime_checkable
class Judge(Protocol):
    """Labels pairs, a batch at a time.

    `judge` returns at most one label per pair, in the order of `pairs`. A judge that cannot label a pair (a label
    file without it, an answer it cannot read) leaves it out rather than guess: `unlabelled` lists what is left,
    and the caller reports it. A judge that sees both orders records them in `Label.verdicts` as {"ab", "ba"}.
    """

    name: str

    def judge(self, pairs: list[Pair]) -> list[Label]: ...


DEFAULT_RUBRIC = "Prefer the response that is more helpful, honest and harmless, and that answers what was asked."


def constitution(principles: list[str]) -> str:
    """Principles written out as the numbered list a judge's system message carries in place of a rubric."""
    lines = "\n".join(f"{i}. {principle}" for i, principle in enumerate(principles, 1))
    return f"Judge by these principles:\n{lines}"


def judge_messages(pair: Pair, first: str, second: str, rubric: str = DEFAULT_RUBRIC) -> list[dict]:
    """The chat a model judge is asked: `first` shown as Response A, `second` as B, `rubric` in the system message.

    One wording for the API and the local LLM judge, so swapping one for the other changes the judge, not the
    question."""
    conversation = "\n\n".join(f"{m['role']}: {m['content']}" for m in pair.prompt)
    system = (f"You compare two responses to the same conversation. {rubric}\n"
              "Answer with a single letter: A or B.")
    user = (f"[Conversation]\n{conversation}\n\n[Response A]\n{first}\n\n[Response B]\n{second}\n\n"
            "Which response is better? Answer with A or B.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def unlabelled(pairs: Iterable[Pair], labels: Iterable[Label]) -> list[Pair]:
    done = {label.pair_id for label in labels}
    return [pair for pair in pairs if pair.id not in done]


def combine_both_orders(first: str, swapped: str) -> tuple[str, dict]:
    """One winner from a judge shown (a, b) as "A", "B" and then (b, a) as "A", "B".

    `first` is the answer with response_a shown as A; `swapped` the answer with response_b shown as A. Agreeing
    answers give that winner; disagreeing ones are a tie, since the judge preferred a position, not a response.
    Returns (winner, {"ab": winner of the first order, "ba": winner of the swapped order}).
    """
    in_order = {"A": "a", "B": "b", "TIE": "tie"}
    in_swapped = {"A": "b", "B": "a", "TIE": "tie"}
    for answer in (first, swapped):
        if answer.strip().upper() not in in_order:
            raise ValueError(f"a verdict must be 'A', 'B' or 'tie', got {answer!r}")
    ab, ba = in_order[first.strip().upper()], in_swapped[swapped.strip().upper()]
    return (ab if ab == ba else "tie"), {"ab": ab, "ba": ba}


def label_from_scores(pair: Pair, a: float, b: float, tie_margin: float, name: str) -> Label:
    """The label of a judge that scores each response on its own (a reward model, the contrastive judge): the
    higher score wins unless the two are within `tie_margin`; the confidence is the Bradley-Terry probability of
    the winner, sigmoid(|a - b|)."""
    if abs(a - b) <= tie_margin:
        winner, confidence = "tie", 0.5
    else:
        winner, confidence = ("a" if a > b else "b"), sigmoid(abs(a - b))
    return Label(pair.id, winner, name, confidence, {"scores": {"a": a, "b": b}})


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


# ---------------------------------------------------------------------------- rule judge

def load_callable(target: str) -> Callable:
    """The function named by "package.module:function" (or "module:Class.method")."""
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(f"expected 'module:function', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(f"{target}: no module named {module_name!r}; is its directory on sys.path "
                              "(PYTHONPATH, or the directory you run from)?") from None
        raise ConfigError(f"{target}: importing {module_name!r} failed: {e}") from None
    except Exception as e:
        raise ConfigError(f"{target}: importing {module_name!r} raised {type(e).__name__}: {e}") from e
    value = module
    for part in attr_path.split("."):
        if not hasattr(value, part):
            raise ConfigError(f"{target}: {module_name!r} has no {attr_path!r} (module file: {module.__file__})")
        value = getattr(value, part)
    if not callable(value):
        raise ConfigError(f"{target}: {attr_path!r} is a {type(value).__name__}, not a function")
    return value


class RuleJudge:
    """Scores each response with score(prompt_messages, response) -> float; the higher wins, equal scores tie."""

    def __init__(self, function: str, name: str | None = None):
        self.function = function
        self.score_one = load_callable(function)
        self.name = name or f"rule:{function}"

    def _score(self, prompt: list[dict], response: str, where: str) -> float:
        value = self.score_one(prompt, response)
        if not is_number(value):
            raise PipelineError(f"{self.function} returned {value!r} for {where}; it must return a finite number")
        return float(value)

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        """Each response's score on its own: a pointwise reward."""
        return [self._score(prompt, response, "a response to score") for prompt, response in zip(prompts, responses)]

    def judge(self, pairs: list[Pair]) -> list[Label]:
        labels = []
        for pair in pairs:
            where = f"the pair from {pair.source}"
            a, b = self._score(pair.prompt, pair.response_a, where), self._score(pair.prompt, pair.response_b, where)
            winner = "a" if a > b else "b" if b > a else "tie"
            labels.append(Label(pair.id, winner, self.name, verdicts={"scores": {"a": a, "b": b}}))
        return labels


# ---------------------------------------------------------------------------- human labels from a file

class HumanFileJudge:
    """Labels a person gave, from a .jsonl/.json file of {"pair_id" or "prompt"+"response_a"+"response_b", "winner"}.

    "prompt" is a string (one user turn) or a message list, as in the pairs. A record may name the two responses in
    the other order than the pair; its winner is then swapped. Pairs the file does not label stay unlabelled.
    """

    def __init__(self, path: str | Path, name: str = "human_file"):
        self.path, self.name = str(path), name
        self._labels: dict[str, tuple[str, float | None]] = {}  # pair id -> (winner, confidence)
        self._lines: dict[str, int] = {}  # pair id -> line, to name both lines of a duplicate
        for line, record in read_records(self.path):
            self._read(line, record)

    def _read(self, line: int, record: dict) -> None:
        if "winner" not in record:
            raise DataError(self.path, line, "winner", "is required but missing")
        winner = record["winner"]
        if not isinstance(winner, str) or winner.strip().lower() not in WINNERS:
            raise DataError(self.path, line, "winner", f"must be one of {', '.join(WINNERS)}, found {winner!r}")
        winner = winner.strip().lower()
        confidence = record.get("confidence")
        if confidence is not None and not is_number(confidence):
            raise DataError(self.path, line, "confidence", "must be a number or null")
        if "pair_id" in record:
            if not isinstance(record["pair_id"], str) or not record["pair_id"]:
                raise DataError(self.path, line, "pair_id", "must be a non-empty string")
            self._add(line, record["pair_id"], winner, confidence)
            return
        prompt, a, b = self._texts(line, record)
        self._add(line, pair_id(prompt, a, b), winner, confidence)
        swapped = {"a": "b", "b": "a", "tie": "tie"}[winner]
        self._lines.setdefault(pair_id(prompt, b, a), line)
        self._labels.setdefault(pair_id(prompt, b, a), (swapped, confidence))

    def _texts(self, line: int, record: dict) -> tuple[list[dict], str, str]:
        for field in ("prompt", "response_a", "response_b"):
            if field not in record:
                raise DataError(self.path, line, field, "is required but missing (or give 'pair_id' instead)")
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif not (isinstance(prompt, list) and all(isinstance(m, dict) and set(m) == {"role", "content"}
                                                   for m in prompt)):
            raise DataError(self.path, line, "prompt", "must be a string or a list of {role, content} messages")
        for field in ("response_a", "response_b"):
            if not isinstance(record[field], str):
                raise DataError(self.path, line, field, "must be a string")
        return prompt, record["response_a"], record["response_b"]

    def _add(self, line: int, pair: str, winner: str, confidence: float | None) -> None:
        if pair in self._labels and self._lines[pair] != line:
            raise DataError(self.path, line, None, f"this pair is already labelled on line {self._lines[pair]}")
        self._labels[pair], self._lines[pair] = (winner, confidence), line

    def judge(self, pairs: list[Pair]) -> list[Label]:
        labels = []
        for pair in pairs:
            if pair.id in self._labels:
                winner, confidence = self._labels[pair.id]
                source = {"source": f"{self.path}:{self._lines[pair.id]}"}
                labels.append(Label(pair.id, winner, self.name, confidence, verdicts=source))
        return labels
