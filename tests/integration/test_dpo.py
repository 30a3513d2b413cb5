"""The dpo stage through the CLI on the tiny model: trains on the preferences stage's pairs with the reference as
the same weights with the adapter off. (Killed and resumed, from sft, full fine-tuning: test_preference_opt.py,
with kto, orpo and simpo, which share its steps.)"""

from __future__ import annotations

import json

import torch
from conftest import REPO, assert_adapter_changes_output, load_safetensors_dir, run_pipeline

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _args(run_dir, *extra) -> list[str]:
    return ["run", "--config", SMOKE, "--run-dir", str(run_dir), "--stage", "preferences", "--stage", "dpo", *extra]


def test_dpo_trains_a_lora_adapter_against_its_own_base(tmp_path):
    run_pipeline(*_args(tmp_path / "run"))
    manifest = json.loads((tmp_path / "run" / "dpo" / "stage.json").read_text())
    assert manifest["status"] == "completed"
    metrics = manifest["metrics"]
    assert metrics["data/train_pairs"] + metrics["data/eval_pairs"] == 180  # the 12 ties are not pairs to learn from
    assert 0 <= metrics["dpo/eval_accuracy"] <= 1 and metrics["dpo/eval_accuracy_before"] is not None
    assert isinstance(metrics["eval/overfitting"], bool)
    adapter = load_safetensors_dir(tmp_path / "run" / "dpo" / "final")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(t) for t in lora_b), "every LoRA B matrix moved off its zero init"

    # The adapter reloads with plain PEFT on the recorded base: the reference is that base alone.
    assert_adapter_changes_output(manifest["base_model"], tmp_path / "run" / "dpo" / "final")
