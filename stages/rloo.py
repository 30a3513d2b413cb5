"""Stage rloo: REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024) with TRL's RLOOTrainer.

Each step samples `trainer.num_generations` (at least 2) responses to every prompt of its batch (ppo's prompts,
`rloo.data`), rewards each one with `rloo.reward` (ppo's reward builder: a reward model, a rule, or any AI judge)
less `trainer.beta` times its KL to the starting policy (TRL's default beta is 0.05), and moves the policy towards
the responses that beat the mean of the other responses to the same prompt. No critic. `trainer:` keys go to
RLOOConfig. What grpo and rloo share is stages/trl_online.py; final/ is the LoRA adapter on stage.json's base_model
(or, under full fine-tuning, the whole model).
"""

from __future__ import annotations

from pipeline.config import RunConfig
from pipeline.context import StageContext, StageResult
from stages import online, trl_online

NAME = "rloo"


def uses_model(config: RunConfig) -> bool:
    return True


def data_files(config: RunConfig) -> dict:
    return online.data_files(config, NAME)


def load(config: RunConfig) -> tuple[list[list[dict]], list[list[dict]]]:
    return online.load_prompts(config, NAME)


def check(config: RunConfig) -> str:
    return trl_online.check(config, NAME)


def run(ctx: StageContext) -> StageResult:
    from trl import RLOOTrainer

    return trl_online.run(ctx, RLOOTrainer)


def evaluate_saved(ctx: StageContext, result: StageResult) -> dict:
    return trl_online.evaluate_saved(ctx, result)
