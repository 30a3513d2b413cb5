"""Read the records of a dataset file, one pass, with the line each starts on; gather the bad ones.

Every reader of user data (sft's conversations, cpt's texts, preference pairs, prompts) reads through here, so
every reader takes the same files and reports a bad record the same way: a DataError naming the file, the line
(1-based, where the record starts) and the field as the file spells it.

Two things are never silent here:
- `BadRows` gathers the records a loader refused, so one pass lists every bad row (the stage then stops with the
  first 20 and the count, or, with `data.bad_rows: drop`, leaves them out and counts them);
- `FieldUse` counts the top-level fields a format does not read, and the loader warns about them; fields holding
  media (images, audio, video) are refused outright, since a text-only model would train on their placeholders.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Callable, Iterator

from pipeline.errors import DataError, PipelineError
from pipeline.sources import Source, dataset_rows, open_text, parquet_rows

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number",
               str: "string", list: "array", dict: "object"}
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
# Fields that carry media a text-only causal LM cannot see; their placeholders (<image>) would train as text.
MEDIA_FIELDS = ("images", "image", "videos", "video", "audios", "audio")
SHOWN_BAD_ROWS = 20


def json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def as_source(where) -> Source:
    return where if isinstance(where, Source) else Source(path=str(where))


def check_suffix(where, supported: tuple[str, ...]) -> str | None:
    """A file's kind (its extension, under any .gz) when `supported`; None for a source `datasets` reads."""
    source = as_source(where)
    if not source.is_file:
        return None
    if source.suffix not in supported:
        listed = ", ".join(supported)
        raise DataError(source, None, None, f"unsupported file extension {source.suffix or '(none)'!r}; "
                                            f"supported: {listed} (each may be compressed as .gz)")
    return source.suffix


