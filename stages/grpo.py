"""Stage grpo: Group Relative Policy Optimisation (Shao et al. 2024) with TRL's GRPOTrainer.

Each step samples `trainer.num_generations` responses to every prompt of its batch (ppo's prompts, `grpo.data`),
rewards each one with `grpo.reward` (ppo's reward builder: a reward model, a rule, or any AI judge), and moves the
policy towards the responses that beat their group: the advantage is the reward minus the group's mean, over its
std (`scale_rewards`). No critic. With `trainer.beta` > 0 (TRL's default is 0) a per-token KL term holds the policy
to its start. `trainer:` keys go to GRPOConfig. What grpo and rloo share is stages/trl_online.py; final/ is the
LoRA adapter on stage.json's base_model (or, under full fine-tuning, the whole model).
"""

from __future__ import annotations

from pipeline.config import RunConfig
from pipeline.context import StageContext, StageResult
from stages import online, trl_online

NAME = "grpo"


def uses_model(config: RunConfig) -> bool:
    return True


def data_files(config: RunConfig) -> dict:
    return online.data_files(config, NAME)


def load(config: RunConfig) -> tuple[list[list[dict]], list[list[dict]]]:
    return online.load_prompts(config, NAME)


def check(config: RunConfig) -> str:
    return trl_online.check(config, NAME)


def run(ctx: StageContext) -> StageResult:
    from trl import GRPOTrainer

    return trl_online.run(ctx, GRPOTrainer)


def evaluate_saved(ctx: StageContext, result: StageResult) -> dict:
    return trl_online.evaluate_saved(ctx, result)
