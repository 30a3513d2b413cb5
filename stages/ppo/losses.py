"""The mathematics of PPO for language models, as pure tensor functions (no model, no config).

Shapes: (batch, response_length) for per-token quantities; `mask` is 1 on the tokens of a response (through its
end-of-turn token) and 0 on the padding after it. Every mean over tokens is a masked mean, so padding never counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over everything, or along `dim`)."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of `values` where `mask` is 1 (Bessel's correction, as TRL and the original RLHF code)."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    variance = masked_mean((values - mean) ** 2, mask)
    return variance * count / (count - 1).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale to unit variance over the masked entries, and (with shift_mean) centre on zero; padding comes out 0."""
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the tokens of each response.

    A_t = delta_t + gamma * lam * A_{t+1},  delta_t = r_t + gamma * V_{t+1} - V_t,  and V after the last token is 0
    (the episode ends there). Masked positions are not steps: the recursion passes over them to the next token that
    counts. Returns (advantages, returns = advantages + values), both 0 where `mask` is 0.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    last_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        valid = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * last_advantage
        advantages[:, t] = torch.where(valid, advantage, torch.zeros_like(advantage))
        last_advantage = torch.where(valid, advantage, last_advantage)
        next_value = torch.where(valid, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate log pi(a|s) - log pi_ref(a|s) of the sampled tokens (k1: unbiased; its sum over a
    response estimates KL(pi || pi_ref) of the whole sequence). 0 on padding."""
    return (logprobs - ref_logprobs) * mask


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """-kl_coef * KL on every token, plus the sequence's score on its last token (Ziegler et al. 2019)."""
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # responses are left-aligned: the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    """Share of tokens where the clipped objective was the one taken (the update wanted to go further)."""
    approx_kl: torch.Tensor
    """mean((ratio - 1) - log ratio): an unbiased, non-negative estimate of KL(old || new) (Schulman's k3)."""


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> PolicyLoss:
    """PPO's clipped surrogate: mean of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) over response tokens."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return PolicyLoss(masked_mean(torch.maximum(unclipped, clipped), mask), clip_fraction, approx_kl)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * mean(max((V - R)^2, (V_clip - R)^2)), V_clip = V_old + clip(V - V_old, +-eps).

    Returns (loss, clip fraction: share of tokens where the clipped error was the larger one)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clip_fraction


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at every position: logsumexp(z) - sum(softmax(z) * z)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) at every position, from unnormalised logits of shape (batch, length, vocab)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float):
        self.value = coef

    def update(self, kl: float, n_samples: int) -> None:
        pass  # fixed by definition; the same interface as the adaptive controller keeps the loop free of branches

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController:
    """Ziegler et al. (2019): nudge the coefficient so the policy's KL to the reference stays near a target.

    coef <- coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon), with n the samples since the last update:
    a KL above target raises the penalty, one below lowers it, by at most 20% per `horizon` samples.
    """

    def __init__(self, coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
