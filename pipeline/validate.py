"""`validate`: everything a run would check, short of training, with a report a user can act on."""

from __future__ import annotations

from pipeline.config import REGISTRY, RunConfig
from pipeline.errors import ConfigError
from pipeline.log import console, log
from pipeline.models import load_tokenizer, peft_config_for, resolve_model_path
from pipeline.render import show_sample
from stages import STAGES
from stages.hf_trainer import max_length


def check_peft_targets(config: RunConfig) -> str:
    """Confirm the PEFT target modules exist in the model, without loading its weights (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    peft_config = peft_config_for(config.peft)
    if peft_config is None:
        return "full fine-tuning: every parameter trains"
    targets = getattr(peft_config, "target_modules", None)
    if not targets or isinstance(targets, str):
        return f"{config.peft.method}: target modules {targets or 'chosen by PEFT for this architecture'}"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(config.model.name_or_path)))
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
    log(f"model: {config.model.name_or_path}; pad={tokenizer.pad_token!r} eos={tokenizer.eos_token!r}; "
        f"chat template: {'yes' if tokenizer.chat_template else 'none'}")
    log(f"peft: {check_peft_targets(config)}")
    for name in names:
        stage = STAGES[name]
        if not REGISTRY[name].starts_later_stages:  # the language-model stages render a sample; the others summarise
            log(f"[bold]{name}[/bold]: {stage.check(config)}")
            continue
        train, held_out = stage.load(config)
        limit = max_length(name, config.stage(name).trainer)
        train_tok, eval_tok = stage.tokenize(config, tokenizer, train, held_out, limit)
        dropped = train_tok.dropped_too_long + eval_tok.dropped_too_long
        log(f"[bold]{name}[/bold]: {len(train)} train / {len(held_out)} eval records -> "
            f"{len(train_tok.rows)} / {len(eval_tok.rows)} sequences; longest {train_tok.longest} tokens; "
            f"{dropped} over max_length={limit}" + (" (these would be left out)" if dropped else ""))
        if train_tok.rows:
            log("one rendered sample, loss-carrying text in ⟦ ⟧:")
            console.print(show_sample(tokenizer, train_tok.rows[0]), markup=False, highlight=False)
    log("[green]valid[/green]")
    return 0
