"""cpt and sft through the real TRL SFTTrainer on the tiny random model: the CLI, artifacts, skip and re-run."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import REPO, load_safetensors_dir, run_pipeline

SMOKE = str(REPO / "configs" / "smoke.yaml")


def test_sft_alone_completes_and_final_adapter_generates(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    run_pipeline("run", "--config", SMOKE, "--stage", "sft", "--run-dir", str(run_dir),
                 "--set", "tracking.report_to=[wandb, tensorboard]")

    # Trackers: an offline W&B run named after the stage, with its id kept in the manifest; TensorBoard events.
    manifest = json.loads((run_dir / "sft" / "stage.json").read_text())
    assert list((run_dir / "wandb").glob(f"offline-run-*-{manifest['wandb_run_id']}"))
    assert list((run_dir / "sft" / "tensorboard").glob("events.out.tfevents.*"))

    status = json.loads(run_pipeline("status", "--run-dir", str(run_dir), "--json").stdout)
    assert status["stages"]["sft"]["status"] == "completed"
    assert status["stages"]["cpt"]["status"] == "pending"
    metrics = status["stages"]["sft"]["metrics"]
    assert metrics["eval/loss"] < metrics["eval/loss_before"]
    assert metrics["eval/perplexity"] == pytest.approx(math.exp(metrics["eval/loss"]))
    assert metrics["eval/perplexity"] < metrics["eval/perplexity_before"]
    assert metrics["eval/overfitting"] is False
    # The held-out answers against their references (8 in smoke), scored by sacrebleu and rouge-score.
    assert metrics["eval/references"] == 8 and all(0 <= metrics[k] <= 1 for k in ("eval/bleu", "eval/rouge1", "eval/rougeL"))
    assert metrics["data/dropped_too_long"] == 0
    lines = [json.loads(line) for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines if "loss" in line)

    # The adapter loads on the base model with plain transformers + peft and generates.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run_dir / "sft" / "final"
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "When do bees swarm?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    weights = load_safetensors_dir(final)
    assert weights and all(w.numel() > 0 for w in weights.values())
    assert any(name.endswith("lora_B.weight") and w.abs().sum() > 0 for name, w in weights.items())


CHAIN = ["--stage", "cpt", "--stage", "sft"]


def test_cpt_then_sft_chain_skip_and_rerun(tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), *CHAIN)
    cpt = json.loads((run_dir / "cpt" / "stage.json").read_text())
    sft = json.loads((run_dir / "sft" / "stage.json").read_text())
    assert cpt["status"] == sft["status"] == "completed"
    assert sft["init"]["adapter"] == str(run_dir / "cpt" / "final"), "sft must start from cpt's adapter"
    # cpt measured its held-out domain text and the shipped general text, before and after (forgetting).
    assert cpt["metrics"]["data/general_sequences"] > 0  # 12 documents cut into max_length blocks
    for key in ("eval/loss", "eval/perplexity", "eval/general_loss", "eval/general_perplexity"):
        assert math.isfinite(cpt["metrics"][key]) and math.isfinite(cpt["metrics"][f"{key}_before"])
    assert "eval/overfitting" in cpt["metrics"]
    assert (run_dir / "config.yaml").exists()

    # Unchanged: nothing runs again.
    plan = run_pipeline("plan", "--config", SMOKE, "--run-dir", str(run_dir), *CHAIN).stdout
    assert plan.count("skip") == 2
    run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), *CHAIN)
    assert json.loads((run_dir / "sft" / "stage.json").read_text())["attempts"] == 1

    # A changed cpt config re-runs cpt and, through its new output, sft; earlier results are kept in .history/.
    change = ["--set", "cpt.trainer.learning_rate=5e-4"]
    plan = run_pipeline("plan", "--config", SMOKE, "--run-dir", str(run_dir), *CHAIN, *change).stdout
    assert re.search(r"cpt\s+rerun", plan) and re.search(r"sft\s+rerun", plan)
    run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), *CHAIN, *change)
    history = sorted(p.name.split("-")[0] for p in (run_dir / ".history").iterdir())
    assert history == ["cpt", "sft"]
    new_sft = json.loads((run_dir / "sft" / "stage.json").read_text())
    assert new_sft["hashes"]["init"] != sft["hashes"]["init"]


def test_changed_config_refuses_to_resume_foreign_progress(tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline("run", "--config", SMOKE, "--stage", "sft", "--run-dir", str(run_dir), "--set", "sft.trainer.max_steps=2")
    manifest_path = run_dir / "sft" / "stage.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["status"] = "failed"
    manifest_path.write_text(json.dumps(manifest))
    result = run_pipeline("run", "--config", SMOKE, "--stage", "sft", "--run-dir", str(run_dir),
                          "--set", "sft.trainer.learning_rate=1e-4",
                          "--set", "sft.trainer.max_steps=2", check=False)
    assert result.returncode == 2
    assert "--fresh" in result.stderr and "config" in result.stderr
    run_pipeline("run", "--config", SMOKE, "--stage", "sft", "--run-dir", str(run_dir),
                 "--set", "sft.trainer.learning_rate=1e-4",
                 "--set", "sft.trainer.max_steps=2", "--fresh")
    assert json.loads(manifest_path.read_text())["status"] == "completed"


def test_packing_trains_on_padding_free_batches(tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline("run", "--config", SMOKE, "--stage", "sft", "--run-dir", str(run_dir),
                 "--set", "sft.trainer.packing=true", "--set", "sft.trainer.max_steps=3")
    metrics = json.loads((run_dir / "sft" / "stage.json").read_text())["metrics"]
    assert metrics["train/steps"] == 3 and metrics["eval/loss"] < metrics["eval/loss_before"]
    logged = [json.loads(line) for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    # Packed rows are filled up to max_length (256 in smoke) from several conversations: far more tokens per step
    # than the padded batch of 4 would hold.
    first = next(line for line in logged if "num_tokens" in line and "loss" in line)
    assert first["num_tokens"] > 4 * 200
