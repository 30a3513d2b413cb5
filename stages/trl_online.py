"""What grpo and rloo share: critic-free online RL that TRL trains (GRPOTrainer, RLOOTrainer), on ppo's prompts and
rewarded by ppo's reward builder (stages/online.py).

1. Prompts: `<stage>.data` ({"prompt"} or {"messages"} per line), read as ppo reads them; `eval`/`eval_split` hold
   some out.
2. The policy: the starting policy (sft's result, or init_from), its adapter merged into the weights at
   <stage>/base. With LoRA, TRL puts a fresh adapter on those weights, and the reference (when `beta` > 0) is the
   same weights with the adapter off: exactly the starting policy, with no second copy in memory. Under full
   fine-tuning every weight trains and TRL loads the reference, a frozen copy, from the same directory.
3. The reward: `<stage>.reward` through stages.online.build_reward (reward model, rule, or any AI judge, pointwise or
   pairwise), as TRL's reward function.
4. Training: each step TRL samples `num_generations` responses to each prompt of its batch, scores them and updates
   the policy on each response's reward against its group's (GRPO: mean and std; RLOO: the others' mean).
5. The reward on the held-out prompts before training (TRL's evaluation at step 0) and after it; per logged step, the
   reward, KL, entropy and response length (metrics.jsonl) and a table of responses with their scores (samples.jsonl).
6. The runner then compares the saved policy with the one it started from (evaluate_saved).

A killed stage resumes to what an uninterrupted run gives. TRL seeds torch once per process (set_seed(seed,
device_specific=True)) and samples from torch's global generator, whose state every checkpoint keeps and the
Trainer restores; the prompts' order is TRL's sampler's, which we seed per epoch (trainer_class); and a
checkpoint is only ever written where TRL samples a new batch (check_checkpoints_at_generations), since the responses
it sampled before a checkpoint are not in it. With `use_vllm`, vLLM samples with its own generator, which no
checkpoint holds: such a run resumes, but not to the same samples.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from pipeline.config import REGISTRY, RunConfig, SamplingConfig
from pipeline.context import StageContext, StageResult
from pipeline.distributed import is_main_process
from pipeline.errors import ConfigError, PipelineError
from pipeline.log import log
from stages import hf_trainer, lm
from stages.online import RewardFunction, build_reward, check_reward, load_prompts

SAMPLES_PER_TABLE = 16  # rows of samples.jsonl's table per logged step, as ppo's


def check(config: RunConfig, stage: str) -> str:
    """Everything that can be checked before any compute: the PEFT method, the prompts, the reward, the trainer keys,
    vLLM, and that every checkpoint can be resumed exactly."""
    if config.peft.method not in ("lora", "full"):
        raise ConfigError(f"{stage} with peft.method={config.peft.method}: the reference is the policy with its "
                          "adapter switched off, which needs lora (or full, with a frozen copy)")
    split = load_prompts(config, stage)
    train, held_out = split
    source = check_reward(config, stage)
    trainer = config.stage(stage).trainer
    check_vllm(stage, trainer)
    args = hf_trainer.trainer_args(REGISTRY[stage].trainer_config(), stage, trainer, config.seed, output_dir="unused")
    if args.reward_weights is not None and len(args.reward_weights) != 1:
        raise ConfigError(f"{stage}.trainer.reward_weights: the stage has one reward ({stage}.reward), so at most one "
                          f"weight, got {args.reward_weights}")
    world = config.distributed.world_size if config.distributed.enabled else 1
    check_checkpoints_at_generations(stage, trainer, args, world)
    groups = args.num_generations_eval or args.num_generations
    if held_out and (args.per_device_eval_batch_size * world) % groups:
        raise ConfigError(f"{stage}.trainer.per_device_eval_batch_size ({args.per_device_eval_batch_size} per process, "
                          f"{world} processes) must hold whole groups of {groups} responses to a held-out prompt")
    return (f"{len(train)} prompts ({len(held_out)} held out), {args.num_generations} responses each, "
            f"{source}{lm.dropped_note(split.dropped)}")


def check_vllm(stage: str, trainer: dict) -> None:
    """TRL's vLLM generation (use_vllm and the vllm_* keys) passes through where it can run: on a CUDA GPU with vllm
    installed. Elsewhere it is refused here, before any model loads."""
    vllm_keys = sorted(key for key in trainer if key.startswith("vllm_"))
    if not trainer.get("use_vllm"):
        if vllm_keys:
            raise ConfigError(f"{stage}.trainer.{vllm_keys[0]} is set but {stage}.trainer.use_vllm is not: TRL reads "
                              "the vllm_* options only when it generates with vLLM")
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{stage}.trainer.use_vllm: generating with vLLM needs a CUDA GPU, and this machine has "
                          f"none (torch.cuda.is_available() is False); remove {stage}.trainer.use_vllm to generate "
                          "with transformers")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{stage}.trainer.use_vllm: the vllm package is not installed (pip install vllm, a version "
                          f"your TRL supports), or remove {stage}.trainer.use_vllm to generate with transformers")


def check_checkpoints_at_generations(stage: str, trainer: dict, args, world: int) -> None:
    """TRL samples a batch of responses every steps_per_generation x num_iterations micro-batches and trains on it
    until the next; a checkpoint between two such samplings would resume without the responses sampled before it
    (they are in no checkpoint), so checkpoints must fall where TRL samples anew."""
    if str(args.save_strategy) not in ("steps", "SaveStrategy.STEPS"):
        return
    accumulation = args.gradient_accumulation_steps
    if trainer.get("steps_per_generation"):
        per_generation = trainer["steps_per_generation"]
    elif trainer.get("generation_batch_size"):  # as TRL's config resolves it, for this run's number of processes
        per_generation = trainer["generation_batch_size"] // (args.per_device_train_batch_size * world)
    else:
        per_generation = accumulation
    period = per_generation * args.num_iterations  # micro-batches from one sampling to the next
    every = period // math.gcd(period, accumulation)  # optimiser steps
    save_steps = args.save_steps if args.save_steps >= 1 else math.ceil(args.max_steps * args.save_steps)
    if save_steps % every:
        raise ConfigError(f"{stage}.trainer.save_steps ({save_steps}) must be a multiple of {every}: TRL samples new "
                          f"responses every {period} micro-batches (steps_per_generation x num_iterations), and a "
                          "checkpoint between two samplings could not be resumed exactly")


def trainer_class(trainer_cls, samples_file: Path):
    """`trainer_cls` with two additions.
    - Its prompt order is a function of the epoch. TRL's RepeatSampler draws every epoch's order from one generator
      seeded once, which a resumed run would start afresh (its epoch 2 would repeat epoch 1's order); seeding it with
      seed + epoch at the start of each epoch gives a resumed run the order an uninterrupted one has.
    - Each logged training step appends to `samples_file` a table of the responses it trained on last, with their
      scores and advantages, as ppo's samples.jsonl: a rising reward on one repeated answer is reward hacking."""

    class Trainer(trainer_cls):
        def _get_train_sampler(self, dataset=None):
            self._epoch_sampler = super()._get_train_sampler(dataset)
            return self._epoch_sampler

        def _run_epoch(self, *args, epoch, **kwargs):
            self._epoch_sampler.generator.manual_seed(self.args.seed + epoch)
            return super()._run_epoch(*args, epoch=epoch, **kwargs)

        def log(self, logs: dict, start_time=None) -> None:
            super().log(logs, start_time)
            if "loss" in logs and self.model.training and is_main_process() and self._logs["prompt"]:
                scores = next(iter(self._logs["rewards"].values()))  # the one reward function's, before any KL term
                rows = [{"prompt": prompt, "response": completion[-1]["content"].strip(), "score": float(score),
                         "advantage": float(advantage)}
                        for prompt, completion, score, advantage in zip(
                            self._logs["prompt"], self._logs["completion"], scores, self._logs["advantages"])]
                with open(samples_file, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"step": self.state.global_step, "samples": rows[:SAMPLES_PER_TABLE]},
                                            ensure_ascii=False) + "\n")

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


