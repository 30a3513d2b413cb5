"""Stage dpo: Direct Preference Optimisation with TRL's DPOTrainer on chosen/rejected pairs.

The data is the preferences stage's output (or `dpo.data.train`, any preference file reward.importers reads), held
out by prompt as in rm. The policy starts from sft's result merged into the weights (saved at <stage>/base), and,
with LoRA, trains a fresh adapter on it: the reference policy is then that same base with the adapter switched
off — exactly the sft policy, with no second copy of the model in memory. `trainer:` keys go to DPOConfig (beta,
loss_type, ...). Reported: TRL's reward accuracies and margins (implicit rewards beta * log pi/pi_ref) on the
held-out pairs before and after training. The steps it shares with kto, orpo and simpo are in
stages/preference_opt.py.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import RunConfig
from pipeline.context import StageContext, StageResult
from pipeline.data import Split
from pipeline.errors import ConfigError
from stages import preference_data, preference_opt

NAME = "dpo"


def uses_model(config: RunConfig) -> bool:
    return True


def data_files(config: RunConfig) -> dict:
    return preference_opt.data_files(config, NAME)


def load(config: RunConfig, data_from: Path | None = None) -> Split:
    return preference_data.load_rows(config, NAME, data_from)


def check(config: RunConfig) -> str:
    if config.peft.method not in ("lora", "full"):
        raise ConfigError(f"dpo with peft.method={config.peft.method}: the reference is the policy with its adapter "
                          "switched off, which needs lora (or full, with a frozen copy): set peft.method to lora or "
                          "full")
    preference_data.check_format(config, NAME)
    return preference_opt.check(config, NAME, load)


def summarise(config: RunConfig, tokenizer) -> tuple[str, dict | None]:
    """validate's account of the data: the pairs and what the run's length filter leaves out, and a sample."""
    return preference_opt.summarise(config, NAME, tokenizer)


def run(ctx: StageContext) -> StageResult:
    from trl import DPOTrainer

    return preference_opt.run(ctx, DPOTrainer, load, preference_opt.pair_rows, reference=True)


def evaluate_saved(ctx: StageContext, result: StageResult) -> dict:
    return preference_opt.evaluate_saved(ctx, result)
