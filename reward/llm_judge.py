"""A local causal LM as pairwise judge, read from its next-token probabilities rather than from sampled text.

Each pair is asked twice, once in each order, with the same question the API judge asks (`judge_messages`). The
answer is the model's log-odds of "A" against "B" as the first token of its reply (the difference of those two
logits; p(A) is its sigmoid). Nothing is sampled, so labels are deterministic and no reply is ever unreadable.

Position bias is removed with the strength of both orders, not by calling every disagreement a tie. Read each
order's log-odds as content plus position: l_ab = s + b with response_a shown first, l_ba = -s + b with it shown
second, where s is how much the judge prefers response_a and b its pull towards whichever response comes first.
Then s = (l_ab - l_ba) / 2 and b = (l_ab + l_ba) / 2, per pair: the winner is the sign of s (a tie within
`tie_margin`), the confidence sigmoid(|s|), and b, the position prior, is kept with the label and reported. Prompts are
batched with left padding, so every prompt ends at the last position, where the reply's first token is predicted.
A prompt longer than `max_length` leaves its pair unlabelled and counted, never truncated: a cut conversation
would be judged on text it never had.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pipeline.config import ModelConfig
from pipeline.distributed import is_main_process
from pipeline.errors import ConfigError
from pipeline.log import warn
from pipeline.models import load_policy, load_tokenizer
from pipeline.render import prompt_ids
from reward.judges import DEFAULT_RUBRIC, constitution, judge_messages, sigmoid
from reward.pairs import Label, Pair


def label_token(tokenizer, letter: str) -> int:
    """The id of the one token that spells `letter`; a judge reading two logits cannot use a letter split in two."""
    ids = tokenizer(letter, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(f"the judge's tokenizer writes {letter!r} as {len(ids)} tokens {ids}, so its answer cannot "
                          "be read from one next-token probability; use a judge model whose tokenizer has a "
                          f"single token for {letter!r}")
    return ids[0]


class LlmJudge:
    """`model` is a loaded causal LM (see `from_path`); `principles`, when given, replace `rubric` as a numbered
    constitution. `on_label`, if given, is called with each label as soon as both orders of its pair are read."""

    def __init__(self, model, tokenizer, rubric: str | None = None, principles: list[str] | None = None,
                 batch_size: int = 8, max_length: int = 1024, tie_margin: float = 0.0, name: str = "llm",
                 on_label: Callable[[Label], None] | None = None):
        if batch_size < 1 or max_length < 1 or tie_margin < 0:
            raise ConfigError(f"the llm judge needs batch_size ≥ 1, max_length ≥ 1 and tie_margin ≥ 0, got "
                              f"{batch_size}, {max_length} and {tie_margin}")
        self.model, self.tokenizer = model, tokenizer
        self.rubric = constitution(principles) if principles else rubric or DEFAULT_RUBRIC
        self.batch_size, self.max_length, self.name, self.on_label = batch_size, max_length, name, on_label
        self.tie_margin = tie_margin
        self.answer_ids = [label_token(tokenizer, "A"), label_token(tokenizer, "B")]
        self.too_long = 0
        """Pairs left unlabelled because a prompt was over max_length, over this judge's lifetime."""

    @classmethod
    def from_path(cls, path: Path, model_cfg: ModelConfig, adapter: Path | None = None, **options) -> LlmJudge:
        """The judge with the model at `path` (and `adapter` merged in); `options` go to the constructor."""
        tokenizer = load_tokenizer(model_cfg, path)
        return cls(load_policy(path, adapter, model_cfg, tokenizer), tokenizer, **options)

    def prompt(self, pair: Pair, first: str, second: str) -> list[int]:
        """Token ids of the question with `first` shown as Response A, up to where the judge's reply begins."""
        return prompt_ids(self.tokenizer, judge_messages(pair, first, second, self.rubric))

    def logodds_first(self, prompts: list[list[int]]) -> list[float]:
        """The log-odds of "A" against "B" as the first reply token, for each prompt, in one forward pass."""
        width = max(len(ids) for ids in prompts)
        device = next(self.model.parameters()).device
        # The pad id is never read: padded positions are masked out of attention.
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        # Positions count from each prompt's own first token, as if it were alone: otherwise a left-padded prompt
        # starts at position `padding`, which changes what a model with absolute positions sees.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            # Only the last position's logits: the full batch × length × vocabulary tensor can run to gigabytes.
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                position_ids=position_ids.to(device), logits_to_keep=1).logits[:, -1]
        return (logits[:, self.answer_ids[0]].float() - logits[:, self.answer_ids[1]].float()).tolist()

    def batches(self, pairs: list[Pair]) -> list[list[tuple[int, str, list[int]]]]:
        """The forward passes judging `pairs` takes: batches of (pair index, order, prompt ids), both orders of a
        pair adjacent (so mostly in one batch); pairs with a prompt over max_length are counted and left out."""
        jobs, too_long = [], []
        for index, pair in enumerate(pairs):
            ab = self.prompt(pair, pair.response_a, pair.response_b)
            ba = self.prompt(pair, pair.response_b, pair.response_a)
            if max(len(ab), len(ba)) > self.max_length:
                too_long.append(pair)
                continue
            jobs += [(index, "ab", ab), (index, "ba", ba)]
        if too_long:
            self.too_long += len(too_long)
            warn(f"{self.name}: {len(too_long)} pairs (the first from {too_long[0].source}) make a judge prompt "
                 f"longer than max_length={self.max_length} tokens; they stay unlabelled (raise "
                 "preferences.judge.max_length to judge them)")
        return [jobs[start:start + self.batch_size] for start in range(0, len(jobs), self.batch_size)]

    def answer(self, batch: list[tuple[int, str, list[int]]]) -> list[tuple[int, str, float]]:
        """(pair index, order, log-odds of "A") for each prompt of one batch."""
        logodds = self.logodds_first([ids for _, _, ids in batch])
        return [(index, order, value) for (index, order, _), value in zip(batch, logodds)]

    def judge(self, pairs: list[Pair]) -> list[Label]:
        collect = Collector(self, pairs, self.on_label)
        return [label for batch in self.batches(pairs) for label in collect(self.answer(batch))]

    def judge_in_processes(self, pairs: list[Pair]) -> list[Label]:
        """judge() shared by the processes `accelerate launch` started: each answers every num_processes-th batch
        and every process gets every answer; on_label is called on the main process only. Under ZeRO-3 each forward
        gathers the layers from all processes, so every process runs the same number of forwards: one whose share
        has run out repeats a batch and drops its answers."""
        from accelerate import PartialState
        from accelerate.utils import gather_object

        state = PartialState()
        collect = Collector(self, pairs, on_label=self.on_label if is_main_process() else None)
        batches, labels = self.batches(pairs), []
        for first in range(0, len(batches), state.num_processes):
            mine = first + state.process_index
            answers = self.answer(batches[min(mine, len(batches) - 1)])
            labels += collect(gather_object(answers if mine < len(batches) else []))
        return labels

    def label(self, pair: Pair, first: float, swapped: float) -> Label:
        """`first` is the log-odds of "A" with response_a shown as A; `swapped` with response_b shown as A."""
        strength, position_bias = (first - swapped) / 2, (first + swapped) / 2
        if abs(strength) <= self.tie_margin:
            winner, confidence = "tie", 0.5
        else:
            winner, confidence = ("a" if strength > 0 else "b"), sigmoid(abs(strength))
        verdicts = {
            # What each order alone would have said, kept for the order-flip rate.
            "ab": "a" if first > 0 else "b" if first < 0 else "tie",
            "ba": "b" if swapped > 0 else "a" if swapped < 0 else "tie",
            "p_a_first": sigmoid(first), "p_a_swapped": sigmoid(swapped),
            "strength": strength, "position_bias": position_bias,
        }
        return Label(pair.id, winner, self.name, confidence, verdicts)


class Collector:
    """Turns answers into labels as both orders of a pair come in (in any order, from any process)."""

    def __init__(self, judge: LlmJudge, pairs: list[Pair], on_label: Callable[[Label], None] | None):
        self.judge, self.pairs, self.on_label = judge, pairs, on_label
        self.logodds: dict[int, dict[str, float]] = {}

    def __call__(self, answers: list[tuple[int, str, float]]) -> list[Label]:
        labels = []
        for index, order, value in answers:
            self.logodds.setdefault(index, {})[order] = value
            if len(self.logodds[index]) == 2:
                labels.append(self.judge.label(self.pairs[index], self.logodds[index]["ab"],
                                               self.logodds[index]["ba"]))
                if self.on_label:
                    self.on_label(labels[-1])
        return labels
