"""Stage cls: a text classifier trained with transformers' Trainer (no TRL trainer fits) on rows of text and label.

A branch of its own beside the chat chain: it starts from the base model (an encoder such as the built-in
all-minilm-l6-v2, or a causal LM) under a new classification head, with LoRA on the layers peft.options names and the
head trained in full and saved with the adapter (PEFT's SEQ_CLS task), or every weight under peft.method full.
Before and after training we predict the held-out rows ourselves: accuracy, macro-F1 and the confusion matrix
(confusion.json, and the report). final/ holds the adapter and its head (or the whole classifier) and the tokenizer;
it loads with plain transformers + peft on the base recorded in stage.json.

1. Read every row (file, line and field named for each bad one) and settle the labels, before any compute.
2. Tokenize, counting the texts cut at cls.max_length.
3. Load the classifier and measure the held-out rows before training (kept through a resume).
4. Train through hf_trainer.fit (checkpoints, resume, tracking), then measure again and save.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import read_json, write_json_atomic
from pipeline.config import REGISTRY, RunConfig
from pipeline.context import StageContext, StageResult
from pipeline.data import Split
from pipeline.distributed import is_main_process
from pipeline.errors import ConfigError, DataError
from pipeline.log import log, track, warn
from pipeline.records import BadRows, FieldUse, check_suffix, guarded, json_type, read_records, read_text
from pipeline.sources import Source, read_all
from stages import hf_trainer, lm

NAME = "cls"
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Example:
    text: str
    label: str | int
    """As the file gives it: a name, or an index into cls.labels (a CSV's digits are an index too)."""
    path: str
    line: int
    label_field: str

    def error(self, message: str) -> DataError:
        return DataError(self.path, self.line, self.label_field, message)


# ---------------------------------------------------------------------------- 1. rows and labels

def _csv_records(source: Source, columns: dict) -> list[tuple[int, dict]]:
    """(line, row) of a CSV file with a header, the line where each row starts (a quoted text may span lines)."""
    text = read_text(source)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    for name in (columns.get("text", "text"), columns.get("label", "label")):
        if name not in header:
            raise DataError(source, 1, name, f"is not a column of the CSV file; its header has: {', '.join(header)}"
                            + (" (see cls.data.columns)" if columns else ""))
    records, end = [], reader.line_num
    for row in reader:
        start, end = end + 1, reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(source, start, None, f"has {len(row)} fields, the header has {len(header)}")
        records.append((start, dict(zip(header, row))))
    return records


def _example(data: dict, path: str, line: int, columns: dict, csv_file: bool) -> Example:
    text_field, label_field = columns.get("text", "text"), columns.get("label", "label")
    for name in (text_field, label_field):
        if data.get(name) in (None, ""):
            what = "is required but missing" if data.get(name) is None else "is empty"
            raise DataError(path, line, name, what + (" (see cls.data.columns)" if columns else ""))
    text, label = data[text_field], data[label_field]
    if not isinstance(text, str):
        raise DataError(path, line, text_field, f"must be a string, found {json_type(text)}")
    if not text.strip():
        raise DataError(path, line, text_field, "must be a non-empty string")
    if csv_file and label.strip().isdigit():
        label = int(label)
    if isinstance(label, str):
        label = label.strip()
    elif isinstance(label, bool) or not isinstance(label, int):
        raise DataError(path, line, label_field, f"must be a string (a label's name) or an integer (its index in "
                                                 f"cls.labels), found {json_type(label)} {label!r}")
    elif label < 0:
        raise DataError(path, line, label_field, f"is {label}: an index into cls.labels is 0 or more")
    return Example(text, label, path, line, label_field)


def read_examples(source: Source, columns: dict, bad: BadRows) -> list[Example]:
    """Every row of one source, a bad one gathered in `bad`."""
    csv_file = check_suffix(source, SUFFIXES) == ".csv"
    examples, use = [], FieldUse(source)
    records = _csv_records(source, columns) if csv_file else read_records(source, bad)
    for line, data in records:
        use.note(data, {columns.get("text", "text"), columns.get("label", "label")})
        example = guarded(bad, lambda: _example(data, str(source), line, columns, csv_file))
        if example is not None:
            examples.append(example)
    use.report("cls stage (text, label)")
    return examples


def label_names(config: RunConfig, train: list[Example]) -> list[str]:
    """cls.labels, or the training rows' labels: their names sorted, or, when every row gives an index, 0..max."""
    if config.cls.labels:
        return list(config.cls.labels)
    named = sorted({e.label for e in train if isinstance(e.label, str)})
    return named or [str(i) for i in range(max((e.label for e in train), default=-1) + 1)]


def label_id(example: Example, labels: list[str], configured: bool, by_index: bool) -> int:
    """The label's id; `by_index`: integer labels are indices (cls.labels is set, or every training row gives one)."""
    if isinstance(example.label, int):
        if not by_index:
            raise example.error(f"is the index {example.label}, but other rows name their label ({', '.join(labels)}); "
                                "use one kind, or set cls.labels to say which name each index is")
        if example.label >= len(labels):
            raise example.error(f"is the index {example.label}, but there are {len(labels)} labels ({', '.join(labels)})")
        return example.label
    if example.label not in labels:
        where = "cls.labels" if configured else "the training rows' labels (set cls.labels to name every label)"
        raise example.error(f"'{example.label}' is not one of {where}: {', '.join(labels)}")
    return labels.index(example.label)


@dataclass
class Rows:
    split: Split
    """(text, label id) pairs, train and held out."""
    labels: list[str]


def load(config: RunConfig) -> Rows:
    """Parse, settle the labels and split; raises before any compute, naming every bad row (or, with
    cls.data.bad_rows: drop, leaves them out and counts them)."""
    data = config.cls.data
    bad = BadRows()

    def read(key: str) -> list[Example]:
        return read_all(getattr(data, key), f"{NAME}.data.{key}",
                        lambda source: read_examples(source, data.columns, bad), config.seed)

    train = read("train")
    held_out = read("eval") if data.eval else None
    labels = label_names(config, train)
    configured = bool(config.cls.labels)
    by_index = configured or not any(isinstance(e.label, str) for e in train)

    def resolve(examples: list[Example]) -> list[tuple[str, int]]:
        ids = [guarded(bad, lambda e=e: label_id(e, labels, configured, by_index)) for e in examples]
        return [(e.text, i) for e, i in zip(examples, ids) if i is not None]

    train_rows = resolve(train)
    eval_rows = resolve(held_out) if held_out is not None else None
    dropped = {"data/dropped_bad_rows": bad.settle(data.bad_rows, f"{NAME}.data")}
    if len(labels) < 2 or len({label for _, label in train_rows}) < 2:
        raise ConfigError(f"{NAME}.data.train: the training rows have {len({label for _, label in train_rows})} "
                          f"distinct label(s); a classifier needs at least two")
    if eval_rows is None:
        train_rows, eval_rows = lm.split_eval(train_rows, data.eval_split, config.seed)
    return Rows(Split(train_rows, eval_rows, dropped), labels)


def counts(rows: list[tuple[str, int]], labels: list[str]) -> str:
    return ", ".join(f"{label} {sum(i == index for _, i in rows)}" for index, label in enumerate(labels))


# ---------------------------------------------------------------------------- the stage interface

def check(config: RunConfig) -> str:
    from pipeline.models import peft_config_for

    if config.distributed.enabled:
        raise ConfigError("cls trains in one process; distributed: (several processes, DeepSpeed) applies to the "
                          "chat stages: run cls with a config without it")
    if config.cls.init_from in REGISTRY:
        raise ConfigError(f"cls.init_from '{config.cls.init_from}': cls starts from the base model (auto, base), a "
                          "model directory or an adapter cls trained, not from another stage of the chat chain")
    peft_config_for(config.peft, task_type="SEQ_CLS")
    hf_trainer.check_trainer_keys(config, NAME, {"eval_strategy": "steps"})
    rows = load(config)
    train, held_out = rows.split
    return (f"{len(train)} train / {len(held_out)} eval rows; labels: {counts(train, rows.labels)} (train)"
            f"{lm.dropped_note(rows.split.dropped)}")


def data_files(config: RunConfig) -> dict:
    data = config.cls.data
    return {key: getattr(data, key) for key in ("train", "eval") if getattr(data, key)}


def uses_model(config: RunConfig) -> bool:
    return True


# ---------------------------------------------------------------------------- 2. tokens, 3. the model

def tokenize(tokenizer, rows: list[tuple[str, int]], max_length: int) -> tuple[list[dict], int]:
    """Rows of input ids and label, and how many texts were cut at max_length. Each text is encoded once whole; only
    the ones over the limit are encoded again, cut by the tokenizer (which keeps an encoder's closing special token)."""
    encoded = tokenizer([text for text, _ in rows])
    long = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) > max_length]
    if long:
        cut = tokenizer([rows[i][0] for i in long], truncation=True, max_length=max_length)
        for i, ids, mask in zip(long, cut["input_ids"], cut["attention_mask"]):
            encoded["input_ids"][i], encoded["attention_mask"][i] = ids, mask
    return [{"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows)], len(long)


def load_model(ctx: StageContext, tokenizer, labels: list[str]):
    """The classifier to train: the base under a new head with the configured PEFT method, or an adapter cls
    trained before (its head included), continued."""
    from peft import get_peft_model
    from transformers import set_seed

    from pipeline.models import load_classifier, peft_config_for

    set_seed(ctx.config.seed)  # the head and the adapter are initialised randomly
    source = ctx.init
    _check_head_labels(source.base, labels)
    if source.adapter is not None:
        task = json.loads((source.adapter / "adapter_config.json").read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise ConfigError(f"cls.init_from: {source.description} is a {task} adapter, not one cls trained (SEQ_CLS)")
        log(f"{NAME}: continuing to train {source.description}")
        return load_classifier(source.base, ctx.config.model, tokenizer, labels, source.adapter, for_training=True)
    model = load_classifier(source.base, ctx.config.model, tokenizer, labels, for_training=True)
    peft_config = peft_config_for(ctx.config.peft, task_type="SEQ_CLS")
    return model if peft_config is None else get_peft_model(model, peft_config)


def _check_head_labels(base: Path, labels: list[str]) -> None:
    """A classifier's head reads its outputs in the order of its own labels: one trained on others is refused."""
    config = read_json(base / "config.json") or {}
    own = list((config.get("id2label") or {}).values())
    if own and not all(name.startswith("LABEL_") for name in own) and own != labels:
        raise ConfigError(f"{base} is a classifier of the labels {own}, not {labels}: set cls.labels to its labels "
                          "(in its order), or start from a model without a head")


def predict(model, tokenizer, rows: list[dict], batch_size: int) -> list[int]:
    import torch
    from transformers import DataCollatorWithPadding

    collate, predicted = DataCollatorWithPadding(tokenizer), []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in track(range(0, len(rows), batch_size), "predicting held-out rows"):
            batch = collate([{k: v for k, v in row.items() if k != "labels"} for row in rows[start:start + batch_size]])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            predicted += logits.argmax(-1).tolist()
    model.train(was_training)
    return predicted


def measure(model, tokenizer, rows: list[dict], labels: list[str], batch_size: int) -> dict:
    from stages.metrics import classification

    return classification(predict(model, tokenizer, rows, batch_size), [row["labels"] for row in rows], len(labels))


def _log_confusion(labels: list[str], confusion: list[list[int]]) -> None:
    corner = "actual \\ predicted"
    first, width = max(len(corner), *map(len, labels)), max(5, *map(len, labels))
    log(f"  {corner:>{first}}  " + "  ".join(f"{label:>{width}}" for label in labels), markup=False)
    for label, row in zip(labels, confusion):
        log(f"  {label:>{first}}  " + "  ".join(f"{n:>{width}}" for n in row), markup=False)


# ---------------------------------------------------------------------------- 4. training

def run(ctx: StageContext) -> StageResult:
    import numpy as np
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer

    from pipeline.models import load_tokenizer
    from stages.metrics import classification

    rows = load(ctx.config)
    train_rows, eval_rows = rows.split
    labels = rows.labels
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    limit = ctx.section.max_length
    train_tok, cut_train = tokenize(tokenizer, train_rows, limit)
    eval_tok, cut_eval = tokenize(tokenizer, eval_rows, limit)
    if cut_train + cut_eval:
        warn(f"{NAME}: {cut_train + cut_eval} texts are longer than cls.max_length={limit} tokens and were cut there "
             f"({cut_train} train, {cut_eval} eval)")
    log(f"{NAME}: {len(train_tok)} train / {len(eval_tok)} held-out rows; labels (train): "
        f"{counts(train_rows, labels)}")
    data_metrics = {"data/train_rows": len(train_tok), "data/eval_rows": len(eval_tok),
                    "data/truncated": cut_train + cut_eval, "data/labels": len(labels), **rows.split.dropped}

    model = load_model(ctx, tokenizer, labels)
    batch_size = ctx.section.trainer.get("per_device_eval_batch_size", 8)
    confusion_file = ctx.stage_dir / "confusion.json"
    if eval_tok and ctx.resume_from is None:
        before = measure(model, tokenizer, eval_tok, labels, batch_size)
        ctx.record({f"{NAME}/eval_accuracy_before": before["accuracy"],
                    f"{NAME}/eval_macro_f1_before": before["macro_f1"]})
        if is_main_process():
            write_json_atomic(confusion_file, {"labels": labels, "before": before["confusion"]})
        log(f"{NAME}: held-out accuracy before training {before['accuracy']:.1%}, macro-F1 {before['macro_f1']:.3f}")

    def compute_metrics(prediction) -> dict:  # the held-out curve the trainer logs at each evaluation
        found = classification(np.argmax(prediction.predictions, -1).tolist(), prediction.label_ids.tolist(),
                               len(labels))
        return {"accuracy": found["accuracy"], "macro_f1": found["macro_f1"]}

    def held_out(trainer) -> dict:
        after = measure(trainer.model, tokenizer, eval_tok, labels, batch_size)
        if is_main_process():
            write_json_atomic(confusion_file, {**(read_json(confusion_file) or {"labels": labels}),
                                               "after": after["confusion"]})
        log(f"{NAME}: held-out accuracy {after['accuracy']:.1%}, macro-F1 {after['macro_f1']:.3f} on "
            f"{len(eval_tok)} rows; confusion (rows: actual, columns: predicted):")
        _log_confusion(labels, after["confusion"])
        return {f"{NAME}/eval_accuracy": after["accuracy"], f"{NAME}/eval_macro_f1": after["macro_f1"]}

    has_eval = bool(eval_tok)
    result = hf_trainer.fit(ctx, Trainer, model, tokenizer, ctx.init.base, Dataset.from_list(train_tok),
                            Dataset.from_list(eval_tok) if has_eval else None, trainer_evaluates=has_eval,
                            after=held_out if has_eval else None,
                            defaults={"eval_strategy": "steps"} if has_eval else None,
                            data_collator=DataCollatorWithPadding(tokenizer),
                            compute_metrics=compute_metrics if has_eval else None)
    result.metrics = {**data_metrics, **result.metrics}
    result.manifest["labels"] = labels
    return result
