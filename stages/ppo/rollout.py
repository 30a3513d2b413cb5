"""One PPO rollout: sample responses, score them, and record what the optimisation needs about each token.

Sampling is batched with the KV cache (model.generate on left-padded prompts), stops at the end-of-turn token or
after max_new_tokens, and is seeded by the caller per iteration, so a resumed run samples exactly what an
uninterrupted one would. Then, with one forward each (no gradients): the actor's log-probabilities of the sampled
tokens, the reference's (adapters off, or the frozen copy under full fine-tuning), and the critic's values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import PPOTrainerConfig
from pipeline.distributed import zero3_sharded
from pipeline.errors import PipelineError
from pipeline.render import prompt_ids
from stages.online import RewardFunction
from stages.ppo.losses import logprobs_from_logits
from stages.ppo.model import ACTOR, ActorCritic


@dataclass
class Rollout:
    prompts: list[list[dict]]
    texts: list[str]
    """The decoded responses (special tokens removed, stripped), as the reward function sees them."""
    queries: torch.Tensor
    """(batch, prompt length): prompt ids, left-padded."""
    query_mask: torch.Tensor
    responses: torch.Tensor
    """(batch, response length): sampled ids through the end-of-turn token, then padding."""
    mask: torch.Tensor
    """(batch, response length), float: 1 on response tokens (the end-of-turn token included)."""
    has_eos: torch.Tensor
    """(batch,), bool: whether the response ended with the end-of-turn token (not cut off by max_new_tokens)."""
    logprobs: torch.Tensor
    """The actor's log-probabilities of the sampled tokens (at the sampling temperature), 0 on padding."""
    ref_logprobs: torch.Tensor
    """The reference's (the starting policy), 0 on padding."""
    values: torch.Tensor
    """The critic's value before each response token, 0 on padding."""

    def inputs(self, rows=slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask of prompt + response for the selected rows."""
        return joined(self.queries[rows], self.query_mask[rows], self.responses[rows], self.mask[rows])


def joined(queries, query_mask, responses, mask) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([queries, responses], dim=1), torch.cat([query_mask, mask.long()], dim=1)


def response_mask(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask through the first end-of-turn token, whether there was one) per row. Only EOS ends a response: a pad
    id sampled mid-response (a random model does that) is an ordinary token of it."""
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(dim=1)
    never = torch.full_like(has_eos, responses.shape[1], dtype=torch.long)
    first = torch.where(has_eos, is_eos.float().argmax(dim=1), never)
    positions = torch.arange(responses.shape[1], device=responses.device).unsqueeze(0)
    return (positions <= first.unsqueeze(1)).float(), has_eos


@torch.no_grad()
def sample(module: ActorCritic, tokenizer, prompts: list[list[dict]], cfg: PPOTrainerConfig, seed: int) -> dict:
    """One response per prompt from the actor, reproducible from `seed`: queries and query_mask (the prompts,
    left-padded), responses (padding after the end-of-turn token), mask, has_eos and the decoded texts."""
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every row continues from its own last prompt token
    try:
        encoded = tokenizer.pad({"input_ids": [prompt_ids(tokenizer, p) for p in prompts]}, return_tensors="pt")
    finally:
        tokenizer.padding_side = padding_side
    device = next(module.parameters()).device
    queries, query_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    was_training = module.training
    module.eval()  # no dropout while sampling
    module.use(ACTOR)
    torch.manual_seed(seed)
    # top_k=0: sample from the whole distribution, the one whose log-probabilities the loss uses.
    # Under ZeRO-3 every forward gathers weights from all processes, so every process must keep stepping until the
    # longest response anywhere is done (synced_gpus), or the ones that finished first would leave the others hanging.
    sharded = zero3_sharded(module.parameters())
    output = module.policy.generate(
        input_ids=queries, attention_mask=query_mask, do_sample=True, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, synced_gpus=sharded,
    )
    module.train(was_training)
    responses = output[:, queries.shape[1]:]
    mask, has_eos = response_mask(responses, tokenizer.eos_token_id)
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, tokenizer.pad_token_id))
    texts = [tokenizer.decode(row[: int(n)], skip_special_tokens=True).strip() for row, n in zip(responses, mask.sum(1))]
    return {"queries": queries, "query_mask": query_mask, "responses": responses, "mask": mask, "has_eos": has_eos,
            "texts": texts}


@torch.no_grad()
def rollout(module: ActorCritic, tokenizer, prompts: list[list[dict]], cfg: PPOTrainerConfig, seed: int) -> Rollout:
    """Sample one response per prompt and measure it with the actor, the reference and the critic."""
    sampled = sample(module, tokenizer, prompts, cfg, seed)
    queries, query_mask, responses, mask = (sampled[k] for k in ("queries", "query_mask", "responses", "mask"))
    was_training = module.training
    module.eval()  # the old policy is measured without dropout, as it sampled

    # The old policy, the reference and the values, in chunks of mini_batch_size rows to bound the logits' memory.
    measured = {"actor": [], "reference": [], "values": []}
    length = responses.shape[1]
    for first in range(0, len(prompts), cfg.mini_batch_size):
        rows = slice(first, first + cfg.mini_batch_size)
        ids, attention = joined(queries[rows], query_mask[rows], responses[rows], mask[rows])
        logits, values = module(ids, attention, length, "actor_critic")
        measured["actor"].append(logprobs_from_logits(logits / cfg.temperature, responses[rows]))
        measured["values"].append(values)
        logits = module(ids, attention, length, "reference")
        measured["reference"].append(logprobs_from_logits(logits / cfg.temperature, responses[rows]))
    module.train(was_training)
    logprobs, ref_logprobs, values = (torch.cat(measured[key]) * mask for key in ("actor", "reference", "values"))
    return Rollout(prompts, sampled["texts"], queries, query_mask, responses, mask, sampled["has_eos"], logprobs,
                   ref_logprobs, values)


def score(batch: Rollout, reward_fn: RewardFunction, missing_eos_penalty: float | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the reward function's scores, the scores PPO maximises: minus the penalty for a response that never
    ended). The penalty teaches the policy to stop instead of rambling to max_new_tokens."""
    raw = torch.tensor([float(s) for s in reward_fn(batch.prompts, batch.texts)], device=batch.mask.device)
    if len(raw) != len(batch.texts):
        raise PipelineError(f"the reward function returned {len(raw)} scores for {len(batch.texts)} responses")
    penalised = raw.clone()
    if missing_eos_penalty is not None:
        penalised[~batch.has_eos] -= missing_eos_penalty
    return raw, penalised
