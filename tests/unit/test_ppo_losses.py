"""PPO's mathematics against plain Python written straight from the papers' definitions, and the data order that
makes its resume exact."""

from __future__ import annotations

import math
import random

import pytest
import torch

from stages.ppo import losses
from stages.ppo.trainer import prompt_indices


def reference_gae(rewards: list[float], values: list[float], mask: list[int], gamma: float, lam: float):
    """GAE for one sequence, as a loop over only the steps that count (masked positions are not steps)."""
    steps = [t for t, m in enumerate(mask) if m]
    advantages, returns = [0.0] * len(mask), [0.0] * len(mask)
    last = 0.0
    for i in reversed(range(len(steps))):
        t = steps[i]
        next_value = values[steps[i + 1]] if i + 1 < len(steps) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t], returns[t] = last, last + values[t]
    return advantages, returns


def random_mask(rng: random.Random, length: int, contiguous: bool) -> list[int]:
    if contiguous:  # a response: tokens through its end, then padding
        n = rng.randint(1, length)
        return [1] * n + [0] * (length - n)
    mask = [rng.randint(0, 1) for _ in range(length)]
    mask[rng.randrange(length)] = 1
    return mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_gae_matches_a_plain_loop(gamma, lam, contiguous):
    rng = random.Random(hash((gamma, lam, contiguous)) % 1000)
    for _ in range(5):
        batch, length = rng.randint(1, 5), rng.randint(1, 12)
        masks = [random_mask(rng, length, contiguous) for _ in range(batch)]
        rewards = [[rng.gauss(0, 1) * m for m in mask] for mask in masks]
        values = [[rng.gauss(0, 1) * m for m in mask] for mask in masks]
        advantages, returns = losses.gae(torch.tensor(rewards, dtype=torch.float64),
                                         torch.tensor(values, dtype=torch.float64),
                                         torch.tensor(masks, dtype=torch.float64), gamma, lam)
        for row in range(batch):
            expected_adv, expected_ret = reference_gae(rewards[row], values[row], masks[row], gamma, lam)
            assert advantages[row].tolist() == pytest.approx(expected_adv, abs=1e-6)
            assert returns[row].tolist() == pytest.approx(expected_ret, abs=1e-6)


def test_gae_ignores_what_lies_in_the_padding():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    rewards, values = torch.tensor([[0.1, 1.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.2, 0.0, 0.0]])
    garbage = torch.tensor([[0.0, 0.0, 7.0, -3.0]])
    clean = losses.gae(rewards, values, mask, 1.0, 0.95)
    dirty = losses.gae(rewards + garbage, values - garbage, mask, 1.0, 0.95)
    assert torch.allclose(clean[0], dirty[0]) and torch.allclose(clean[1], dirty[1])


def test_masked_mean_var_and_whiten():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    kept = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean = sum(kept) / len(kept)
    var = sum((x - mean) ** 2 for x in kept) / (len(kept) - 1)
    assert losses.masked_mean(values, mask).item() == pytest.approx(mean)
    assert losses.masked_var(values, mask).item() == pytest.approx(var)
    assert losses.masked_mean(values, mask, dim=1).tolist() == pytest.approx([2.0, 4.5])
    whitened = losses.masked_whiten(values, mask)
    assert whitened[mask.bool()].tolist() == pytest.approx([(x - mean) / math.sqrt(var + 1e-8) for x in kept])
    assert whitened[~mask.bool()].tolist() == [0.0, 0.0, 0.0]
    unshifted = losses.masked_whiten(values, mask, shift_mean=False)
    assert unshifted[mask.bool()].tolist() == pytest.approx([(x - mean) / math.sqrt(var) + mean for x in kept])


