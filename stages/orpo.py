"""Stage orpo: Odds Ratio Preference Optimisation (Hong et al. 2024) with TRL's ORPOTrainer on chosen/rejected pairs.

ORPOTrainer is experimental in TRL 1.16 (trl.experimental.orpo: its API may change in any release; importing it
prints TRL's warning saying so). ORPO is reference-free: its loss is the chosen answers' NLL plus `beta` times a
log odds-ratio term that pushes the chosen answer's odds above the rejected one's, so no reference model is loaded.
Data, held-out split, start (sft's result, merged), LoRA or full fine-tuning and the evaluation afterwards are
dpo's (stages/preference_opt.py). `trainer:` keys go to ORPOConfig (beta is ORPO's lambda, default 0.1).
Reported: the held-out reward accuracy and margin (rewards beta * mean log-probability) before and after.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import RunConfig
from pipeline.context import StageContext, StageResult
from pipeline.data import Split
from stages import preference_data, preference_opt

NAME = "orpo"


def uses_model(config: RunConfig) -> bool:
    return True


def data_files(config: RunConfig) -> dict:
    return preference_opt.data_files(config, NAME)


def load(config: RunConfig, data_from: Path | None = None) -> Split:
    return preference_data.load_rows(config, NAME, data_from)


def check(config: RunConfig) -> str:
    preference_data.check_format(config, NAME)
    return preference_opt.check(config, NAME, load)


def summarise(config: RunConfig, tokenizer) -> tuple[str, dict | None]:
    """validate's account of the data: the pairs and what the run's length filter leaves out, and a sample."""
    return preference_opt.summarise(config, NAME, tokenizer)


def run(ctx: StageContext) -> StageResult:
    from trl.experimental.orpo import ORPOTrainer

    return preference_opt.run(ctx, ORPOTrainer, load, preference_opt.pair_rows, reference=False)


def evaluate_saved(ctx: StageContext, result: StageResult) -> dict:
    return preference_opt.evaluate_saved(ctx, result)
