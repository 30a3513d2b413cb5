"""`validate`: everything a run would check, short of training, with a report a user can act on."""

from __future__ import annotations

from rich.markup import escape

from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.log import console, log
from pipeline.models import load_tokenizer, model_path, peft_config_for
from pipeline.render import show_sample, system_prompt_note
from stages import STAGES


def check_peft_targets(config: RunConfig, names: list[str]) -> str:
    """Confirm the PEFT target modules exist in the model, without loading its weights (meta device): the causal
    LM the chat stages train, or the classifier cls trains when it runs alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline.config import REGISTRY

    peft_config = peft_config_for(config.peft)
    if peft_config is None:
        return "full fine-tuning: every parameter trains"
    targets = getattr(peft_config, "target_modules", None)
    if not targets or isinstance(targets, str):
        return f"{config.peft.method}: target modules {targets or 'chosen by PEFT for this architecture'}"
    trust = config.model.trust_remote_code
    model_config = AutoConfig.from_pretrained(model_path(config.model), trust_remote_code=trust)
    classifier = all(REGISTRY[name].model_kind == "classifier" for name in names)
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if classifier else AutoModelForCausalLM).from_config(
            model_config, trust_remote_code=trust)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets) - names)
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"peft.options.target_modules {missing} are not modules of this model; "
                          f"its linear layers are {', '.join(linear)} (or use 'all-linear')")
    return f"{config.peft.method}: target modules {sorted(targets)} found"


def validate(runner, names: list[str]) -> int:
    """`runner`: the pipeline.runner.Runner `run` would use, whose preflight this is."""
    config = runner.config
    runner.preflight(names)
    tokenizer = load_tokenizer(config.model)
    log(escape(f"model: {config.model.name_or_path}; pad={tokenizer.pad_token!r} eos={tokenizer.eos_token!r}; "
               f"chat template: {'yes' if tokenizer.chat_template else 'none'}"))
    if tokenizer.chat_template:
        log(escape(f"system prompt: {system_prompt_note(config.model, tokenizer)}"))
    log(f"peft: {check_peft_targets(config, names)}")
    for name in names:
        stage = STAGES[name]
        summarise = getattr(stage, "summarise", None)
        if summarise is None:  # no data of its own to measure (preferences)
            log(f"[bold]{name}[/bold]: {escape(stage.check(config))}")
            continue
        text, sample = summarise(config, tokenizer)
        log(f"[bold]{name}[/bold]: {escape(text)}")
        if sample is not None:
            log("one rendered sample, loss-carrying text in ⟦ ⟧:")
            console.print(show_sample(tokenizer, sample), markup=False, highlight=False)
    log("[green]valid[/green]")
    return 0
