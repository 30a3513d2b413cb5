"""The stages' work, one module each, named and ordered as pipeline.config.REGISTRY describes them. Each module has
the same shape:

    check(config) -> str              validate its data and options without compute; a one-line summary
    data_files(config) -> {key: source} the data it reads (pipeline.sources), hashed to decide whether it must run again
    uses_model(config) -> bool         whether it starts from a model (init_from), so the runner wires one in
    run(ctx: StageContext) -> StageResult  do the work, write ctx.final_dir, return metrics and manifest fields

and, where the stage's result is evaluated once saved, evaluate_saved(ctx, result) -> metrics, which the runner
calls in its own process (sft answers held-out prompts; dpo, kto, orpo, simpo and ppo are compared with their
starting policy).
cpt and sft also expose load/tokenize, which `validate` uses to show a rendered sample.
"""

from importlib import import_module

from pipeline.config import REGISTRY

STAGES = {name: import_module(f"stages.{name}") for name in REGISTRY}
