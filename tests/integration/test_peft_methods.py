"""Every PEFT method trains in sft on the tiny model and changes exactly the parameters it should."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO

import stages.lm
from pipeline.config import load_config
from pipeline.runner import Runner

SMOKE = REPO / "configs" / "smoke.yaml"
# What each method trains, by parameter name; everything else must stay exactly as it was.
TRAINED = {
    "lora": ("lora_A", "lora_B"),
    "prefix": ("prompt_encoder",),
    "prompt": ("prompt_encoder",),
    "p_tuning": ("prompt_encoder",),
    "ia3": ("ia3_l",),
    "full": ("",),
}
OPTIONS = {
    "lora": "{r: 4, lora_alpha: 8, target_modules: all-linear}",
    "prefix": "{num_virtual_tokens: 4}",
    "prompt": "{num_virtual_tokens: 4}",
    "p_tuning": "{num_virtual_tokens: 4, encoder_hidden_size: 32}",
    "ia3": "{target_modules: [k_proj, v_proj, down_proj], feedforward_modules: [down_proj]}",
    "full": "{}",
}


@pytest.mark.parametrize("method", list(TRAINED))
def test_peft_method_trains_exactly_its_parameters(tmp_path, monkeypatch, method):
    monkeypatch.chdir(REPO)
    config = load_config(SMOKE, [f"peft.method={method}", f"peft.options={OPTIONS[method]}",
                                 "sft.trainer.max_steps=4", "sft.trainer.learning_rate=1e-2"])
    seen = {}
    original = stages.lm.load_training_model

    def observe(ctx, tokenizer):  # keeps the model the stage trains, and a copy of its starting weights
        model, base = original(ctx, tokenizer)
        seen["model"] = model
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model, base

    monkeypatch.setattr(stages.lm, "load_training_model", observe)
    run_dir = tmp_path / "run"
    Runner(config, run_dir).run(["sft"])

    model, before = seen["model"], seen["before"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(key in n for key in TRAINED[method]) for n in trainable)
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        if name in trainable and method != "full":
            assert changed, f"{method}: trainable {name} did not change"
        if name not in trainable:
            assert not changed, f"{method}: frozen {name} changed"
    if method == "full":
        changed = [n for n in trainable if not torch.equal(model.get_parameter(n).detach(), before[n])]
        # Embedding rows of tokens never seen get no gradient, but every layer's weights must move.
        assert all(n in changed for n in trainable if "layers" in n)
        assert (run_dir / "sft" / "final" / "config.json").exists()
    else:
        adapter = json.loads((run_dir / "sft" / "final" / "adapter_config.json").read_text())
        assert adapter["peft_type"].lower() == {"prefix": "prefix_tuning", "prompt": "prompt_tuning"}.get(method, method)
    assert json.loads((run_dir / "sft" / "stage.json").read_text())["status"] == "completed"
