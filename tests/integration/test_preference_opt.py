"""dpo, kto, orpo and simpo (the stages preference_opt.py shares) through the CLI on the tiny model, in as few
pipeline runs as their claims need:

- one run, sft then all four with LoRA and the evaluation: each starts from sft's result, trains its adapter, is
  compared with sft on held-out prompts, and is in the report with its headline;
- the same four killed with SIGKILL after their first checkpoint, one after another in one chain of runs: each
  resumes from it and ends equal to the uninterrupted run above;
- full fine-tuning from sft's adapter (init_from): every layer trains, and kto's reference is the starting policy
  (its held-out reward margin before training is exactly 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO, assert_adapter_changes_output, kill_after_first_checkpoint, load_safetensors_dir, max_abs_diff, run_pipeline,
)

SMOKE = str(REPO / "configs" / "smoke.yaml")
NEW = ("dpo", "kto", "orpo", "simpo")
# Four steps with a checkpoint every two, so a kill after the first checkpoint lands mid-stage.
STEPS = [f"--set={name}.trainer.{key}={value}" for name in NEW for key, value in (("max_steps", 4), ("save_steps", 2))]


def _args(run_dir, *extra) -> list[str]:
    return ["run", "--config", SMOKE, "--run-dir", str(run_dir), "--stage", "sft", "--stage", "preferences",
            *(f"--stage={name}" for name in NEW), "--set", "sft.trainer.max_steps=2", *STEPS, *extra]


def _manifest(run_dir, stage) -> dict:
    return json.loads((run_dir / stage / "stage.json").read_text())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("prefopt") / "run"
    run_pipeline(*_args(run_dir, "--set", "evaluation.max_prompts=2"))
    return run_dir


def test_each_stage_trains_from_sft_is_compared_with_it_and_reported(lora_run):
    markdown = (lora_run / "report.md").read_text()
    for name in NEW:
        manifest = _manifest(lora_run, name)
        metrics = manifest["metrics"]
        assert manifest["status"] == "completed" and metrics["train/steps"] == 4
        assert manifest["init"]["description"] == "sft's final adapter"
        assert manifest["base_model"] == str(lora_run / name / "base")  # sft's adapter, merged in
        adapter = load_safetensors_dir(lora_run / name / "final")
        lora_b = [t for key, t in adapter.items() if "lora_B" in key]
        assert lora_b and all(torch.count_nonzero(t) for t in lora_b), f"{name}: a LoRA B is still at zero"
        assert not list((lora_run / name / "final").glob("*/adapter_config.json")), "one adapter, no copy of it"
        assert_adapter_changes_output(manifest["base_model"], lora_run / name / "final")
        # Compared with sft on the held-out prompts, by the runner on the saved result.
        assert metrics["eval/wins"] + metrics["eval/ties"] + metrics["eval/losses"] == 2
        assert metrics["eval/kl_to_start"] is not None
        losses = [row["loss"] for row in map(json.loads, (lora_run / name / "metrics.jsonl").read_text().splitlines())
                  if "loss" in row]
        assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
        assert isinstance(metrics["eval/overfitting"], bool)
        [stage_row, win_row] = [line for line in markdown.splitlines() if line.startswith(f"| {name} |")][-2:]
        assert f"| {metrics['eval/win_rate']:.1%} |" in win_row
        if name == "kto":  # unpaired rows: a margin between desirable and undesirable, no pairwise accuracy
            assert metrics["data/train_rows"] + metrics["data/eval_rows"] == 360  # the 180 labelled pairs, unpaired
            assert metrics["kto/eval_margin_before"] == pytest.approx(0, abs=1e-6)  # the policy is its reference
            assert "held-out reward margin" in stage_row and f"→ {metrics['kto/eval_margin']:.3f}" in stage_row
        else:
            assert metrics["data/train_pairs"] + metrics["data/eval_pairs"] == 180
            assert 0 <= metrics[f"{name}/eval_accuracy"] <= 1
            if name == "dpo":  # measured before training too
                assert 0 <= metrics["dpo/eval_accuracy_before"] <= 1
            assert f"→ {metrics[f'{name}/eval_accuracy']:.3f}" in stage_row


def test_each_stage_killed_resumes_and_matches_the_uninterrupted_run(lora_run, tmp_path):
    """One chain: a run killed in dpo; the next resumes dpo and is killed in kto; then in orpo, in simpo; the last
    finishes."""
    killed = tmp_path / "killed"
    args = _args(killed, "--set", "evaluation.prompts=")  # the evaluation changes no weights; the chain skips it
    newest = {name: kill_after_first_checkpoint(name, killed, args) for name in NEW}
    result = run_pipeline(*args)
    assert f"resuming from {newest['simpo']}" in " ".join(result.stderr.split())
    for name in NEW:
        manifest = _manifest(killed, name)
        assert manifest["status"] == "completed" and manifest["resumed_from"] == newest[name]
        assert manifest["metrics"]["train/steps"] == 4
        diff = max_abs_diff(lora_run / name / "final", killed / name / "final")
        assert diff <= 1e-6, f"resumed {name} differs from the uninterrupted run by {diff}"


def test_full_fine_tuning_from_sft_s_adapter_trains_every_layer(lora_run, tmp_path):
    run_dir = tmp_path / "full"
    run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), *(f"--stage={name}" for name in NEW),
                 "--stage", "preferences", "--set", "peft.method=full", "--set", "peft.options={}",
                 *(f"--set={name}.{key}={value}" for name in NEW for key, value in
                   (("init_from", lora_run / "sft" / "final"), ("trainer.max_steps", 2))),
                 "--set", "evaluation.prompts=")
    for name in NEW:
        start, final = run_dir / name / "base", run_dir / name / "final"
        assert (final / "config.json").exists() and not (final / "adapter_config.json").exists()
        before, after = load_safetensors_dir(start), load_safetensors_dir(final)
        layers = [key for key in before if ".layers." in key]
        assert layers and all(not torch.equal(before[key], after[key]) for key in layers), f"{name}: a layer is unchanged"
    # The frozen reference is the starting policy (sft's adapter merged), not the base the adapter was trained on.
    assert _manifest(run_dir, "kto")["metrics"]["kto/eval_margin_before"] == pytest.approx(0, abs=1e-6)
