"""The PPO loop (Ziegler et al. 2019; Ouyang et al. 2022), one iteration per step, each step numbered below.

Resume is exact: everything an iteration depends on is either restored from the checkpoint (what trains: adapters,
a fully trained actor or separate critic, the value head; optimiser, KL coefficient, step: accelerate's save_state
with `Progress` registered) or a function of the step alone (the prompts of step n, the sampling seed seed + n, the
mini-batch order), so a run killed and resumed ends with the same weights as one never interrupted.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import torch

from pipeline.artifacts import mark_complete
from pipeline.context import ModelSource, StageContext
from pipeline.distributed import gathered, is_main_process
from pipeline.errors import PipelineError
from pipeline.finite import check_step, check_weights
from pipeline.signals import Interrupted, stop_requested
from pipeline.signals import name as signal_name
from pipeline.log import log, track
from stages import hf_trainer
from stages.ppo import losses
from stages.ppo.model import (
    ActorCritic,
    build,
    register_checkpoint_hooks,
    save_critic,
    save_policy,
)
from stages.ppo.rollout import RewardFunction, Rollout, rollout, sample, score

SAMPLES_PER_TABLE = 16  # rows of the (prompt, response, reward) table written every sample_every steps


PROGRESS = "progress.json"  # in each checkpoint: Progress as JSON, never a pickle a resume would have to run


class Progress:
    """What the loop itself must carry across a resume: the steps done and the KL controller. Kept as JSON in the
    checkpoint rather than through accelerate's register_for_checkpointing, whose loader unpickles with
    weights_only=False: a resume never runs code from a checkpoint."""

    def __init__(self, kl_controller):
        self.step, self.kl_controller = 0, kl_controller

    def state_dict(self) -> dict:
        return {"step": self.step, "kl_controller": self.kl_controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.kl_controller.load_state_dict(state["kl_controller"])

    def load(self, checkpoint: Path) -> None:
        """From checkpoint/progress.json; a checkpoint written before it existed holds accelerate's pickle, read as
        plain data only (weights_only: a pickle that would run code is refused, not run)."""
        from pipeline.artifacts import read_json

        state = read_json(checkpoint / PROGRESS)
        if state is None:
            legacy = checkpoint / "custom_checkpoint_0.pkl"
            try:
                state = torch.load(legacy, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise PipelineError(f"{checkpoint} has no {PROGRESS}: it is not a complete ppo checkpoint") from None
            except pickle.UnpicklingError as exc:
                raise PipelineError(f"{legacy} holds more than plain data; it is not loaded "
                                    f"({' '.join(str(exc).split())[:200]})") from None
        self.load_state_dict(state)


def prompt_indices(n_prompts: int, step: int, batch_size: int, seed: int, world: int = 1, rank: int = 0) -> list[int]:
    """The prompts of iteration `step` on process `rank`. The prompts are walked in an order reshuffled every epoch
    (seeded by seed + epoch), so where the run is in the data follows from the step alone."""
    start = (step * world + rank) * batch_size
    return [_epoch_order(n_prompts, seed + pos // n_prompts)[pos % n_prompts] for pos in range(start, start + batch_size)]


@lru_cache(maxsize=4)
def _epoch_order(n_prompts: int, seed: int) -> list[int]:
    return torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed)).tolist()


def optimise(accelerator, module, optimizer, batch: Rollout, advantages, returns, cfg, generator,
             step: int = 0) -> dict:
    """num_ppo_epochs passes over the rollout in shuffled mini-batches; returns the mean of each statistic. A
    non-finite loss or gradient norm stops the stage before the optimiser applies it (NonFiniteError, naming
    iteration `step`). During the critic's warm-up (iterations up to critic_warmup_steps) the loss is the value
    loss alone: the actor's weights get no gradient, so the optimiser leaves them, and its moments for them, as
    they were."""
    train_actor = not cfg.critic_warmup_steps or step > cfg.critic_warmup_steps
    stats = defaultdict(list)
    length = batch.responses.shape[1]
    for _ in range(cfg.num_ppo_epochs):
        order = torch.randperm(len(batch.texts), generator=generator)
        for first in range(0, len(order), cfg.mini_batch_size):
            rows = order[first:first + cfg.mini_batch_size]
            mask = batch.mask[rows]
            logits, values = module(*batch.inputs(rows), length, "actor_critic")
            logits = logits / cfg.temperature
            logprobs = losses.logprobs_from_logits(logits, batch.responses[rows])
            policy = losses.policy_loss(logprobs, batch.logprobs[rows], advantages[rows], mask, cfg.cliprange)
            value_loss, value_clip = losses.value_loss(values, batch.values[rows], returns[rows], mask,
                                                       cfg.cliprange_value)
            loss = (policy.loss if train_actor else 0) + cfg.vf_coef * value_loss
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
            # After backward, so every process takes part in the gradients' all-reduce and then stops alike.
            check_step("ppo", step, loss.detach(), grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                entropy = losses.masked_mean(losses.entropy_from_logits(logits.float()), mask)
            for key, value in (("policy_loss", policy.loss), ("value_loss", value_loss), ("entropy", entropy),
                               ("clip_fraction", policy.clip_fraction), ("approx_kl", policy.approx_kl),
                               ("value_clip_fraction", value_clip)):
                stats[key].append(value.item())
    return {key: sum(values) / len(values) for key, values in stats.items()}


def setup(ctx: StageContext, base_dir: Path, tokenizer, critic: ModelSource | None):
    """(accelerator, prepared module, optimiser, progress), restored from ctx.resume_from when there is one."""
    from accelerate import Accelerator

    cfg = ctx.config.ppo.trainer
    module = build(ctx.config, base_dir, tokenizer, critic)
    optimizer = torch.optim.AdamW(module.trainable_parameters, lr=cfg.learning_rate)
    accelerator = Accelerator(deepspeed_plugin=_deepspeed(ctx, module))
    module, optimizer = accelerator.prepare(module, optimizer)
    register_checkpoint_hooks(accelerator, accelerator.unwrap_model(module))
    kl_controller = (losses.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                     else losses.FixedKLController(cfg.kl_coef))
    progress = Progress(kl_controller)
    if ctx.resume_from is not None:
        log(f"{ctx.name}: resuming from {ctx.resume_from}")
        accelerator.load_state(str(ctx.resume_from))
        progress.load(ctx.resume_from)
    if is_main_process():
        for name in ("metrics.jsonl", "samples.jsonl"):
            _drop_lines_after(ctx.stage_dir / name, progress.step)  # an earlier attempt's steps that are done again
    return accelerator, module, optimizer, progress


def train(ctx: StageContext, prompts: list, eval_prompts: list, tokenizer, base_dir: Path,
          reward_fn: RewardFunction, critic: ModelSource | None = None) -> dict:
    """`critic`: where a separate critic starts from (None: an adapter on the policy)."""
    config, cfg = ctx.config, ctx.config.ppo.trainer
    accelerator, module, optimizer, progress = setup(ctx, base_dir, tokenizer, critic)
    actor = accelerator.unwrap_model(module)  # sampling and saving use the plain module
    metrics = {}
    if ctx.resume_from is None and eval_prompts:
        ctx.record({"eval/score_mean_before": mean_score(actor, tokenizer, eval_prompts, reward_fn, cfg, config.seed)})
    log(f"{ctx.name}: {cfg.max_steps} iterations of {cfg.rollout_batch_size} prompts from {len(prompts)}; "
        f"reference = {ctx.init.description}; critic = {critic.description if critic else 'an adapter on it'}")
    generator = torch.Generator()
    world, rank = accelerator.num_processes, accelerator.process_index
    last = _last_record(ctx.stage_dir / "metrics.jsonl")
    for step in track(range(progress.step, cfg.max_steps), "ppo iterations"):
        started = time.perf_counter()
        seed = config.seed + step * world + rank
        generator.manual_seed(seed)
        kl_coef = progress.kl_controller.value
        # 1. Rollout: sample one response per prompt; measure it with the actor, the reference and the critic.
        rows = prompt_indices(len(prompts), step, cfg.rollout_batch_size, config.seed, world, rank)
        batch = rollout(actor, tokenizer, [prompts[i] for i in rows], cfg, seed)
        # 2. Score the decoded responses; a response cut off at max_new_tokens pays missing_eos_penalty.
        raw_scores, scores = score(batch, reward_fn, cfg.missing_eos_penalty)
        # 3. KL-penalised rewards: -kl_coef * (log pi - log pi_ref) per token, the score on the last token.
        kl = losses.kl_penalty(batch.logprobs, batch.ref_logprobs, batch.mask)
        rewards = losses.per_token_rewards(scores, kl, kl_coef, batch.mask)
        # 4. Advantages by GAE, whitened over the batch's tokens.
        advantages, returns = losses.gae(rewards, batch.values, batch.mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = losses.masked_whiten(advantages, batch.mask)
        # 5. num_ppo_epochs over shuffled mini-batches: clipped policy + clipped value loss, clip grads, step.
        train_stats = optimise(accelerator, module, optimizer, batch, advantages, returns, cfg, generator, step + 1)
        # An update can overflow the weights with every loss finite (a huge learning rate): never checkpoint those.
        parameters = dict(actor.named_parameters())
        check_weights(ctx.name, step + 1, ((name, parameters[name]) for name in actor.trainable_names))
        # 6. KL controller: move the coefficient toward the target KL (a fixed controller stays put).
        per_sample = accelerator.gather(torch.stack([
            rewards.sum(1), raw_scores, kl.sum(1), batch.mask.sum(1), (~batch.has_eos).float()]).T)
        progress.kl_controller.update(per_sample[:, 2].mean().item(), len(per_sample))
        progress.step = step + 1
        # 7. Metrics and sample tables (the main process writes what every process measured).
        last = {
            "ppo/reward_mean": per_sample[:, 0].mean().item(), "ppo/reward_std": per_sample[:, 0].std().item(),
            "ppo/score_mean": per_sample[:, 1].mean().item(), "ppo/kl": per_sample[:, 2].mean().item(),
            "ppo/kl_coef": kl_coef,
            **{f"ppo/{k}": accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item()
               for k, v in train_stats.items()},
            "ppo/response_length": per_sample[:, 3].mean().item(),
            "ppo/missing_eos_fraction": per_sample[:, 4].mean().item(),
            "ppo/tokens_per_s": per_sample[:, 3].sum().item() / (time.perf_counter() - started),
        }
        if is_main_process():
            _report(ctx, progress.step, last, batch, raw_scores, rewards.sum(1))
        # 8. Checkpoint: a complete one is the only kind a resume will ever pick.
        saved = progress.step % cfg.save_steps == 0 or progress.step == cfg.max_steps
        if saved:
            _checkpoint(accelerator, progress, ctx.checkpoints_dir / f"checkpoint-{progress.step}")
        # 9. A signal asked to stop (every process agrees): checkpoint this step if not done, stop interrupted.
        signum = stop_requested()
        if signum is not None:
            if not saved:
                _checkpoint(accelerator, progress, ctx.checkpoints_dir / f"checkpoint-{progress.step}")
            raise Interrupted(signum, f"{ctx.name} stopped for {signal_name(signum)} after step {progress.step}; "
                                      f"checkpoint-{progress.step} is complete: run the same command again to resume "
                                      "from it")

    if eval_prompts:
        metrics["eval/score_mean"] = mean_score(actor, tokenizer, eval_prompts, reward_fn, cfg, config.seed)
    with gathered(actor.trainable_parameters):
        if is_main_process():
            hf_trainer.save_atomic(lambda out: save_policy(actor, tokenizer, out), ctx.final_dir)
            hf_trainer.save_atomic(lambda out: save_critic(actor, tokenizer, out), ctx.stage_dir / "critic")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {**metrics, **{k: last[k] for k in ("ppo/reward_mean", "ppo/score_mean", "ppo/kl") if k in last},
            "train/steps": progress.step}


def _report(ctx: StageContext, step: int, metrics: dict, batch: Rollout, raw_scores, rewards) -> None:
    """metrics.jsonl (and the trackers) every logging_steps, a sample table every sample_every steps."""
    cfg = ctx.config.ppo.trainer
    if step == 1:
        ctx.record({"ppo/reward_mean_first": metrics["ppo/reward_mean"]})
    if step % cfg.logging_steps == 0 or step == cfg.max_steps:
        _append(ctx.stage_dir / "metrics.jsonl", {"step": step, **metrics})
        ctx.tracker.log(metrics, step)
        warmup = " (critic warm-up: the actor does not train)" if step <= cfg.critic_warmup_steps else ""
        log(f"{ctx.name} step {step}/{cfg.max_steps}: reward {metrics['ppo/reward_mean']:.3f} "
            f"kl {metrics['ppo/kl']:.3f} response length {metrics['ppo/response_length']:.1f}, value loss "
            f"{metrics['ppo/value_loss']:.3f}{warmup}", markup=False)
    if step % cfg.sample_every == 0 or step == cfg.max_steps:
        rows = [{"prompt": prompt, "response": text, "score": float(s), "reward": float(r)}
                for prompt, text, s, r in zip(batch.prompts, batch.texts, raw_scores, rewards)][:SAMPLES_PER_TABLE]
        _append(ctx.stage_dir / "samples.jsonl", {"step": step, "samples": rows})
        ctx.tracker.log_table("ppo/samples", ["prompt", "response", "score", "reward"],
                              [[r["prompt"][-1]["content"], r["response"], r["score"], r["reward"]] for r in rows], step)


@torch.no_grad()
def mean_score(module: ActorCritic, tokenizer, prompts: list, reward_fn: RewardFunction, cfg, seed: int) -> float:
    """Mean score of responses sampled (with a fixed seed, as in training) for the held-out prompts."""
    total = 0.0
    for first in track(range(0, len(prompts), cfg.rollout_batch_size), "scoring held-out prompts"):
        chunk = prompts[first:first + cfg.rollout_batch_size]
        total += sum(reward_fn(chunk, sample(module, tokenizer, chunk, cfg, seed + first)["texts"]))
    return total / len(prompts)


def _checkpoint(accelerator, progress: Progress, path: Path) -> None:
    """Save to a temporary name, rename, then write the COMPLETE marker: a kill at any point leaves either no
    checkpoint-N or a whole one."""
    from pipeline.artifacts import write_json_atomic

    staging = path.with_name(f".{path.name}.tmp")
    if is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if is_main_process():
            write_json_atomic(staging / PROGRESS, progress.state_dict())
    except BaseException:
        if is_main_process():  # a full disk: no half checkpoint holding the space (it has no name resume reads)
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if is_main_process():
        os.replace(staging, path)
        mark_complete(path, progress.step)
    accelerator.wait_for_everyone()


def _deepspeed(ctx: StageContext, module):
    """The DeepSpeed plugin for distributed.deepspeed: each mini-batch is one optimiser step, its gradients averaged
    over the processes; clipping is DeepSpeed's. None without DeepSpeed."""
    from pipeline.distributed import deepspeed_plugin

    cfg = ctx.config.ppo.trainer
    plugin = deepspeed_plugin(ctx.config.distributed, cfg.mini_batch_size, module.policy.config.hidden_size,
                              cfg.max_grad_norm)
    if plugin is not None:
        plugin.deepspeed_config["zero_allow_untested_optimizer"] = True  # torch's AdamW over adapters and value head
    return plugin


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


def _last_record(path: Path) -> dict:
    """The newest metrics record, so a run resumed after its last iteration still reports where it ended."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def _drop_lines_after(path: Path, step: int) -> None:
    """Keep the records of steps up to `step`: the ones after it are repeated by the resumed run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError):
            break  # a torn last line from the kill
    path.write_text("".join(kept), encoding="utf-8")
