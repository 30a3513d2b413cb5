"""Any AI judge as ppo's reward (`ppo.reward.type: judge`): online RLAIF.

- Pointwise: the judge's score of each response alone, for judges that score one response (contrastive,
  reward_model, rule): the contrastive judge's log-likelihood ratio is a reward in nats.
- Pairwise (`ppo.reward.pairwise: true`): the judge compares each response with the reference policy's response to
  the same prompt, and the reward is 2 p(win) - 1 in [-1, 1], where p(win) is the judge's confidence in its verdict
  for the policy (1 for a judge that gives no confidence; a tie is 0). Any AI judge can do this, the A/B-reading
  llm judge and an API judge too. The reference responses are sampled once, before training, from the starting
  policy (the reference PPO holds the actor to) with the rollouts' sampling settings: one per distinct prompt,
  seeded, and kept in reference_responses.jsonl batch by batch, so a resumed stage compares against the same ones.
"""

from __future__ import annotations

import json
from typing import Callable

from pipeline.config import SamplingConfig
from pipeline.context import StageContext
from pipeline.errors import PipelineError
from pipeline.log import log
from reward.pairs import Label, Pair

REFERENCE_FILE = "reference_responses.jsonl"


def judge_reward(ctx: StageContext, prompts: list[list[dict]]) -> Callable[[list, list], list[float]]:
    from reward.build import build_judge

    reward = ctx.config.ppo.reward
    judge = build_judge(reward.judge, ctx.config, ctx.run_dir)
    if not reward.pairwise:
        log(f"ppo: rewards are {judge.name}'s score of each response")
        return judge.score
    references = reference_responses(ctx, prompts)
    log(f"ppo: rewards are {judge.name}'s verdicts against the reference policy's responses "
        f"({len(references)} prompts, {ctx.stage_dir / REFERENCE_FILE})")
    return lambda batch, responses: pairwise_rewards(judge, references, batch, responses)


def prompt_key(prompt: list[dict]) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def reference_responses(ctx: StageContext, prompts: list[list[dict]]) -> dict[str, str]:
    """The starting policy's response to each distinct prompt, by prompt_key. (Its model is freed on return.)"""
    from pipeline.models import load_policy, load_tokenizer
    from stages.generate import sample_responses

    unique = list({prompt_key(prompt): prompt for prompt in prompts}.values())
    cfg = ctx.config.ppo.trainer
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    model = load_policy(ctx.init.base, ctx.init.adapter, ctx.config.model, tokenizer)
    sampling = SamplingConfig(num_responses=1, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p, batch_size=cfg.rollout_batch_size)
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    samples = sample_responses(model, tokenizer, unique, sampling, ctx.config.seed, ctx.stage_dir / REFERENCE_FILE)
    return {prompt_key(prompt): responses[0] for prompt, responses in zip(unique, samples.responses)}


def win_reward(label: Label) -> float:
    """2 p(win) - 1 for response_a (the policy's): +1 a sure win, -1 a sure loss, 0 a tie or a coin flip."""
    if label.winner == "tie":
        return 0.0
    confidence = 1.0 if label.confidence is None else label.confidence
    p_win = confidence if label.winner == "a" else 1 - confidence
    return 2 * p_win - 1


def pairwise_rewards(judge, references: dict[str, str], prompts: list[list[dict]],
                     responses: list[str]) -> list[float]:
    """The judge's verdict on each (policy response, reference response) pair, as win_reward. The policy's
    response is always response_a: the judges that read positions see both orders and remove the bias."""
    pairs = [Pair.create(prompt, response, references[prompt_key(prompt)], "ppo rollout")
             for prompt, response in zip(prompts, responses)]
    labels = {label.pair_id: label for label in judge.judge(pairs)}
    missing = [pair for pair in pairs if pair.id not in labels]
    if missing:
        raise PipelineError(f"ppo: the judge {judge.name} left {len(missing)} of {len(pairs)} responses unjudged "
                            "(a conversation over its max_length?); raise ppo.reward.judge.max_length")
    return [win_reward(labels[pair.id]) for pair in pairs]