def read_text(where) -> str:
    """A text file's contents (decompressed when .gz), checked to be UTF-8 and not empty."""
    source = as_source(where)
    raw = open_text(source)
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # editors on Windows add a BOM
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(source, line, None, f"not valid UTF-8 (byte {raw[e.start]:#04x}); "
                                            "re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(source, None, None, "the file is empty")
    return text


def lines(text: str) -> Iterator[tuple[int, str]]:
    # Not str.splitlines(): it also splits on U+2028 and friends, which JSON strings may contain.
    for number, line in enumerate(text.split("\n"), 1):
        yield number, line.removesuffix("\r")


# ---------------------------------------------------------------------------- bad rows

class BadRows:
    """The records loaders refused, gathered over every file a stage reads, so one pass finds them all."""

    def __init__(self):
        self.errors: list[DataError] = []

    def add(self, error: DataError) -> None:
        self.errors.append(error)

    def guard(self, convert: Callable[[], Any]) -> Any | None:
        """convert(), or None with its DataError kept; `bad=None` in a loader means: raise at the first instead."""
        try:
            return convert()
        except DataError as error:
            self.add(error)
            return None

    def settle(self, policy: str, key: str) -> int:
        """Stop with every bad row (policy error) or leave them out with a warning (drop); how many were left out.
        `key` is the config section the policy is set in, e.g. sft.data."""
        from pipeline.log import warn

        if not self.errors:
            return 0
        listed = "\n".join(f"  {error}" for error in self.errors[:SHOWN_BAD_ROWS])
        more = len(self.errors) - SHOWN_BAD_ROWS
        listed += f"\n  ... and {more} more" if more > 0 else ""
        count = f"{len(self.errors)} bad row{'s' if len(self.errors) > 1 else ''}"
        if policy == "drop":
            warn(f"{key}: {count} left out ({key}.bad_rows: drop; counted in stage.json as data/dropped_bad_rows):"
                 f"\n{listed}")
            return len(self.errors)
        if len(self.errors) == 1:  # one line, as every other error is
            raise BadRowsError(f"{key}: {count}: {self.errors[0]}; fix it, or set {key}.bad_rows: drop to train "
                               "without it (counted in stage.json)", self.errors)
        raise BadRowsError(f"{key}: {count}:\n{listed}\nFix them, or set {key}.bad_rows: drop to train without "
                           "them (they are counted in stage.json)", self.errors)


class BadRowsError(PipelineError):
    """Every bad row of a stage's data, found in one pass."""

    def __init__(self, message: str, errors: list[DataError]):
        super().__init__(message)
        self.errors = errors


def guarded(bad: BadRows | None, convert: Callable[[], Any]) -> Any | None:
    """convert() under `bad` (kept and None returned), or raising at once when there is no BadRows."""
    return convert() if bad is None else bad.guard(convert)


# ---------------------------------------------------------------------------- fields a format does not read

class FieldUse:
    """Counts, per file, the top-level fields that no format rule reads, so the loader can say what it ignores."""

    def __init__(self, path):
        self.path = str(path)
        self.unused: Counter = Counter()
        self.records = 0

    def note(self, data: dict, used) -> None:
        self.records += 1
        # Exports write absent optional columns as null (and Arrow fills every row's missing ones), so null is absent.
        self.unused.update(key for key, value in data.items() if key not in used and value not in (None, "", [], {}))

    def report(self, what: str) -> None:
        from pipeline.log import warn

        if self.unused:
            fields = ", ".join(f"{name} ({count} of {self.records} records)" for name, count in
                               sorted(self.unused.items()))
            warn(f"{self.path}: fields the {what} does not read, ignored: {fields}")


def refuse_media(data: dict, error: Callable[[str, str], DataError]) -> None:
    """A record holding images, audio or video: refused, as a text-only model cannot use them."""
    for name in MEDIA_FIELDS:
        if data.get(name) not in (None, "", [], {}):
            raise error(name, f"holds {name}: this pipeline trains text-only language models, which cannot see "
                              f"them, and their placeholders in the text (e.g. <image>) would be trained on as "
                              f"words; remove the field and its placeholders, or the record")


# ---------------------------------------------------------------------------- JSON and JSON Lines

def _line_counter(text: str) -> Callable[[int], int]:
    """Offset -> 1-based line, counting incrementally because offsets only grow."""
    seen_pos, seen_line = 0, 1

    def line_of(pos: int) -> int:
        nonlocal seen_pos, seen_line
        seen_line += text.count("\n", seen_pos, pos)
        seen_pos = pos
        return seen_line
    return line_of


def _invalid_json(path, line: int, e: json.JSONDecodeError) -> DataError:
    return DataError(path, line, None, f"invalid JSON: {e.msg} (column {e.colno})")


def _as_object(path, line: int, value: Any) -> dict:
    if not isinstance(value, dict):
        raise DataError(path, line, None, f"expected a JSON object, found {json_type(value)}")
    return value


def _jsonl_records(path, text: str, bad: BadRows | None) -> Iterator[tuple[int, dict]]:
    for number, line in lines(text):
        if line.strip():
            def parse(line=line, number=number):
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _invalid_json(path, number, e) from None
                return _as_object(path, number, value)
            record = guarded(bad, parse)  # one broken line is one bad row: the lines after it still parse
            if record is not None:
                yield number, record


def _json_records(path, text: str) -> Iterator[tuple[int, dict]]:
    # Step through the array element by element so each record knows the line it starts on.
    decoder, line_of = json.JSONDecoder(), _line_counter(text)

    def decode(pos: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _invalid_json(path, e.lineno, e) from None

    def skip_space(pos: int) -> int:
        return _JSON_SPACE.match(text, pos).end()

    pos = skip_space(0)
    if not text.startswith("[", pos):
        raise DataError(path, line_of(pos), None,
                        f"the top level must be a JSON array of objects, found {json_type(decode(pos)[0])}")
    pos = skip_space(pos + 1)
    if text.startswith("]", pos):
        raise DataError(path, None, None, "the file is empty: the array has no records")
    while True:
        value, end = decode(pos)
        line = line_of(pos)
        yield line, _as_object(path, line, value)
        pos = skip_space(end)
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            problem = "the array is never closed with ']'" if pos == len(text) else "expected ',' or ']'"
            raise DataError(path, line_of(pos), None, f"invalid JSON: {problem} after an array element")
        pos = skip_space(pos + 1)
    pos = skip_space(pos + 1)
    if pos < len(text):
        raise DataError(path, line_of(pos), None, "invalid JSON: extra data after the top-level array")


def read_records(where, bad: BadRows | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line, object) for each record of a .jsonl (one object per non-blank line) or .json (a top-level array
    of objects) file, optionally .gz, where line is where the record starts, 1-based; or (row, object) for each row
    of a .parquet file or a dataset `datasets` reads (pipeline.sources). With `bad`, a JSON Lines line that does not
    parse is kept there and skipped; a broken .json array stops the reading (nothing after it can be located)."""
    source = as_source(where)
    suffix = check_suffix(source, RECORD_SUFFIXES)
    if suffix is None:
        yield from dataset_rows(source)
    elif suffix == ".parquet":
        yield from parquet_rows(source)
    else:
        text = read_text(source)
        yield from (_jsonl_records(source, text, bad) if suffix == ".jsonl" else _json_records(source, text))
