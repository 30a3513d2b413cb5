"""The embedded SmolLM2-135M-Instruct through README's demo config (fewer steps): every stage, real weights."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, run_pipeline

# The contrastive judge's Cohen's kappa with the person on the first 24 shipped pairs, measured at 0.745 in bfloat16
# with the demo's follow/violation wording (0.795 on the first 48, 0.765 on all 192: README, the judges). The floor is
# the target we set for the AI judge (issue 12); one more disagreement in 24 would fall under it.
KAPPA_FLOOR = 0.7


@pytest.mark.timeout(2700)  # six stages of a 135M model on two CPU cores: ~10 minutes, 30 when the cores are shared
def test_demo_config_runs_every_stage_on_the_embedded_model(tmp_path):
    run_dir = tmp_path / "demo"
    probe = tmp_path / "cue_probe.jsonl"  # the rm's cue probe on 8 of its 48 pairs
    probe.write_text("\n".join((REPO / "data/preferences/cue_probe_pairs.jsonl").read_text().splitlines()[:8]) + "\n")
    # Few steps, small batches and held-out sets, short generations: this checks that every stage works on real
    # weights; the demo's numbers come from README's full run.
    run_pipeline("run", "--run-dir", str(run_dir), "--set", "cpt.trainer.max_steps=2",
                 "--set", "cpt.data.eval_split=0.05", "--set", "cpt.trainer.per_device_train_batch_size=2",
                 "--set", "sft.trainer.max_steps=6", "--set", "sft.trainer.per_device_train_batch_size=4",
                 "--set", "sft.data.eval_split=0.03",
                 "--set", "rm.trainer.max_steps=2", "--set", "rm.data.eval_split=0.05",
                 "--set", "rm.trainer.per_device_train_batch_size=2", "--set", f"rm.data.probes={{cue: {probe}}}",
                 "--set", "dpo.trainer.max_steps=2", "--set", "dpo.data.eval_split=0.02",
                 "--set", "dpo.trainer.per_device_train_batch_size=2",
                 "--set", "ppo.trainer.max_steps=2", "--set", "ppo.trainer.critic_warmup_steps=1",
                 "--set", "ppo.trainer.max_new_tokens=16",
                 "--set", "ppo.trainer.rollout_batch_size=4", "--set", "ppo.trainer.mini_batch_size=2",
                 "--set", "evaluation.max_prompts=4", "--set", "evaluation.max_new_tokens=16",
                 "--set", "evaluation.max_references=4")
    preferences = json.loads((run_dir / "preferences" / "stage.json").read_text())
    rm = json.loads((run_dir / "rm" / "stage.json").read_text())
    assert preferences["status"] == rm["status"] == "completed"
    assert preferences["metrics"]["agreement/raw"] == 1.0  # the judge is the human file it is compared with
    assert rm["init"]["adapter"].endswith("sft/final") and rm["base_model"].endswith("rm/base")
    assert 0 <= rm["metrics"]["rm/eval_accuracy"] <= 1
    assert 0 <= rm["metrics"]["rm/probe_cue_accuracy_before"] <= 1 and 0 <= rm["metrics"]["rm/probe_cue_accuracy"] <= 1
    dpo = json.loads((run_dir / "dpo" / "stage.json").read_text())
    assert dpo["status"] == "completed" and dpo["base_model"].endswith("dpo/base")
    assert dpo["metrics"]["eval/wins"] + dpo["metrics"]["eval/ties"] + dpo["metrics"]["eval/losses"] == 4
    assert 0 <= dpo["metrics"]["eval/measure_after"] <= 1
    # The demo's second judge, one that trained neither policy, and the interval around each win rate.
    for key in ("eval/contrastive/win_rate", "eval/win_rate_low", "eval/contrastive/win_rate_high"):
        assert 0 <= dpo["metrics"][key] <= 1, key
    assert "Did it align?" in (run_dir / "report.md").read_text()
    ppo = json.loads((run_dir / "ppo" / "stage.json").read_text())
    assert ppo["status"] == "completed" and ppo["metrics"]["train/steps"] == 2
    assert 0 <= ppo["metrics"]["eval/win_rate"] <= 1
    cpt = json.loads((run_dir / "cpt" / "stage.json").read_text())
    sft = json.loads((run_dir / "sft" / "stage.json").read_text())
    assert cpt["status"] == sft["status"] == "completed"
    assert sft["init"]["adapter"].endswith("cpt/final")
    assert sft["metrics"]["eval/loss"] < sft["metrics"]["eval/loss_before"]
    assert list((run_dir / "sft" / "tensorboard").glob("events.out.tfevents.*"))

    # The fine-tuned model answers and stops at its end-of-turn token.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run_dir / "sft" / "final"
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How often should I inspect a hive?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=120, do_sample=False)
    answer = out[0, prompt["input_ids"].shape[1]:]
    assert tokenizer.eos_token_id in answer.tolist(), tokenizer.decode(answer)
    assert len(tokenizer.decode(answer, skip_special_tokens=True).split()) >= 5


@pytest.mark.parametrize("judge", ["contrastive", "llm"])
def test_one_key_swaps_the_human_labels_for_smollm2_as_judge(tmp_path, judge):
    """RLHF to RLAIF: the demo's preferences with one key changed, SmolLM2-135M-Instruct judging pairs the person
    labelled, reported against the person's labels (the first 24 of the 192 pairs, to keep CI short). The
    contrastive judge agrees with the person; the A/B-reading llm judge shows its position prior, removed."""
    subset = tmp_path / "pairs.jsonl"
    lines = (REPO / "data" / "preferences" / "beekeeping_pairs.jsonl").read_text().splitlines()
    subset.write_text("\n".join(lines[:24]) + "\n")
    run_dir = tmp_path / "demo"
    run_pipeline("run", "--run-dir", str(run_dir), "--stage", "preferences", "--set", f"preferences.judge.type={judge}",
                 "--set", f"preferences.pairs={subset}", "--set", f"preferences.compare_with={subset}")
    manifest = json.loads((run_dir / "preferences" / "stage.json").read_text())
    metrics = manifest["metrics"]
    assert manifest["status"] == "completed" and metrics["agreement/pairs"] == 24
    [labels] = (run_dir / "labels").glob(f"{judge}-*.jsonl")
    assert len(labels.read_text().splitlines()) == 24
    agreement = json.loads((run_dir / "preferences" / "final" / "agreement.json").read_text())
    assert sum(row["pairs"] for row in agreement["calibration"]) > 0 and 0 <= metrics["agreement/ece"] <= 1
    if judge == "contrastive":
        assert metrics["agreement/kappa"] >= KAPPA_FLOOR, metrics
    else:
        assert 0 <= metrics["preferences/order_flip_rate"] <= 1
        assert metrics["preferences/position_bias"] != 0
        assert metrics["agreement/kappa"] is None or -1 <= metrics["agreement/kappa"] <= 1
