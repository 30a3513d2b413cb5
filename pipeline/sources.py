"""Where a stage's data comes from: files, dataset directories, Hub datasets, and mixes of them with weights.

`<stage>.data.train` (and `eval`) is one source or a list of them. A source is
  - a path (a string, or {path: ...}): a file (.jsonl, .json, .parquet, .txt, each optionally .gz), or a local
    dataset directory: one `Dataset.save_to_disk` wrote, or a folder of data files `datasets` reads;
  - a Hub dataset: {name: org/dataset, config, split (default train), data_files, revision}, read by `datasets`
    through its own cache (HF_DATASETS_OFFLINE=1 reads only what is cached);
and may carry `weight`: how many times each of its records counts in the mix (2: every record twice; 0.5: a seeded
half of them), so a small source can be upsampled beside a large one. Records read through `datasets` are numbered
by row (1-based), and errors name the source and row as files name their line.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import ConfigError, DataError


@dataclass(frozen=True)
class Source:
    path: str | None = None
    """A file, or a local dataset directory."""
    name: str | None = None
    """A Hub dataset id, org/dataset."""
    config: str | None = None
    """The dataset's configuration (subset), for Hub datasets and dataset directories with several."""
    split: str | None = None
    """The split to read (default: train, or the only one there is)."""
    data_files: str | list | dict | None = None
    """Which of a dataset's files to read (as `datasets.load_dataset` takes them)."""
    revision: str | None = None
    """A Hub dataset's branch, tag or commit."""
    weight: float = 1.0
    """How many times each record counts in the mix: 2 twice, 0.5 a seeded half."""

    def __str__(self) -> str:
        """How errors name it: the path, or the Hub id with its configuration and split."""
        if self.name is None and self.is_file:
            return self.path
        where = self.name or self.path
        return f"{where}{f'[{self.config}]' if self.config else ''}({self.split or 'train'})"

    @property
    def is_file(self) -> bool:
        return self.name is None and not Path(self.path).is_dir()

    @property
    def suffix(self) -> str:
        """A file's kind: its extension, under a .gz if compressed (data.jsonl.gz -> .jsonl)."""
        name = Path(self.path).name.lower().removesuffix(".gz")
        return Path(name).suffix


_KEYS = tuple(f.name for f in dataclasses.fields(Source))


def parse(value: Any, key: str) -> list[Source]:
    """The sources a config value names (a path, a mapping, or a list of either); `key` names it in errors."""
    from pipeline.config import suggest

    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(f"{key} is an empty list: name at least one source")
    sources = []
    for index, item in enumerate(items):
        where = f"{key}[{index}]" if isinstance(value, list) else key
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a path or a mapping with path or name, found {type(item).__name__}")
        for name in item:
            if name not in _KEYS:
                raise ConfigError(f"unknown key '{where}.{name}'{suggest(name, _KEYS)}")
        if bool(item.get("path")) == bool(item.get("name")):
            raise ConfigError(f"{where} needs one of path (a file or dataset directory) or name (a Hub dataset id)")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise ConfigError(f"{where}.weight must be a positive number, got {weight!r}")
        if item.get("revision") and not item.get("name"):
            raise ConfigError(f"{where}.revision applies to Hub datasets (name), not to a path")
        sources.append(Source(**{**item, "weight": float(weight)}))
    return sources


def paths(value: Any) -> list[str]:
    """The plain paths a config value names (for checks that only files answer, such as probes)."""
    return [source.path for source in parse(value, "data") if source.path]


# ---------------------------------------------------------------------------- reading

def open_text(source: Source) -> bytes:
    """A file's bytes, decompressed when it is .gz; a missing or unreadable file is a DataError."""
    path = Path(source.path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, None, "file not found") from None
    except OSError as e:
        raise DataError(path, None, None, f"cannot read the file: {e.strerror}") from None
    if path.name.lower().endswith(".gz"):
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(path, None, None, f"not a valid gzip file: {e}") from None
    return raw


