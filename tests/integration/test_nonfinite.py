"""NaN and Inf stop a stage at the step they appear, naming it and the value; the newest complete checkpoint stays
the last good one and resumes; no NaN weights are ever saved (not in a checkpoint, not as final/).

Run in-process (the imports are the test process's own), with the NaN injected cheaply: a training step whose
gradients are poisoned, or a learning rate of inf (finite gradients, weights that overflow)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, load_safetensors_dir

from pipeline.artifacts import hash_path
from pipeline.cli import main

SMOKE = str(REPO / "configs" / "smoke.yaml")
# Short and without evaluation: what is tested is the training loop.
SFT = ["run", "--config", SMOKE, "--stage", "sft", "--set", "sft.trainer.max_steps=4", "--set",
       "sft.trainer.save_steps=2", "--set", "sft.data.eval_split=0", "--set", "evaluation.max_references=0"]


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def checkpoints(stage_dir) -> list[str]:
    return sorted(p.name for p in (stage_dir / "checkpoints").glob("checkpoint-*"))


def all_finite(directory) -> bool:
    tensors = load_safetensors_dir(directory)
    return bool(tensors) and all(torch.isfinite(t).all() for t in tensors.values())


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "")  # the runner points it at each stage; restored afterwards


def test_a_nan_gradient_stops_sft_at_its_step_and_the_good_checkpoint_resumes(tmp_path, capsys, monkeypatch, in_repo):
    from trl import SFTTrainer

    run_dir = tmp_path / "run"
    clean_step = SFTTrainer.training_step

    def poisoned_at_step_3(self, model, inputs, num_items_in_batch=None):
        loss = clean_step(self, model, inputs, num_items_in_batch)
        if self.state.global_step == 2:  # the third optimiser step: checkpoint-2 is already written
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter.grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(SFTTrainer, "training_step", poisoned_at_step_3)
    assert main([*SFT, "--run-dir", str(run_dir)]) == 2
    line = error_line(capsys)
    assert "sft: training stopped at step 3: the gradient norm is nan" in line
    stage = run_dir / "sft"
    manifest = json.loads((stage / "stage.json").read_text())
    assert manifest["status"] == "failed" and "step 3" in manifest["error"]
    assert checkpoints(stage) == ["checkpoint-2"] and (stage / "checkpoints" / "checkpoint-2" / "COMPLETE").exists()
    assert all_finite(stage / "checkpoints" / "checkpoint-2")
    assert not (stage / "final").exists()
    good = hash_path(stage / "checkpoints" / "checkpoint-2")

    monkeypatch.setattr(SFTTrainer, "training_step", clean_step)
    assert main([*SFT, "--run-dir", str(run_dir)]) == 0
    manifest = json.loads((stage / "stage.json").read_text())
    assert manifest["status"] == "completed" and manifest["resumed_from"] == "checkpoint-2"
    assert manifest["metrics"]["train/steps"] == 4 and all_finite(stage / "final")
    assert hash_path(stage / "checkpoints" / "checkpoint-2") == good


def test_an_infinite_learning_rate_stops_sft_before_any_checkpoint(tmp_path, capsys, in_repo):
    """Finite gradients, weights that overflow in the first update: caught after the optimiser step, before the
    checkpoint of that step (save_steps=1) is written."""
    run_dir = tmp_path / "run"
    assert main([*SFT, "--run-dir", str(run_dir), "--set", "sft.trainer.learning_rate=.inf",
                 "--set", "sft.trainer.save_steps=1"]) == 2
    line = error_line(capsys)
    assert "sft: training stopped at step 1: the weight" in line and "after the optimiser step is" in line
    assert checkpoints(run_dir / "sft") == [] and not (run_dir / "sft" / "final").exists()


def test_ppo_stops_on_a_nan_loss_and_saves_nothing(tmp_path, capsys, in_repo):
    run_dir = tmp_path / "run"
    code = main(["run", "--config", SMOKE, "--stage", "ppo", "--run-dir", str(run_dir), *(
        arg for item in ("ppo.reward.type=rule", "ppo.reward.function=reward.rules:specificity",
                         "ppo.data.eval_split=0", "ppo.trainer.max_steps=2", "ppo.trainer.save_steps=1",
                         "ppo.trainer.rollout_batch_size=4", "ppo.trainer.mini_batch_size=2",
                         "ppo.trainer.num_ppo_epochs=1", "ppo.trainer.learning_rate=.inf")
        for arg in ("--set", item))])
    assert code == 2
    line = error_line(capsys)
    assert "ppo: training stopped at step 1: the" in line and ("is nan" in line or "is inf" in line)
    assert checkpoints(run_dir / "ppo") == [] and not (run_dir / "ppo" / "final").exists()
    assert json.loads((run_dir / "ppo" / "stage.json").read_text())["status"] == "failed"
