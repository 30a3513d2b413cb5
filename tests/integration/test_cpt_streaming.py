"""cpt on a streamed corpus (cpt.data.streaming) through the real SFTTrainer on the tiny model: validate reads a
sample, the run trains on an IterableDataset, and a run killed after a checkpoint resumes to the uninterrupted
run's weights (the trainer skips the batches already trained on by reading them again)."""

from __future__ import annotations

import gzip
import json

from conftest import REPO, kill_after_first_checkpoint, load_safetensors_dir, run_pipeline

SMOKE = str(REPO / "configs" / "smoke.yaml")
PARAGRAPHS = [p for p in (REPO / "data/cpt/beekeeping.txt").read_text().split("\n\n") if p.strip()]


def _args(run_dir, corpus) -> list[str]:
    return ["run", "--config", SMOKE, "--stage", "cpt", "--run-dir", str(run_dir),
            "--set", f"cpt.data.train={corpus}", "--set", "cpt.data.streaming=true", "--set", "cpt.data.bad_rows=drop",
            "--set", "cpt.data.eval_documents=4", "--set", "cpt.data.general_eval=",
            "--set", "cpt.trainer.max_steps=8", "--set", "cpt.trainer.save_steps=2",
            "--set", "cpt.trainer.eval_steps=4"]


def test_streamed_cpt_validates_and_resumes_after_sigkill_equal_to_uninterrupted(tmp_path):
    corpus = tmp_path / "corpus.jsonl.gz"
    # 40 documents, one of them bad: about 28 blocks of 128 tokens, so 8 steps of 4 read the corpus more than once.
    rows = [{"text": p} for p in PARAGRAPHS[:20]] + [{"text": None}] + [{"text": p} for p in PARAGRAPHS[20:40]]
    corpus.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    validated = run_pipeline("validate", *_args(reference, corpus)[1:]).stderr.replace("\n", " ")
    assert "streamed: the first 36 training documents" in validated and "4 held-out documents" in validated

    run_pipeline(*_args(reference, corpus))
    metrics = json.loads((reference / "cpt" / "stage.json").read_text())["metrics"]
    assert metrics["data/streamed"] is True and metrics["data/eval_records"] == 4
    assert metrics["train/steps"] == 8 and metrics["eval/loss"] < metrics["eval/loss_before"]
    assert metrics["data/dropped_bad_rows"] == 1  # met once, though the stream was read more than once

    newest = kill_after_first_checkpoint("cpt", killed, _args(killed, corpus))
    result = run_pipeline(*_args(killed, corpus))
    assert f"resuming from {newest}" in result.stderr.replace("\n", " ")
    manifest = json.loads((killed / "cpt" / "stage.json").read_text())
    assert manifest["status"] == "completed" and manifest["metrics"]["data/dropped_bad_rows"] == 1
    expected, actual = load_safetensors_dir(reference / "cpt" / "final"), load_safetensors_dir(killed / "cpt" / "final")
    assert expected.keys() == actual.keys()
    diff = max((expected[k] - actual[k]).abs().max().item() for k in expected)
    assert diff <= 1e-6, f"the resumed streamed run differs from the uninterrupted one by {diff}"