def parquet_rows(source: Source) -> Iterator[tuple[int, dict]]:
    """(row, record) of a parquet file, 1-based, read a batch at a time."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(source.path)
    except FileNotFoundError:
        raise DataError(source.path, None, None, "file not found") from None
    except Exception as e:  # pyarrow's errors for a file that is not parquet have no common base
        raise DataError(source.path, None, None, f"not a readable parquet file: {e}") from None
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def dataset_rows(source: Source) -> Iterator[tuple[int, dict]]:
    """(row, record) of a Hub dataset or a local dataset directory, read through `datasets` and its cache."""
    for row, record in enumerate(load_dataset(source), 1):
        yield row, record


def _saved_to_disk(source: Source) -> bool:
    """Whether the source is a directory `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`) wrote."""
    return bool(source.path) and any((Path(source.path) / name).exists()
                                     for name in ("dataset_info.json", "dataset_dict.json"))


def load_dataset(source: Source):
    """The `datasets.Dataset` a non-file source names (one split)."""
    import datasets

    try:
        if _saved_to_disk(source):
            loaded = datasets.load_from_disk(source.path)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[_split(source, list(loaded))]
            return loaded
        return datasets.load_dataset(source.name or source.path, source.config, split=source.split or "train",
                                     data_files=source.data_files, revision=source.revision)
    except (KeyError, ValueError, FileNotFoundError, ConnectionError, OSError) as e:
        offline = " (offline: only datasets already in the cache can be read)" \
            if datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(str(source), None, None, f"cannot load the dataset{offline}: {e}") from None


# The `datasets` builder that reads each kind of file a chunk at a time. A .json array has none: it is parsed whole.
STREAMED_FILES = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}


def stream_rows(source: Source) -> Iterator[tuple[int, dict]]:
    """(row, record) of a source read through `datasets` streaming (an IterableDataset), 1-based: a file a chunk at a
    time (a .txt a line per row), a Hub dataset or a folder of data files as `datasets` streams them, a save_to_disk
    directory from its memory-mapped Arrow files. Nothing is held beyond the chunk being read."""
    import datasets

    if source.is_file and source.suffix not in STREAMED_FILES:
        raise DataError(source, None, None, f"a {source.suffix or '(no extension)'} file cannot be streamed; streaming "
                                            f"reads {', '.join(STREAMED_FILES)} (each may be .gz)" +
                        ("; a .json array is parsed whole: convert it to .jsonl, one record per line"
                         if source.suffix == ".json" else ""))
    try:
        if source.is_file:
            rows = datasets.load_dataset(STREAMED_FILES[source.suffix], data_files=source.path, split="train",
                                         streaming=True)
        elif _saved_to_disk(source):
            rows = load_dataset(source).to_iterable_dataset()
        else:
            rows = datasets.load_dataset(source.name or source.path, source.config, split=source.split or "train",
                                         data_files=source.data_files, revision=source.revision, streaming=True)
        yield from enumerate(rows, 1)
    except DataError:
        raise
    except Exception as e:  # datasets, fsspec and pyarrow raise their own kinds for a file they cannot read
        offline = " (offline: only datasets already in the cache can be read)" \
            if source.name and datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(str(source), None, None, f"cannot be read as a stream{offline}: {type(e).__name__}: {e}") \
            from None


def _split(source: Source, splits: list[str]) -> str:
    wanted = source.split or ("train" if "train" in splits or len(splits) != 1 else splits[0])
    if wanted not in splits:
        raise DataError(str(source), None, None, f"has no split {wanted!r}; its splits: {', '.join(splits)}")
    return wanted


# ---------------------------------------------------------------------------- mixing and hashing

def read_all(value: Any, key: str, read: Callable[[Source], list], seed: int) -> list:
    """Every source's records, each weighted (see Source.weight), in the order the sources are listed."""
    from pipeline.log import log

    sources, mixed = parse(value, key), []
    for index, source in enumerate(sources):
        records = read(source)
        weighted = _weighted(records, source.weight, seed + index)
        if len(sources) > 1 or source.weight != 1:
            log(f"{key}: {len(records)} records from {source}, weight {source.weight:g} -> {len(weighted)}",
                markup=False)
        mixed += weighted
    return mixed


def _weighted(records: list, weight: float, seed: int) -> list:
    whole, fraction = int(weight), weight - int(weight)
    extra = round(len(records) * fraction)
    sample = sorted(random.Random(seed).sample(range(len(records)), extra)) if extra else []
    return records * whole + [records[i] for i in sample]


def hash_sources(value: Any, streaming: bool = False) -> str:
    """A content hash of every source a config value names, to decide whether a stage must run again: a file or
    directory by its bytes (read a chunk at a time), a `datasets` source by the Arrow files its cache holds, or, when
    it is streamed and so never cached whole, by the revision `datasets` resolves it to (the commit on the Hub)."""
    import hashlib

    from pipeline.artifacts import hash_path

    digest = hashlib.sha256()
    for source in parse(value, "data"):
        if source.name is None:
            digest.update(hash_path(Path(source.path)).encode())
            continue
        if streaming:
            digest.update(f"{source}:{source.data_files}:{_resolved_revision(source)}".encode())
            continue
        files = [Path(f["filename"]) for f in load_dataset(source).cache_files]
        for file in files:
            digest.update(hash_path(file).encode())
    return digest.hexdigest()[:16]


def _resolved_revision(source: Source) -> str:
    """The revision of a Hub dataset as `datasets` resolves it, without reading its data: the commit its files come
    from (or, offline, the cached one's)."""
    import datasets

    try:
        return datasets.load_dataset_builder(source.name, source.config, data_files=source.data_files,
                                             revision=source.revision).hash
    except (KeyError, ValueError, FileNotFoundError, ConnectionError, OSError) as e:
        raise DataError(str(source), None, None, f"cannot resolve the dataset's revision: {e}") from None