def trl_reward(reward_fn: RewardFunction, name: str):
    """Our reward, (prompt messages, response texts) -> scores, as a TRL reward function. TRL calls it with keywords:
    the prompts as message lists, each completion as [{"role": "assistant", "content": text}] decoded without
    special tokens, and more (completion_ids, trainer_state...). The text is stripped, as ppo hands it over."""

    def reward(prompts, completions, **kwargs) -> list[float]:
        return reward_fn(prompts, [completion[-1]["content"].strip() for completion in completions])

    reward.__name__ = name  # TRL logs rewards/<name>/mean
    return reward


def _setting(stage: str, trainer: dict, key: str):
    """A trainer key's value: the stage's own, else its TRL config's default."""
    return trainer.get(key, REGISTRY[stage].trainer_config().__dataclass_fields__[key].default)


def _policy(ctx: StageContext, tokenizer):
    """(the model TRL trains, the directory of its starting weights, the PEFT config TRL puts on it or None)."""
    from pipeline.models import load_causal_lm, peft_config_for

    base_dir = ctx.init.base
    if ctx.init.adapter is not None:
        merged, base_dir = hf_trainer.merge_start_adapter(ctx, tokenizer)
        del merged
    # Loaded from base_dir: under full fine-tuning TRL loads the reference from the policy's config._name_or_path,
    # which then names the starting weights. for_training: quantised (model.load_in_4bit/8bit) for TRL's adapter.
    return (load_causal_lm(base_dir, ctx.config.model, tokenizer, for_training=True), base_dir,
            peft_config_for(ctx.config.peft))


