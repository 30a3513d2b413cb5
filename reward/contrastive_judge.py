"""A local causal LM as judge by contrastive likelihood: how much more likely the model finds a response when told
to follow the labeller's principle than when told to violate it.

Small models cannot judge by answering "A" or "B" (they answer the same letter whatever the order), but they do
know what an answer that follows an instruction looks like. For a response r to a prompt x:

    score(r) = log p(r | follow, x) - log p(r | violate, x)

where `follow` is a system message that asks for what the rubric (or constitution) prefers and `violate` one that
asks for the opposite (contrastive conditioning, as RLCD, Yang et al. 2023, uses to generate preference data; here
it reads them). What the two conditions share (fluency, topic, how likely the words are anyway) cancels; what is
left is how much the response looks like following the principle rather than violating it.

Length is handled deliberately by `length_norm`: `sum` adds the per-token differences, so a long response that
follows the principle throughout scores more than a short one; `mean` divides by the response's token count, so
it is the per-token strength and length does not count. Each response is scored on its own, so there is no
position to be biased by: `judge` compares the two scores, and the same scores serve as a pointwise reward
(`score`), e.g. for ppo. Responses are scored on exactly the text sft trained on (`render_conversation`'s
assistant span, its end-of-turn token included); a conversation over `max_length` is never truncated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.log import warn
from pipeline.models import load_policy, load_tokenizer
from pipeline.render import IGNORE, render_conversation
from reward.judges import DEFAULT_RUBRIC, constitution, label_from_scores
from reward.pairs import Label, Pair

LENGTH_NORMS = ("sum", "mean")


def instructions(rubric: str, violation: str | None = None, follow: str | None = None) -> tuple[str, str]:
    """The two system messages: one asking for what `rubric` prefers, one for the opposite. `follow` and
    `violation`, when given, are their own wordings, used as they are (a small model follows "write a vague answer"
    better than "do the opposite of: write a specific answer", and a plain order better than one behind a preamble:
    README, the judges)."""
    follow = follow or f"Write the response that best follows this guidance. {rubric}"
    violate = violation or f"Write a response that goes against this guidance, doing the opposite of what it asks. {rubric}"
    return follow, violate


def with_system(instruction: str, prompt: list[dict]) -> list[dict]:
    """`prompt` with `instruction` as its system message (placed before the conversation's own, if it has one)."""
    if prompt and prompt[0]["role"] == "system":
        return [{"role": "system", "content": f"{instruction}\n\n{prompt[0]['content']}"}, *prompt[1:]]
    return [{"role": "system", "content": instruction}, *prompt]


class ContrastiveJudge:
    """`model` is a loaded causal LM (see `from_path`). `on_label`, if given, is called with each label as soon as
    both responses of its pair are scored."""

    def __init__(self, model, tokenizer, rubric: str | None = None, principles: list[str] | None = None,
                 violation: str | None = None, follow: str | None = None, length_norm: str = "sum", batch_size: int = 8,
                 max_length: int = 1024, tie_margin: float = 0.0, name: str = "contrastive",
                 on_label: Callable[[Label], None] | None = None):
        if length_norm not in LENGTH_NORMS:
            raise ConfigError(f"the contrastive judge's length_norm must be one of {', '.join(LENGTH_NORMS)}, "
                              f"got {length_norm!r}")
        if batch_size < 1 or max_length < 1 or tie_margin < 0:
            raise ConfigError(f"the contrastive judge needs batch_size ≥ 1, max_length ≥ 1 and tie_margin ≥ 0, "
                              f"got {batch_size}, {max_length} and {tie_margin}")
        self.model, self.tokenizer = model, tokenizer
        self.follow, self.violate = instructions(constitution(principles) if principles else rubric or DEFAULT_RUBRIC,
                                                 violation, follow)
        self.length_norm, self.batch_size, self.max_length = length_norm, batch_size, max_length
        self.tie_margin, self.name, self.on_label = tie_margin, name, on_label
        self.too_long = 0
        """Pairs left unlabelled because a conversation was over max_length, over this judge's lifetime."""

    @classmethod
    def from_path(cls, path: Path, model_cfg: ModelConfig, adapter: Path | None = None,
                  **options) -> ContrastiveJudge:
        """The judge with the model at `path` (and `adapter` merged in); `options` go to the constructor."""
        tokenizer = load_tokenizer(model_cfg, path)
        return cls(load_policy(path, adapter, model_cfg, tokenizer), tokenizer, **options)

    def rendered(self, instruction: str, prompt: list[dict], response: str) -> tuple[list[int], list[int]]:
        """Token ids and labels (IGNORE outside the response) of `prompt` answered by `response` under
        `instruction`."""
        return render_conversation(self.tokenizer,
                                   [*with_system(instruction, prompt), {"role": "assistant", "content": response}])

    def log_likelihoods(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        """(sum of the response tokens' log-probabilities, their count) for each rendered row, in one forward."""
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)  # right-padded; padding is masked out
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for row, (ids, targets) in enumerate(rows):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(ids)] = torch.tensor(targets)
            attention_mask[row, :len(ids)] = 1
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        # Position t predicts token t + 1.
        targets, logits = labels[:, 1:].to(device), logits[:, :-1].float()
        mask = targets != IGNORE
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums = (token_logp * mask).sum(-1)
        return [(total, count) for total, count in zip(sums.tolist(), mask.sum(-1).tolist())]

    def _jobs(self, prompt: list[dict], response: str) -> list[tuple[list[int], list[int]]]:
        return [self.rendered(self.follow, prompt, response), self.rendered(self.violate, prompt, response)]

    def _scores(self, jobs: list[list[tuple[list[int], list[int]]]]) -> list[float]:
        """The contrastive score of each job (its follow and violate renderings), batched over all of them."""
        flat = [row for job in jobs for row in job]
        read = []
        for start in range(0, len(flat), self.batch_size):
            read += self.log_likelihoods(flat[start:start + self.batch_size])
        scores = []
        for (follow, n_follow), (violate, n_violate) in zip(read[0::2], read[1::2]):
            if self.length_norm == "mean":
                scores.append(follow / max(n_follow, 1) - violate / max(n_violate, 1))
            else:
                scores.append(follow - violate)
        return scores

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        """The contrastive score of each `responses[i]` as the answer to `prompts[i]`: a pointwise reward.
        Raises PipelineError if a conversation is over max_length tokens."""
        jobs = [self._jobs(prompt, response) for prompt, response in zip(prompts, responses)]
        longest = max((len(ids) for job in jobs for ids, _ in job), default=0)
        if longest > self.max_length:
            raise PipelineError(f"a conversation to score is {longest} tokens, over the contrastive judge's "
                                f"max_length={self.max_length}; it scores whole conversations only, so raise max_length")
        return self._scores(jobs)

    def judge(self, pairs: list[Pair]) -> list[Label]:
        jobs, kept, too_long = [], [], []
        for pair in pairs:
            pair_jobs = [self._jobs(pair.prompt, pair.response_a), self._jobs(pair.prompt, pair.response_b)]
            if max(len(ids) for job in pair_jobs for ids, _ in job) > self.max_length:
                too_long.append(pair)
                continue
            jobs += pair_jobs
            kept.append(pair)
        if too_long:
            self.too_long += len(too_long)
            warn(f"{self.name}: {len(too_long)} pairs (the first from {too_long[0].source}) make a conversation "
                 f"longer than max_length={self.max_length} tokens; they stay unlabelled (raise "
                 "preferences.judge.max_length to judge them)")
        labels = []
        # Scored a few pairs at a time, so each label is stored as soon as its pair is read.
        per_call = max(1, self.batch_size // 4)
        for start in range(0, len(kept), per_call):
            chunk = kept[start:start + per_call]
            scores = self._scores(jobs[2 * start:2 * (start + len(chunk))])
            for pair, a, b in zip(chunk, scores[0::2], scores[1::2]):
                labels.append(label_from_scores(pair, a, b, self.tie_margin, self.name))
                if self.on_label:
                    self.on_label(labels[-1])
        return labels
