"""A stage killed with SIGKILL after its first checkpoint resumes from it and ends equal to an uninterrupted run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import REPO, kill_after_first_checkpoint, load_safetensors_dir, run_pipeline

SMOKE = str(REPO / "configs" / "smoke.yaml")
# Long enough that the kill lands mid-run; a checkpoint every 2 steps.
LONG = ["--set", "{stage}.trainer.max_steps=12", "--set", "{stage}.trainer.save_steps=2"]


def _args(stage: str, run_dir) -> list[str]:
    return ["run", "--config", SMOKE, "--stage", stage, "--run-dir", str(run_dir), *(a.format(stage=stage) for a in LONG)]


@pytest.mark.parametrize("stage", ["sft", "cpt"])
def test_sigkill_then_rerun_resumes_and_matches_uninterrupted(tmp_path, stage):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_pipeline(*_args(stage, reference))

    kill_after_first_checkpoint(stage, killed, _args(stage, killed))
    status = json.loads(run_pipeline("status", "--run-dir", str(killed), "--json").stdout)["stages"][stage]
    assert status["status"] == "interrupted"
    newest = status["newest_checkpoint"]
    assert newest is not None

    # A half-written checkpoint (no completion marker) must never be picked.
    decoy = killed / stage / "checkpoints" / "checkpoint-19"
    decoy.mkdir()
    (decoy / "trainer_state.json").write_text("{}")

    result = run_pipeline(*_args(stage, killed))
    assert f"resuming from {newest}" in result.stderr.replace("\n", " ")
    manifest = json.loads((killed / stage / "stage.json").read_text())
    assert manifest["status"] == "completed" and manifest["resumed_from"] == newest and manifest["attempts"] == 2
    assert not decoy.exists(), "the partial checkpoint is moved to .history/, not resumed from"

    expected, actual = load_safetensors_dir(reference / stage / "final"), load_safetensors_dir(killed / stage / "final")
    assert expected.keys() == actual.keys()
    diff = max((expected[k] - actual[k]).abs().max().item() for k in expected)
    assert diff <= 1e-6, f"resumed {stage} differs from the uninterrupted run by {diff}"
    assert any(torch.count_nonzero(t) for t in actual.values())


def test_resume_from_the_last_checkpoint_trains_no_further_step(tmp_path):
    """A stage preempted after its last checkpoint but before final/ was written (during the final evaluation, say)
    resumes straight to evaluation and saving: transformers alone would train one step past max_steps."""
    args = ["run", "--config", SMOKE, "--stage", "sft", "--run-dir", str(tmp_path),
            "--set", "sft.trainer.max_steps=4", "--set", "sft.trainer.save_steps=2"]
    run_pipeline(*args)
    stage_dir = tmp_path / "sft"
    finished = json.loads((stage_dir / "stage.json").read_text())
    expected = load_safetensors_dir(stage_dir / "final")
    # What a kill between the last checkpoint and the end leaves: the manifest still says running, no final/.
    shutil.rmtree(stage_dir / "final")
    (stage_dir / "stage.json").write_text(json.dumps({**finished, "status": "running"}))

    result = run_pipeline(*args)
    assert "resuming from checkpoint-4" in result.stderr.replace("\n", " ")
    manifest = json.loads((stage_dir / "stage.json").read_text())
    assert manifest["status"] == "completed" and manifest["metrics"]["train/steps"] == 4
    assert sorted(p.name for p in (stage_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert manifest["metrics"]["train/loss"] == pytest.approx(finished["metrics"]["train/loss"], abs=1e-3)
    assert manifest["metrics"]["eval/loss"] == pytest.approx(finished["metrics"]["eval/loss"], abs=1e-6)
    actual = load_safetensors_dir(stage_dir / "final")
    assert max((expected[k] - actual[k]).abs().max().item() for k in expected) == 0