def _results(stage: str, held_out: bool):
    """after(trainer) for hf_trainer.fit: the logged training reward, first and last, the last KL, and the reward
    on the held-out prompts before (step 0) and after training."""

    def after(trainer) -> dict:
        history = trainer.state.log_history
        rewards = [entry["reward"] for entry in history if entry.get("reward") is not None]
        kl = [entry["kl"] for entry in history if entry.get("kl") is not None]
        metrics = {f"{stage}/reward_mean_first": rewards[0], f"{stage}/reward_mean": rewards[-1]} if rewards else {}
        if kl:
            metrics[f"{stage}/kl"] = kl[-1]
        if held_out:
            metrics.update(hf_trainer.evaluated_at_start(trainer, {"eval/score_mean_before": "eval_reward"}))
            metrics["eval/score_mean"] = hf_trainer.final_evaluation(trainer)["eval_reward"]
            log(f"{stage}: held-out reward {metrics.get('eval/score_mean_before', float('nan')):.3f} -> "
                f"{metrics['eval/score_mean']:.3f}")
        return metrics

    return after


def run(ctx: StageContext, trainer_cls) -> StageResult:
    from datasets import Dataset

    from pipeline.models import load_tokenizer
    from pipeline.render import prompt_ids

    split = load_prompts(ctx.config, ctx.name)
    prompts, held_out = split
    if not prompts:
        raise PipelineError(f"{ctx.name}: {ctx.name}.data.train holds no prompts to train on")
    trainer = ctx.section.trainer
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    max_new_tokens, batch_size = (_setting(ctx.name, trainer, key)
                                  for key in ("max_completion_length", "per_device_train_batch_size"))
    # A pairwise judge's reference responses are sampled as TRL samples (temperature, top_p, length); 64 tokens over
    # the longest prompt and response leave room for any chat template's closing tokens in the reward model's input.
    sampling = SamplingConfig(num_responses=1, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              temperature=_setting(ctx.name, trainer, "temperature"),
                              top_p=_setting(ctx.name, trainer, "top_p"))
    longest = max(len(prompt_ids(tokenizer, p)) for p in prompts + held_out)
    reward_fn = build_reward(ctx, prompts + held_out, sampling, max_length=longest + max_new_tokens + 64,
                             batch_size=batch_size)
    reward = ctx.section.reward
    # TRL logs rewards/<name>/mean: reward_model, rule, or the judge's way and type (pointwise_contrastive...).
    name = (f"{'pairwise' if reward.pairwise else 'pointwise'}_{reward.judge.type}" if reward.type == "judge"
            else reward.type)
    model, base_dir, peft_config = _policy(ctx, tokenizer)
    log(f"{ctx.name}: {len(prompts)} prompts ({len(held_out)} held out), "
        f"{_setting(ctx.name, trainer, 'num_generations')} responses each; reference = {ctx.init.description}")
    train_data = Dataset.from_list([{"prompt": p} for p in prompts])
    eval_data = Dataset.from_list([{"prompt": p} for p in held_out]) if held_out else None
    result = hf_trainer.fit(
        ctx, trainer_class(trainer_cls, ctx.stage_dir / "samples.jsonl"), model, tokenizer, base_dir, train_data,
        eval_data, trainer_evaluates=bool(held_out), after=_results(ctx.name, bool(held_out)),
        reward_funcs=trl_reward(reward_fn, name), peft_config=peft_config)
    result.metrics = {"data/train_prompts": len(prompts), "data/eval_prompts": len(held_out), **split.dropped,
                      **result.metrics}
    return result


def evaluate_saved(ctx: StageContext, result: StageResult) -> dict:
    """The saved policy against the one the stage started from, on evaluation.prompts."""
    from stages.evaluate import compare_saved

    return compare_saved(ctx, Path(result.manifest["base_model"]))
