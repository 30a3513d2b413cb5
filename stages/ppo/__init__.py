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

The reward is `ppo.reward`: a reward model (the rm stage of this run, or a directory) scored on exactly the text
the rm stage trained on, a rule, a Python function (prompt messages, response text) -> float, or any AI judge
(online RLAIF, reward.py): its score of the response alone, or its verdict against the reference policy's response.

Layout: final/ (the actor adapter, loads with PeftModel.from_pretrained on stage.json's base_model; under full
fine-tuning the whole model, AutoModelForCausalLM.from_pretrained), critic/ (+ value_head.safetensors: the shared
critic's adapter on base_model, or a separate critic as a whole model, AutoModel.from_pretrained), base/ (the merged
starting weights, when the start was an adapter), checkpoints/, metrics.jsonl, samples.jsonl. stage.json's
critic_init records where the critic started.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import REGISTRY, RunConfig
from pipeline.context import StageContext, StageResult
from pipeline.data import Split
from pipeline.errors import ConfigError, PipelineError
from pipeline.log import log

NAME = "ppo"


def uses_model(config: RunConfig) -> bool:
    return True


def data_files(config: RunConfig) -> dict:
    data = config.ppo.data
    return {key: getattr(data, key) for key in ("train", "eval") if getattr(data, key)}


def load(config: RunConfig) -> Split:
    """(training prompts, held-out prompts) as message lists ending with the user's turn."""
    from pipeline.records import BadRows
    from pipeline.sources import read_all
    from reward.importers import load_prompts
    from stages.lm import config_key, split_eval

    data = config.ppo.data
    bad = BadRows()

    def read(key: str) -> list[list[dict]]:
        with config_key(f"{NAME}.data"):
            return read_all(getattr(data, key), f"{NAME}.data.{key}", lambda source: [
                messages for messages, _ in load_prompts(source, data.columns, bad)], config.seed)

    train, held_out = (read("train"), read("eval")) if data.eval else \
        split_eval(read("train"), data.eval_split, config.seed)
    return Split(train, held_out, {"data/dropped_bad_rows": bad.settle(data.bad_rows, f"{NAME}.data")})


def summarise(config: RunConfig, tokenizer) -> tuple[str, None]:
    """validate's account of the prompts: ppo keeps every prompt; its sequences are the prompt and up to
    max_new_tokens of response."""
    from pipeline.render import prompt_ids
    from stages.lm import dropped_note

    summary = check(config)
    split = load(config)
    longest = max((len(prompt_ids(tokenizer, p)) for p in split.train + split.held_out), default=0)
    return (f"{summary}; longest prompt {longest} tokens, + up to {config.ppo.trainer.max_new_tokens} response "
            f"tokens{dropped_note(split.dropped)}"), None


def check(config: RunConfig) -> str:
    from reward.judges import load_callable
    from stages.ppo.model import check_critic, actor_peft_config

    actor_peft_config(config)
    check_critic(config)
    train, held_out = load(config)
    reward = config.ppo.reward
    if reward.type == "rule":
        load_callable(reward.function)
    elif reward.type == "judge":
        if reward.judge.type == "rule":
            load_callable(reward.judge.function)
        if reward.judge.type == "api":
            from reward.build import build_judge

            build_judge(reward.judge, config, Path("."))  # fails now if the key's variable is unset
    elif reward.model in REGISTRY and REGISTRY[reward.model].output != "reward_model":
        raise ConfigError(f"ppo.reward.model '{reward.model}': of this run's stages only rm makes a reward model")
    elif reward.model != "rm" and not any((Path(reward.model) / name).exists()
                                          for name in ("config.json", "adapter_config.json")):
        raise ConfigError(f"ppo.reward.model '{reward.model}' is neither rm (this run's rm stage) nor a reward "
                          "model or adapter directory")
    source = {"rule": reward.function, "judge": f"{'pairwise' if reward.pairwise else 'pointwise'} "
                                               f"{reward.judge.type}"}.get(reward.type, reward.model)
    return f"{len(train)} prompts ({len(held_out)} held out), reward from {reward.type} {source}"


def reward_function(ctx: StageContext, prompt_tokens: int, prompts: list[list[dict]]):
    """(prompt messages, responses) -> scores, from ppo.reward. `prompt_tokens`, the longest prompt, sizes the
    reward model's length limit so that no rollout is ever too long to score; `prompts` are every prompt the stage
    will score responses to (a pairwise judge's reference responses are sampled for them)."""
    reward = ctx.config.ppo.reward
    if reward.type == "judge":
        from stages.ppo.reward import judge_reward

        return judge_reward(ctx, prompts)
    if reward.type == "rule":
        from reward.judges import load_callable

        rule = load_callable(reward.function)
        return lambda prompts, responses: [float(rule(p, r)) for p, r in zip(prompts, responses)]
    from pipeline.artifacts import completed, read_manifest
    from pipeline.context import ModelSource
    from reward.rm_judge import RewardModelJudge

    if reward.model == "rm" and not completed(read_manifest(ctx.run_dir / "rm")):
        raise PipelineError(f"ppo.reward.model is rm, but the rm stage has not completed in {ctx.run_dir}: run it "
                            "first (--stage rm), or point ppo.reward.model at a reward model directory")
    source = ModelSource.named(reward.model, ctx.run_dir)
    log(f"{NAME}: rewards from {source.description}")
    cfg = ctx.config.ppo.trainer
    # The template's closing tokens are a handful; 64 leaves room for any chat template's.
    judge = RewardModelJudge.from_path(source.base, ctx.config.model, adapter=source.adapter,
                                       batch_size=cfg.mini_batch_size,
                                       max_length=prompt_tokens + cfg.max_new_tokens + 64)
    return judge.score


def run(ctx: StageContext) -> StageResult:
    from pipeline.models import load_tokenizer
    from pipeline.render import prompt_ids
    from stages import hf_trainer
    from stages.ppo.model import check_vocabulary, critic_source
    from stages.ppo.trainer import train

    split = load(ctx.config)
    prompts, eval_prompts = split
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    if ctx.config.ppo.critic is not None:  # a stage's result is known only now; refused before any model loads
        check_vocabulary(ctx.config, critic_source(ctx.config, ctx.run_dir, None), tokenizer)
    longest = max(len(prompt_ids(tokenizer, p)) for p in prompts + eval_prompts)
    reward_fn = reward_function(ctx, longest, prompts + eval_prompts)
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
