"""Chosen/rejected rows for the stages that train on preferences (rm, dpo, kto, orpo, simpo): from the preferences
stage's output or the stage's own `data.train` file, with a held-out split by prompt; and the length filter the pair
stages apply, measured once so `validate` reports the numbers the run will."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.data import Split
from pipeline.errors import ConfigError
from pipeline.log import track
from pipeline.records import BadRows
from pipeline.sources import read_all
from pipeline.render import response_ids
from reward.importers import FORMATS
from reward.pairs import PreferenceRow
from stages.lm import config_key


def check_format(config: RunConfig, stage: str) -> None:
    data = config.stage(stage).data
    if data.format not in FORMATS:
        raise ConfigError(f"{stage}.data.format '{data.format}' is not one of {', '.join(FORMATS)} (preference "
                          "formats)")
    if not data.train and (data.format != "auto" or data.columns):
        raise ConfigError(f"{stage}.data.format and {stage}.data.columns describe {stage}.data.train, which is not "
                          f"set: {stage} trains on the preferences stage's output, whose layout is fixed")


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


def load_rows(config: RunConfig, stage: str, data_from: Path | None) -> Split:
    """(train, held-out) rows; empty when the data comes from the preferences stage and it has not run yet. Tied
    pairs (equal score_chosen and score_rejected) teach no preference: they are left out and counted, as are bad
    rows under data.bad_rows: drop."""
    from reward.importers import load_preferences

    data = config.stage(stage).data
    bad = BadRows()

    def read(key: str) -> list[PreferenceRow]:
        with config_key(f"{stage}.data"):
            return read_all(getattr(data, key), f"{stage}.data.{key}", lambda source: load_preferences(
                source, data.format, data.columns, bad), config.seed)

    if data.train:
        rows = read("train")
    elif data_from is not None:
        rows = stage_output(data_from)
    else:
        return Split([], [])
    held_out = read("eval") if data.eval else None
    dropped = {"data/dropped_bad_rows": bad.settle(data.bad_rows, f"{stage}.data"),
               "data/dropped_ties": sum(row.tie for row in rows + (held_out or []))}
    rows = [row for row in rows if not row.tie]
    if held_out is not None:
        return Split(rows, [row for row in held_out if not row.tie], dropped)
    return Split(*split_by_prompt(rows, data.eval_split, config.seed), dropped)


@dataclass
class Measured:
    """Pairs that fit max_length (both responses, templated with their prompt as training sees them), their token
    ids, and how many did not fit."""
    rows: list[PreferenceRow] = field(default_factory=list)
    ids: list[dict] = field(default_factory=list)
    """{"chosen_ids", "rejected_ids"} of each kept row."""
    too_long: int = 0
    longest: int = 0


def measure(tokenizer, rows: list[PreferenceRow], max_length: int) -> Measured:
    """The length filter rm and the pair stages (dpo, orpo, simpo) apply: a pair whose longer side exceeds max_length
    is counted out rather than truncated, so no response is trained on half its text."""
    measured = Measured()
    for row in track(rows, "tokenizing pairs"):
        chosen = response_ids(tokenizer, row.prompt, row.chosen)
        rejected = response_ids(tokenizer, row.prompt, row.rejected)
        longest = max(len(chosen), len(rejected))
        measured.longest = max(measured.longest, longest)
        if longest > max_length:
            measured.too_long += 1
            continue
        measured.rows.append(row)
        measured.ids.append({"chosen_ids": chosen, "rejected_ids": rejected})
    return measured


def summarise(config: RunConfig, stage: str, tokenizer) -> tuple[str, dict | None]:
    """What `validate` says of a pair stage's data (rm, dpo, orpo, simpo): the pairs, what the run's length filter
    will leave out, and a rendered sample (the chosen side, loss-carrying text marked)."""
    from pipeline.render import render_conversation
    from stages.hf_trainer import max_length
    from stages.lm import dropped_note

    if not config.stage(stage).data.train:
        return "trains on the preferences stage's output (measured when it runs)", None
    split = load_rows(config, stage, None)
    limit = max_length(stage, config.stage(stage).trainer)
    train, held_out = measure(tokenizer, split.train, limit), measure(tokenizer, split.held_out, limit)
    too_long = train.too_long + held_out.too_long
    text = (f"{len(split.train)} train / {len(split.held_out)} eval pairs -> {len(train.rows)} / "
            f"{len(held_out.rows)} within max_length={limit}; {too_long} longer"
            + (" (these would be left out)" if too_long else "") + f"; longest {max(train.longest, held_out.longest)}"
            f" tokens{dropped_note(split.dropped)}")
    if not train.rows:
        return text, None
    row = train.rows[0]
    ids, labels = render_conversation(tokenizer, [*row.prompt, {"role": "assistant", "content": row.chosen}])
    return text, {"input_ids": ids, "labels": labels}
