"""Chosen/rejected rows for the stages that train on preferences (rm, dpo, kto, orpo, simpo): from the preferences
stage's output or the stage's own `data.train` file, with a held-out split by prompt."""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from reward.importers import FORMATS
from reward.pairs import PreferenceRow


def check_format(config: RunConfig, stage: str) -> None:
    fmt = config.stage(stage).data.format
    if fmt not in FORMATS:
        raise ConfigError(f"{stage}.data.format '{fmt}' is not one of {', '.join(FORMATS)} (preference formats)")


def prompt_key(row: PreferenceRow) -> str:
    """One prompt's identity across files: its messages, serialised the same way whatever their key order."""
    return json.dumps(row.prompt, sort_keys=True)


def split_by_prompt(rows: list[PreferenceRow], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded fraction of the prompts with all their pairs (pairs of one prompt share most tokens, so
    splitting pairs would test on prompts the model trained on)."""
    keyed = [(prompt_key(row), row) for row in rows]
    keys = sorted({key for key, _ in keyed})
    if fraction <= 0 or len(keys) < 2:
        return rows, []
    random.Random(seed).shuffle(keys)
    held = set(keys[: max(1, round(len(keys) * fraction))])
    return [row for key, row in keyed if key not in held], [row for key, row in keyed if key in held]


def stage_output(data_from: Path) -> list[PreferenceRow]:
    """The chosen/rejected rows the preferences stage wrote into its final/ directory `data_from`."""
    from reward.importers import load_preferences

    path = data_from / "preferences.jsonl"
    # Every pair a tie is a result of the preferences stage (reported there), not a malformed file.
    return load_preferences(path, "prompt") if path.stat().st_size else []


def load_rows(config: RunConfig, stage: str, data_from: Path | None) -> tuple[list, list]:
    """(train, held-out) rows; ([], []) when the data comes from the preferences stage and it has not run yet."""
    from reward.importers import load_preferences

    data = config.stage(stage).data
    if data.train:
        rows = load_preferences(data.train, data.format)
    elif data_from is not None:
        rows = stage_output(data_from)
    else:
        return [], []
    if data.eval:
        return rows, load_preferences(data.eval, data.format)
    return split_by_prompt(rows, data.eval_split, config.seed)
