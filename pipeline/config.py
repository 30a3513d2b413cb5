"""One YAML schema for a whole run, validated before any compute is spent.

A run config has shared sections (`model`, `peft`, `tracking`) and one section per stage. Our own keys are the
dataclass fields below, each with a one-line docstring; a stage's `trainer:` mapping is handed untouched to the TRL
config dataclass of that stage (SFTConfig, ...), so every TRL option works without being declared here. Unknown
keys and wrong types are errors that name the key and suggest the closest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

STAGE_ORDER = ("cpt", "sft")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
PEFT_METHODS = ("lora", "prefix", "prompt", "p_tuning", "ia3", "full")


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"
    """A local Hugging Face model directory, or a built-in name (see `pipeline.models.BUILTIN_MODELS`)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    chat_template: str | None = None
    """A Jinja chat template that replaces the tokenizer's own (needed for base models that have none)."""


@dataclass
class PeftConfig:
    method: str = "lora"
    """lora, prefix, prompt, p_tuning, ia3 or full (no adapter: every weight trains)."""
    options: dict = field(default_factory=dict)
    """Passed to the method's PEFT config class (LoraConfig: r, lora_alpha, lora_dropout, target_modules...)."""


@dataclass
class TrackingConfig:
    report_to: list = field(default_factory=list)
    """Any of wandb, tensorboard. W&B honours WANDB_MODE (offline works) and groups a run's stages."""
    project: str = "alignment-pipeline"
    """W&B project name."""


@dataclass
class DataConfig:
    train: str = ""
    """Training file (.jsonl, .json, or .txt)."""
    eval: str | None = None
    """Held-out file; when absent, `eval_split` of the training records are held out instead."""
    eval_split: float = 0.1
    """Fraction of training records held out for evaluation when no `eval` file is given (0 disables eval)."""
    format: str = "auto"
    """text (cpt), or for sft: delimited, alpaca, sharegpt, messages, auto (detected from the first record)."""
    columns: dict = field(default_factory=dict)
    """Maps our field names to the file's, e.g. {instruction: question, output: answer}."""
    delimiters: dict = field(default_factory=dict)
    """For the delimited format: start, sep, eos strings (defaults <start>, <sep>, <eos>)."""


@dataclass
class StageConfig:
    enabled: bool = True
    """Whether `run` without --stage runs this stage."""
    init_from: str = "auto"
    """auto (the previous completed stage, else the base model), base, a stage name, or a model/adapter path."""
    data: DataConfig = field(default_factory=DataConfig)
    """The stage's dataset."""
    trainer: dict = field(default_factory=dict)
    """Passed to the TRL config dataclass (SFTConfig for cpt and sft): learning_rate, max_steps, save_steps..."""


@dataclass
class RunConfig:
    seed: int = 42
    """Seeds data splits, model init and the trainers (unless a stage's trainer.seed says otherwise)."""
    run_dir: str | None = None
    """Where the run's artifacts go; default runs/<config file name>. The CLI's --run-dir wins."""
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cpt: StageConfig = field(default_factory=lambda: StageConfig(enabled=False))
    sft: StageConfig = field(default_factory=StageConfig)

    source: str = field(default="<defaults>", metadata={"internal": True})

    def stage(self, name: str) -> StageConfig:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply `KEY=VALUE` overrides (dotted keys, YAML values) and validate it."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, found {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    config = _build(RunConfig, raw, prefix="", source=str(path))
    config.source = str(path)
    _check_values(config)
    return config


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. sft.trainer.learning_rate=1e-4), got '{item}'")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
    node[leaf] = parse_yaml(value) if value else ""


def _build(cls, raw: Any, prefix: str, source: str):
    """Turn a mapping into dataclass `cls`, checking every key and type; errors name the dotted key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {_kind(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{suggest(key, fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, f"{prefix}{key}.", source)
        else:
            values[key] = _check_type(value, hint, f"{prefix}{key}", source)
    if cls is StageConfig and "enabled" not in raw:
        values["enabled"] = True  # writing a stage section into the config is how a user turns it on
    return cls(**values)


def _check_type(value: Any, hint: Any, key: str, source: str) -> Any:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        base = typing.get_origin(kind) or kind
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if base is list and isinstance(value, str):
            return [value]  # report_to: wandb reads as naturally as [wandb]
        if isinstance(value, base) and not (base is int and isinstance(value, bool)):
            return copy.deepcopy(value)
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"{source}: '{key}' must be {names}, got {_kind(value)} {value!r}")


def _check_values(config: RunConfig) -> None:
    if config.peft.method not in PEFT_METHODS:
        raise ConfigError(
            f"{config.source}: peft.method '{config.peft.method}' is not one of {', '.join(PEFT_METHODS)}"
            f"{suggest(config.peft.method, PEFT_METHODS)}"
        )
    for target in config.tracking.report_to:
        if target not in ("wandb", "tensorboard"):
            raise ConfigError(f"{config.source}: tracking.report_to: '{target}' is not wandb or tensorboard")
    for name in STAGE_ORDER:
        stage = config.stage(name)
        if stage.enabled and not stage.data.train:
            raise ConfigError(f"{config.source}: {name}.data.train is required when the {name} stage is enabled")
        for key in stage.data.delimiters:
            if key not in ("start", "sep", "eos"):
                raise ConfigError(f"{config.source}: unknown key '{name}.data.delimiters.{key}'"
                                  f"{suggest(key, ('start', 'sep', 'eos'))}")
        if not 0 <= stage.data.eval_split < 1:
            raise ConfigError(f"{config.source}: {name}.data.eval_split must be in [0, 1), got {stage.data.eval_split}")


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(choices))})"


def _kind(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else type(value).__name__
