"""Stage simpo: Simple Preference Optimisation (Meng et al. 2024) with TRL's CPOTrainer and loss_type simpo.

TRL 1.16 has no SimPO trainer of its own: SimPO is CPOTrainer's `loss_type: simpo`, and CPOTrainer is experimental
(trl.experimental.cpo: its API may change in any release; importing it prints TRL's warning saying so). SimPO is
reference-free: its implicit reward is `beta` times the response's mean (length-normalised) log-probability, and the
loss asks the chosen reward to beat the rejected one by the margin `simpo_gamma`; no reference model is loaded.
The stage sets loss_type simpo and cpo_alpha 0 (pure SimPO); cpo_alpha > 0 adds CPO's NLL term on the chosen
answers (CPO-SimPO), and loss_type alphapo is AlphaPO, SimPO with a reshaped reward. Data, held-out split, start,
LoRA or full fine-tuning and the evaluation afterwards are dpo's (stages/preference_opt.py). Other `trainer:` keys go
to CPOConfig (beta, simpo_gamma, ...).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import RunConfig
from pipeline.context import StageContext, StageResult
from pipeline.data import Split
from pipeline.errors import ConfigError
from stages import preference_data, preference_opt

NAME = "simpo"
DEFAULTS = {"loss_type": "simpo", "cpo_alpha": 0.0}
LOSSES = ("simpo", "alphapo")  # CPOConfig turns alphapo into simpo with its alpha; its other losses are not SimPO


def uses_model(config: RunConfig) -> bool:
    return True


def data_files(config: RunConfig) -> dict:
    return preference_opt.data_files(config, NAME)


def load(config: RunConfig, data_from: Path | None = None) -> Split:
    return preference_data.load_rows(config, NAME, data_from)


def check(config: RunConfig) -> str:
    preference_data.check_format(config, NAME)
    loss = config.simpo.trainer.get("loss_type", DEFAULTS["loss_type"])
    if loss not in LOSSES:
        raise ConfigError(f"simpo.trainer.loss_type is {loss!r}: the simpo stage trains SimPO ({' or '.join(LOSSES)}); "
                          "CPO's other losses (sigmoid, hinge, ipo) are not offered as a stage")
    return preference_opt.check(config, NAME, load, DEFAULTS)


def summarise(config: RunConfig, tokenizer) -> tuple[str, dict | None]:
    """validate's account of the data: the pairs and what the run's length filter leaves out, and a sample."""
    return preference_opt.summarise(config, NAME, tokenizer)


def run(ctx: StageContext) -> StageResult:
    from trl.experimental.cpo import CPOTrainer

    return preference_opt.run(ctx, CPOTrainer, load, preference_opt.pair_rows, reference=False, defaults=DEFAULTS)


def evaluate_saved(ctx: StageContext, result: StageResult) -> dict:
    return preference_opt.evaluate_saved(ctx, result)
