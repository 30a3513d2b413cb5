"""Stage ppo: the policy learns from a reward with PPO, held near where it started by a per-token KL penalty.

TRL has no PPO trainer any more, so this one is ours, in four small modules:
- losses.py:  the mathematics (GAE, whitening, clipped policy and value losses, KL penalty and controllers);
- model.py:   actor, critic and reference. By default on ONE copy of the weights: the starting policy (base + sft
              adapter) is merged and saved at <stage>/base; on it sit an "actor" LoRA adapter, a "critic" LoRA
              adapter with a value head, and the reference is the same base with the adapters off. `ppo.critic`
              makes the critic a separate model; `peft.method: full` trains every actor weight against a frozen
              reference copy, with a separate critic;
- rollout.py: batched sampling with the KV cache, then the log-probabilities, reference log-probabilities and values;
- trainer.py: the loop (steps numbered in comments), checkpoints that resume exactly, metrics and sample tables.

The reward is `ppo.reward`, built by stages/online.py as for every stage that learns online: a reward model (the rm
stage of this run, or a directory), a rule, or any AI judge (online RLAIF): its score of the response alone, or its
verdict against the reference policy's response.

Layout: final/ (the actor adapter, loads with PeftModel.from_pretrained on stage.json's base_model; under full
fine-tuning the whole model, AutoModelForCausalLM.from_pretrained), critic/ (+ value_head.safetensors: the shared
critic's adapter on base_model, or a separate critic as a whole model, AutoModel.from_pretrained), base/ (the merged
starting weights, when the start was an adapter), checkpoints/, metrics.jsonl, samples.jsonl. stage.json's
critic_init records where the critic started.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import RunConfig
from pipeline.context import StageContext, StageResult
from pipeline.data import Split

NAME = "ppo"


def uses_model(config: RunConfig) -> bool:
    return True


def data_files(config: RunConfig) -> dict:
    from stages.online import data_files

    return data_files(config, NAME)


def load(config: RunConfig) -> Split:
    """(training prompts, held-out prompts) as message lists ending with the user's turn."""
    from stages.online import load_prompts

    return load_prompts(config, NAME)


def summarise(config: RunConfig, tokenizer) -> tuple[str, None]:
    """validate's account of the prompts: ppo keeps every prompt; its sequences are the prompt and up to
    max_new_tokens of response."""
    from stages.online import summarise_prompts

    return summarise_prompts(config, NAME, tokenizer, check(config), config.ppo.trainer.max_new_tokens), None


def check(config: RunConfig) -> str:
    from stages.online import check_reward
    from stages.ppo.model import check_critic, actor_peft_config

    actor_peft_config(config)
    check_critic(config)
    train, held_out = load(config)
    return f"{len(train)} prompts ({len(held_out)} held out), {check_reward(config, NAME)}"


def run(ctx: StageContext) -> StageResult:
    from pipeline.config import SamplingConfig
    from pipeline.models import load_tokenizer
    from pipeline.render import prompt_ids
    from stages import hf_trainer
    from stages.online import build_reward
    from stages.ppo.model import check_vocabulary, critic_source
    from stages.ppo.trainer import train

    split = load(ctx.config)
    prompts, eval_prompts = split
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    if ctx.config.ppo.critic is not None:  # a stage's result is known only now; refused before any model loads
        check_vocabulary(ctx.config, critic_source(ctx.config, ctx.run_dir, None), tokenizer)
    cfg = ctx.config.ppo.trainer
    longest = max(len(prompt_ids(tokenizer, p)) for p in prompts + eval_prompts)
    # The pairwise judge's reference responses are sampled as the rollouts are; the template's closing tokens are a
    # handful, so 64 tokens over the longest rollout leave room for any chat template's.
    sampling = SamplingConfig(num_responses=1, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p, batch_size=cfg.rollout_batch_size)
    reward_fn = build_reward(ctx, prompts + eval_prompts, sampling, max_length=longest + cfg.max_new_tokens + 64,
                             batch_size=cfg.mini_batch_size)
    base_dir = ctx.init.base
    if ctx.init.adapter is not None:
        # The reference is the base with the adapters off (or a copy of it), so the starting policy must be in the
        # base weights.
        merged, base_dir = hf_trainer.merge_start_adapter(ctx, tokenizer)
        del merged
    critic = critic_source(ctx.config, ctx.run_dir, base_dir)
    metrics = {"data/train_prompts": len(prompts), "data/eval_prompts": len(eval_prompts), **split.dropped,
               **train(ctx, prompts, eval_prompts, tokenizer, base_dir, reward_fn, critic)}
    # base_model: the weights final/ (as an adapter) applies to, for the stages after this one.
    return StageResult(metrics, {"base_model": str(base_dir), "critic_init": critic.to_dict() if critic else None})


def evaluate_saved(ctx: StageContext, result: StageResult) -> dict:
    """The saved policy against the one ppo started from, on evaluation.prompts."""
    from stages.evaluate import compare_saved

    return compare_saved(ctx, Path(result.manifest["base_model"]))
