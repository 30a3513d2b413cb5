"""A trained reward model as judge, and as the scorer PPO takes its rewards from.

`score` reads one scalar per (prompt, response) from a one-output sequence-classification model, on exactly the
token ids the rm stage trains on (`response_ids`), so a reward means the same in training, judging and PPO.
`judge` scores both responses of a pair: the higher wins unless the two are within `tie_margin`, and the
confidence is the Bradley-Terry probability of the winner, sigmoid(|r_a - r_b|). A conversation longer than
`max_length` is never truncated: `judge` leaves its pair unlabelled and counted, `score` refuses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.log import warn
from pipeline.models import load_reward_model, load_tokenizer
from pipeline.render import response_ids
from reward.judges import label_from_scores
from reward.pairs import Label, Pair


class RewardModelJudge:
    """`model` is a loaded reward model (see `from_path`). `on_label`, if given, is called with each label as
    soon as its pair is scored."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 1024, tie_margin: float = 0.0,
                 name: str = "reward_model", on_label: Callable[[Label], None] | None = None):
        if batch_size < 1 or max_length < 1 or tie_margin < 0:
            raise ConfigError(f"the reward_model judge needs batch_size ≥ 1, max_length ≥ 1 and tie_margin ≥ 0, "
                              f"got {batch_size}, {max_length} and {tie_margin}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.tie_margin = batch_size, max_length, tie_margin
        self.name, self.on_label = name, on_label
        self.too_long = 0
        """Pairs left unlabelled because a response was over max_length, over this judge's lifetime."""

    @classmethod
    def from_path(cls, base: Path, model_cfg: ModelConfig, adapter: Path | None = None,
                  **options) -> RewardModelJudge:
        """The judge with the reward model at `base` (and its PEFT `adapter`); `options` go to the constructor."""
        tokenizer = load_tokenizer(model_cfg, base)
        return cls(load_reward_model(base, model_cfg, tokenizer, adapter).eval(), tokenizer, **options)

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        """The reward of each `responses[i]` as the answer to `prompts[i]` (a message list ending with the user's
        turn), in batches of `batch_size`. Raises PipelineError if a conversation is over max_length tokens."""
        ids = [response_ids(self.tokenizer, prompt, response) for prompt, response in zip(prompts, responses)]
        longest = max((len(x) for x in ids), default=0)
        if longest > self.max_length:
            over = sum(len(x) > self.max_length for x in ids)
            raise PipelineError(f"{over} of {len(ids)} conversations to score are longer than max_length="
                                f"{self.max_length} tokens (the longest {longest}); the reward model scores whole "
                                "conversations only, so raise max_length")
        scores = []
        for start in range(0, len(ids), self.batch_size):
            scores += self._forward(ids[start:start + self.batch_size])
        return scores

    def _forward(self, batch: list[list[int]]) -> list[float]:
        """One scalar per token-id list, in one forward pass, right-padded as the rm stage's trainer pads."""
        width = max(len(ids) for ids in batch)
        # The model reads each score at the last token that is not pad_token_id, so padding must be that id.
        input_ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        return logits[:, 0].float().tolist()

    def judge(self, pairs: list[Pair]) -> list[Label]:
        jobs = []  # (pair index, "a" or "b", token ids); a pair's two responses are adjacent
        too_long = []
        for index, pair in enumerate(pairs):
            a = response_ids(self.tokenizer, pair.prompt, pair.response_a)
            b = response_ids(self.tokenizer, pair.prompt, pair.response_b)
            if max(len(a), len(b)) > self.max_length:
                too_long.append(pair)
                continue
            jobs += [(index, "a", a), (index, "b", b)]
        if too_long:
            self.too_long += len(too_long)
            warn(f"{self.name}: {len(too_long)} pairs (the first from {too_long[0].source}) have a response longer "
                 f"than max_length={self.max_length} tokens; they stay unlabelled (raise "
                 "preferences.judge.max_length to judge them)")
        scores: dict[int, dict[str, float]] = {}
        labels = []
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start:start + self.batch_size]
            for (index, side, _), value in zip(batch, self._forward([ids for _, _, ids in batch])):
                scores.setdefault(index, {})[side] = value
                if len(scores[index]) == 2:
                    labels.append(label_from_scores(pairs[index], scores[index]["a"], scores[index]["b"],
                                                    self.tie_margin, self.name))
                    if self.on_label:
                        self.on_label(labels[-1])
        return labels
