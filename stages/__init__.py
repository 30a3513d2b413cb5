"""The stages' work, one module each, named and ordered as pipeline.config.REGISTRY describes them. Each module has
the same shape:

    check(config) -> str              validate its data and options without compute; a one-line summary
    data_files(config) -> {key: path} the files it reads, hashed to decide whether it must run again
    uses_model(config) -> bool         whether it starts from a model (init_from), so the runner wires one in
    run(ctx: StageContext) -> metrics  do the work and write ctx.final_dir

cpt and sft also expose load/tokenize, which `validate` uses to show a rendered sample.
"""

from importlib import import_module

from pipeline.config import REGISTRY

STAGES = {name: import_module(f"stages.{name}") for name in REGISTRY}
