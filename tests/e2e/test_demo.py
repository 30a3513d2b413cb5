"""The embedded SmolLM2-135M-Instruct through README's demo config (fewer steps): cpt then sft, real weights."""

from __future__ import annotations

import json

from conftest import REPO, run_pipeline


def test_demo_config_runs_cpt_then_sft_on_the_embedded_model(tmp_path):
    run_dir = tmp_path / "demo"
    run_pipeline("run", "--run-dir", str(run_dir), "--set", "cpt.trainer.max_steps=4",
                 "--set", "sft.trainer.max_steps=6")
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
