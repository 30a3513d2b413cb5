"""The preference schema: pairs to judge, the labels judges give them, and the chosen/rejected rows they become.

A `Pair` is two responses to one prompt; its id hashes the three, so the same pair sampled again gets the same id.
A `LabelStore` is an append-only JSONL file of `Label`s, synced to disk after every label: a crash loses at most the
label being written, and a re-run asks the judge only about pairs not yet labelled (a label is never asked twice,
which matters when the judge is a person or a paid API). The one change that is not an append is a person's undo,
which cuts their newest label off the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import DataError
from pipeline.log import log

WINNERS = ("a", "b", "tie")


def pair_id(prompt: list[dict], response_a: str, response_b: str) -> str:
    """Stable across runs and machines: sha256 of canonical JSON, so it does not depend on Python's hash seed."""
    canonical = json.dumps([prompt, response_a, response_b], ensure_ascii=False, separators=(",", ":"),
                           sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: list[dict]  # [{"role": ..., "content": ...}], ending with the user's turn
    response_a: str
    response_b: str
    source: str  # "path:line" of the prompt the responses answer

    @classmethod
    def create(cls, prompt: list[dict], response_a: str, response_b: str, source: str) -> Pair:
        return cls(pair_id(prompt, response_a, response_b), prompt, response_a, response_b, source)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Label:
    pair_id: str
    winner: str  # "a", "b" or "tie"
    judge: str  # the judge's name, e.g. "rule:scores:length" or "api:gpt-4o-mini"
    confidence: float | None = None
    verdicts: dict = field(default_factory=dict)  # judge-specific detail, e.g. {"ab": "a", "ba": "b"} for both orders
    created_at: str = field(default_factory=_now)

    def __post_init__(self):
        # A judge that returns anything else is a bug in the judge, not in the user's data.
        if self.winner not in WINNERS:
            raise ValueError(f"winner must be one of {WINNERS}, got {self.winner!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PreferenceRow:
    """One training example for a reward model or DPO, from a judge or from an imported dataset."""
    prompt: list[dict]
    chosen: str
    rejected: str
    judge: str | None = None  # None for rows imported from an existing dataset
    tie: bool = False  # only when ties are asked for: chosen/rejected are then response_a/response_b
    confidence: float | None = None
    source: str | None = None  # "path:line"
    pair_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FeedbackRow:
    """One response with a thumbs up or down, unpaired (KTO's data): label True marks a desirable response."""
    prompt: list[dict]
    completion: str
    label: bool
    source: str | None = None  # "path:line"


def unpaired(rows: list[PreferenceRow]) -> list[FeedbackRow]:
    """Each chosen/rejected pair as two feedback rows: the chosen response desirable, the rejected one not."""
    return [FeedbackRow(row.prompt, response, label, row.source)
            for row in rows for response, label in ((row.chosen, True), (row.rejected, False))]


# ---------------------------------------------------------------------------- the label store

def is_number(value: Any) -> bool:
    """A finite JSON number (bool is an int in Python but not a number in JSON)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_LABEL_FIELDS = {"pair_id": str, "winner": str, "judge": str, "created_at": str}


def _label_from_record(path: Path, line: int, record: Any) -> Label:
    if not isinstance(record, dict):
        raise DataError(path, line, None, f"expected a JSON object, found {type(record).__name__}")
    for name, kind in _LABEL_FIELDS.items():
        if name not in record:
            raise DataError(path, line, name, "is required but missing")
        if not isinstance(record[name], kind) or not record[name]:
            raise DataError(path, line, name, "must be a non-empty string")
    if record["winner"] not in WINNERS:
        raise DataError(path, line, "winner", f"must be one of {', '.join(WINNERS)}, found {record['winner']!r}")
    confidence = record.get("confidence")
    if confidence is not None and not is_number(confidence):
        raise DataError(path, line, "confidence", "must be a number or null")
    verdicts = record.get("verdicts", {})
    if not isinstance(verdicts, dict):
        raise DataError(path, line, "verdicts", "must be an object")
    unknown = sorted(set(record) - set(_LABEL_FIELDS) - {"confidence", "verdicts"})
    if unknown:
        raise DataError(path, line, unknown[0], "is not a label field")
    return Label(record["pair_id"], record["winner"], record["judge"], confidence, verdicts, record["created_at"])


class LabelStore:
    """Labels of one judging run, in a JSONL file that grows, save for `remove_last`. One writer at a time (the run
    lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._labels: dict[str, Label] = {}  # in file order, so the last one is the newest
        self._starts: dict[str, int] = {}  # pair id -> byte offset of its line, where `remove_last` cuts
        self._good_size = 0  # bytes of complete lines; anything after is a torn write to cut before appending
        self._needs_newline = False
        self._file = None
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        raw = self.path.read_bytes()
        *complete, tail = raw.split(b"\n")  # a write always ends with "\n", so `tail` is b"" unless torn
        offset = 0
        for number, line in enumerate(complete, 1):
            self._add_line(number, line, offset, torn=False)
            offset += len(line) + 1
            self._good_size = offset
        if tail.strip():
            number = len(complete) + 1
            if self._add_line(number, tail, offset, torn=True):
                self._good_size, self._needs_newline = len(raw), True
            else:
                log(f"warning: {self.path}:{number}: the last line is incomplete (the writer was interrupted) "
                    "and is ignored; that pair will be judged again", style="yellow", markup=False)

    def _add_line(self, number: int, line: bytes, start: int, torn: bool) -> bool:
        """Parse one line; a torn last line reports False instead of raising."""
        if not line.strip():
            return True
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if torn:
                return False
            raise DataError(self.path, number, None, f"not a valid label line: {e}") from None
        label = _label_from_record(self.path, number, record)
        if label.pair_id in self._labels:
            raise DataError(self.path, number, "pair_id", f"pair {label.pair_id} is labelled twice; a pair is "
                                                          "labelled once")
        self._labels[label.pair_id] = label
        self._starts[label.pair_id] = start
        return True

    def is_labelled(self, pair_id: str) -> bool:
        return pair_id in self._labels

    def get(self, pair_id: str) -> Label | None:
        return self._labels.get(pair_id)

    def labels(self) -> list[Label]:
        return list(self._labels.values())

    def __len__(self) -> int:
        return len(self._labels)

    def add(self, label: Label) -> None:
        if label.pair_id in self._labels:
            raise ValueError(f"pair {label.pair_id} is already labelled in {self.path}")
        if self._file is None:
            self._open_for_append()
        self._file.flush()  # the newline `_open_for_append` may have written belongs before this label's start
        start = os.fstat(self._file.fileno()).st_size
        self._file.write(json.dumps(label.to_dict(), ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._labels[label.pair_id] = label
        self._starts[label.pair_id] = start

    def remove_last(self) -> Label | None:
        """Take back the newest label (a person's undo), or return None when there is none. The file is cut back to
        where that label's line starts and synced: a crash leaves it either whole or without that line, never torn."""
        if not self._labels:
            return None
        if self._file is None:
            self._open_for_append()
        pair_id = next(reversed(self._labels))
        self._file.flush()
        os.ftruncate(self._file.fileno(), self._starts[pair_id])
        os.fsync(self._file.fileno())
        self._file.seek(0, os.SEEK_END)
        del self._starts[pair_id]
        return self._labels.pop(pair_id)

    def _open_for_append(self) -> None:
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+", encoding="utf-8")
        self._file.truncate(self._good_size)  # drop a torn last line so the next label starts on its own line
        if self._needs_newline:
            self._file.write("\n")
        if created:
            # The new file's directory entry must survive a crash too, or the synced labels vanish with it.
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- preference rows

@dataclass(frozen=True)
class RowCounts:
    rows: int  # rows written
    ties: int  # pairs labelled a tie (left out unless ties were asked for)
    unlabelled: int  # pairs no judge has labelled yet
    unknown_labels: int  # labels whose pair is not among the pairs given (e.g. from an earlier sampling)


def preference_rows(pairs: Iterable[Pair], labels: Iterable[Label],
                    include_ties: bool = False) -> tuple[list[PreferenceRow], RowCounts]:
    """Chosen/rejected rows in the order of `pairs`; every pair left out is counted, never dropped silently."""
    by_id = {label.pair_id: label for label in labels}
    rows, ties, unlabelled, seen = [], 0, 0, set()
    for pair in pairs:
        seen.add(pair.id)
        label = by_id.get(pair.id)
        if label is None:
            unlabelled += 1
            continue
        if label.winner == "tie":
            ties += 1
            if not include_ties:
                continue
        chosen, rejected = ((pair.response_b, pair.response_a) if label.winner == "b"
                            else (pair.response_a, pair.response_b))
        rows.append(PreferenceRow(pair.prompt, chosen, rejected, label.judge, label.winner == "tie",
                                  label.confidence, pair.source, pair.id))
    unknown = sum(1 for pair_id in by_id if pair_id not in seen)
    return rows, RowCounts(len(rows), ties, unlabelled, unknown)


def label_stats(labels: list[Label]) -> dict:
    """How a judge labelled: its tie rate and how often the first response won; where it saw both orders, how often
    swapping them changed its verdict; where it measured one, its mean position bias (the llm judge's pull towards
    the first-shown response, in log-odds, removed from every label)."""
    stats = {"tie_rate": sum(label.winner == "tie" for label in labels) / len(labels) if labels else None,
             "a_wins": sum(label.winner == "a" for label in labels) / len(labels) if labels else None}
    flips = [label for label in labels if "ab" in label.verdicts and "ba" in label.verdicts]
    if flips:
        stats["order_flip_rate"] = sum(l.verdicts["ab"] != l.verdicts["ba"] for l in flips) / len(flips)
    biases = [label.verdicts["position_bias"] for label in labels if "position_bias" in label.verdicts]
    if biases:
        stats["position_bias"] = sum(biases) / len(biases)
    return stats


def write_preferences(path: str | Path, rows: Iterable[PreferenceRow]) -> int:
    """Write rows as JSONL under a temporary name, then rename: a reader never sees half a file."""
    return _write_jsonl_atomic(path, (row.to_dict() for row in rows))


def write_pairs(path: str | Path, pairs: Iterable[Pair]) -> int:
    """Write pairs as JSONL (id, prompt, response_a, response_b, source) under a temporary name, then rename."""
    return _write_jsonl_atomic(path, (asdict(pair) for pair in pairs))


def _write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    count = 0
    with open(partial, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return count