def test_clipped_policy_loss_by_hand():
    cliprange = 0.2
    logprobs = torch.tensor([[0.0, -1.0, -2.0, 0.5]])
    old = torch.tensor([[-0.5, -1.0, -1.5, 0.0]])
    advantages = torch.tensor([[1.0, -2.0, -1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    terms, clipped_count, kls = [], 0, []
    for lp, o, a in zip([0.0, -1.0, -2.0], [-0.5, -1.0, -1.5], [1.0, -2.0, -1.0]):
        ratio = math.exp(lp - o)
        unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - cliprange), 1 + cliprange)
        terms.append(max(unclipped, clipped))
        clipped_count += clipped > unclipped
        kls.append((ratio - 1) - (lp - o))
    result = losses.policy_loss(logprobs, old, advantages, mask, cliprange)
    assert result.loss.item() == pytest.approx(sum(terms) / 3)
    assert result.clip_fraction.item() == pytest.approx(clipped_count / 3)
    # e^0.5 with a positive advantage and e^-0.5 with a negative one both went past the clip range; ratio 1 did not.
    assert clipped_count == 2
    assert result.approx_kl.item() == pytest.approx(sum(kls) / 3)


def test_policy_loss_gradient_raises_the_probability_of_advantaged_tokens():
    logprobs = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    result = losses.policy_loss(logprobs, logprobs.detach(), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2)
    result.loss.backward()
    assert logprobs.grad[0, 0] < 0 < logprobs.grad[0, 1]  # descent raises the first, lowers the second


def test_clipped_value_loss_by_hand():
    eps = 0.2
    values, old = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 0.1, 0.0]])
    returns, mask = torch.tensor([[2.0, -1.0, 5.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    errors, clipped_count = [], 0
    for v, o, r in [(1.0, 0.5, 2.0), (0.0, 0.1, -1.0)]:
        v_clip = o + min(max(v - o, -eps), eps)
        errors.append(max((v - r) ** 2, (v_clip - r) ** 2))
        clipped_count += (v_clip - r) ** 2 > (v - r) ** 2
    loss, fraction = losses.value_loss(values, old, returns, mask, eps)
    assert loss.item() == pytest.approx(0.5 * sum(errors) / 2)
    assert fraction.item() == pytest.approx(clipped_count / 2) and clipped_count == 1


def test_kl_penalty_and_per_token_rewards():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kl = losses.kl_penalty(logprobs, ref, mask)
    assert kl.tolist() == [[0.5, -1.0, 0.0], [1.0, 0.0, -1.0]]
    rewards = losses.per_token_rewards(torch.tensor([2.0, -3.0]), kl, 0.1, mask)
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.1 + 2.0, 0.0])  # the score on the last real token
    assert rewards[1].tolist() == pytest.approx([-0.1, 0.0, 0.1 - 3.0])


def test_entropy_and_logprobs_from_logits():
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])
    assert losses.entropy_from_logits(logits)[0].tolist() == pytest.approx(
        [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2)])
    assert losses.logprobs_from_logits(logits, torch.tensor([[1, 0]]))[0].tolist() == pytest.approx(
        [math.log(0.75), math.log(0.5)])


def test_fixed_kl_controller_stays_put():
    controller = losses.FixedKLController(0.05)
    controller.update(100.0, 64)
    assert controller.value == 0.05


@pytest.mark.parametrize("kl, direction", [(12.0, 1), (3.0, -1), (6.0, 0)])
def test_adaptive_kl_controller_moves_toward_its_target(kl, direction):
    controller = losses.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    controller.update(kl, 512)
    error = min(max(kl / 6.0 - 1, -0.2), 0.2)
    assert controller.value == pytest.approx(0.2 * (1 + error * 512 / 10000))
    assert (controller.value > 0.2) - (controller.value < 0.2) == direction


def test_adaptive_kl_controller_state_round_trips():
    controller = losses.AdaptiveKLController(0.2, target=6.0, horizon=1000)
    for kl in (1.0, 20.0, 7.0):
        controller.update(kl, 64)
    restored = losses.AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(controller.state_dict())
    assert restored.state_dict() == controller.state_dict()
    controller.update(9.0, 64)
    restored.update(9.0, 64)
    assert restored.value == controller.value


def test_prompt_order_is_a_function_of_the_step_alone():
    n, batch = 10, 4
    stream = [i for step in range(10) for i in prompt_indices(n, step, batch, seed=3)]
    for epoch in range(4):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n)), "every epoch sees every prompt once"
    assert stream[:n] != stream[n:2 * n], "reshuffled every epoch"
    assert prompt_indices(n, 7, batch, seed=3) == stream[28:32], "step 7 alone gives what the run saw at step 7"
    two_processes = prompt_indices(n, 1, 2, seed=3, world=2, rank=0) + prompt_indices(n, 1, 2, seed=3, world=2, rank=1)
    assert two_processes == prompt_indices(n, 1, 4, seed=3), "processes split a step's prompts between them"
