"""cls through transformers' Trainer on a tiny random BERT: LoRA with its head, full fine-tuning, any number of labels,
CSV with renamed columns, the adapter reloading in plain transformers + peft, the report, and kill/resume equal to an
uninterrupted run."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import REPO, kill_after_first_checkpoint, load_safetensors_dir, max_abs_diff, run_pipeline

CLASSIFY = str(REPO / "configs" / "classify.yaml")
# Three labels from the shipped sentiment rows: a review that names a price or value is "value", so the labels are
# neither balanced nor separable by the file's own label.
PRICE_WORDS = ("penny", "money", "value", "refund", "price")


def _three_label_csv(path, source):
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "verdict", "stars"])
        for row in rows:
            verdict = "value" if any(w in row["text"].lower() for w in PRICE_WORDS) else row["label"]
            writer.writerow([row["text"], verdict, "5"])
    return path


def _args(run_dir, model_dir, *more):
    return ["run", "--config", CLASSIFY, "--run-dir", str(run_dir), "--set", f"model.name_or_path={model_dir}",
            "--set", "cls.trainer.num_train_epochs=1", "--set", "cls.trainer.max_steps=6",
            "--set", "cls.trainer.save_steps=2", "--set", "cls.trainer.eval_steps=3",
            "--set", "cls.trainer.learning_rate=5e-3", "--set", "peft.options.lora_dropout=0.0", *more]


def _predict(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.argmax(-1).tolist()


def test_lora_three_labels_from_csv_trains_its_head_and_reloads_in_plain_peft(tmp_path, tiny_bert_dir):
    train = _three_label_csv(tmp_path / "train.csv", REPO / "data/classify/sentiment_train.jsonl")
    held = _three_label_csv(tmp_path / "eval.csv", REPO / "data/classify/sentiment_eval.jsonl")
    run_dir = tmp_path / "run"
    run_pipeline(*_args(run_dir, tiny_bert_dir, "--set", f"cls.data.train={train}", "--set", f"cls.data.eval={held}",
                        "--set", "cls.data.columns={text: review, label: verdict}",
                        "--set", "cls.labels=[negative, positive, value]"))

    manifest = json.loads((run_dir / "cls" / "stage.json").read_text())
    metrics = manifest["metrics"]
    assert manifest["status"] == "completed" and manifest["labels"] == ["negative", "positive", "value"]
    assert metrics["train/steps"] == 6 and metrics["data/eval_rows"] == 100 and metrics["data/labels"] == 3
    for key in ("cls/eval_accuracy", "cls/eval_macro_f1"):
        assert 0 <= metrics[key] <= 1 and 0 <= metrics[f"{key}_before"] <= 1
    confusion = json.loads((run_dir / "cls" / "confusion.json").read_text())
    assert confusion["labels"] == manifest["labels"]
    for when in ("before", "after"):
        assert len(confusion[when]) == 3 and sum(map(sum, confusion[when])) == 100
    after = confusion["after"]
    assert sum(after[i][i] for i in range(3)) / 100 == pytest.approx(metrics["cls/eval_accuracy"])
    logged = [json.loads(line) for line in (run_dir / "cls" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged if "eval_accuracy" in line] == [0, 3, 6]  # the curve, from before training

    # The adapter and the head beside it, changed from where they started (LoRA B starts at zero).
    final = run_dir / "cls" / "final"
    weights = load_safetensors_dir(final)
    assert any("lora_B" in name and w.abs().sum() > 0 for name, w in weights.items())
    head = [name for name in weights if "classifier" in name]
    assert head and weights[[n for n in head if n.endswith("weight")][0]].shape[0] == 3

    # Plain transformers + peft on the recorded base reproduce the stage's own held-out accuracy.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = manifest["base_model"]
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=3), final)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    with open(held, newline="") as handle:
        rows = list(csv.DictReader(handle))
    predicted = _predict(model, tokenizer, [row["review"] for row in rows])
    actual = [manifest["labels"].index(row["verdict"]) for row in rows]
    assert sum(p == a for p, a in zip(predicted, actual)) / len(rows) == pytest.approx(metrics["cls/eval_accuracy"])

    report = (run_dir / "report.md").read_text()
    assert "## Classification" in report and "| actual \\ predicted | negative | positive | value |" in report


def test_full_fine_tuning_changes_every_weight_and_saves_a_whole_classifier(tmp_path, tiny_bert_dir):
    run_dir = tmp_path / "run"
    run_pipeline(*_args(run_dir, tiny_bert_dir, "--set", "peft.method=full", "--set", "peft.options={}",
                        "--set", "cls.trainer.max_steps=3", "--set", "cls.trainer.learning_rate=1e-3"))
    final = run_dir / "cls" / "final"
    assert not (final / "adapter_config.json").exists()
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    start = load_safetensors_dir(tiny_bert_dir)
    trained = dict(model.named_parameters())
    unchanged = [name for name, value in start.items() if f"bert.{name}" in trained
                 and torch.equal(value, trained[f"bert.{name}"].detach())]
    assert not unchanged, f"weights full fine-tuning left as they were: {unchanged}"


def test_sigkill_then_rerun_resumes_and_matches_uninterrupted(tmp_path, tiny_bert_dir):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    long = ["--set", "cls.trainer.max_steps=12"]
    run_pipeline(*_args(reference, tiny_bert_dir, *long))

    kill_after_first_checkpoint("cls", killed, _args(killed, tiny_bert_dir, *long))
    status = json.loads(run_pipeline("status", "--run-dir", str(killed), "--json").stdout)["stages"]["cls"]
    assert status["status"] == "interrupted" and status["newest_checkpoint"] is not None

    result = run_pipeline(*_args(killed, tiny_bert_dir, *long))
    assert f"resuming from {status['newest_checkpoint']}" in result.stderr.replace("\n", " ")
    manifest = json.loads((killed / "cls" / "stage.json").read_text())
    expected = json.loads((reference / "cls" / "stage.json").read_text())
    assert manifest["status"] == "completed" and manifest["attempts"] == 2
    assert max_abs_diff(reference / "cls" / "final", killed / "cls" / "final") <= 1e-6
    # The baseline measured before the kill is kept, not measured again on the half-trained model.
    for key in ("cls/eval_accuracy_before", "cls/eval_accuracy", "cls/eval_macro_f1"):
        assert manifest["metrics"][key] == pytest.approx(expected["metrics"][key])
    assert json.loads((killed / "cls" / "confusion.json").read_text()) == \
        json.loads((reference / "cls" / "confusion.json").read_text())


def test_bad_row_stops_the_run_before_any_compute(tmp_path, tiny_bert_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "Fine.", "label": "positive"}\n{"text": "Awful.", "label": "negative"}\n'
                   '{"text": "Meh.", "label": "neutral"}\n')
    result = run_pipeline(*_args(tmp_path / "run", tiny_bert_dir, "--set", f"cls.data.train={bad}"), check=False)
    assert result.returncode != 0
    assert f"{bad}:3: field 'label' 'neutral' is not one of cls.labels: negative, positive" in \
        " ".join(result.stderr.split())
    assert not (tmp_path / "run" / "cls" / "stage.json").exists()
