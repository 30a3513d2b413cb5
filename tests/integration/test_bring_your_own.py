"""A user's own model and data, as they are: a Hub model id and Hub datasets (offline, from caches this test builds),
OpenAI-shaped chats with a few bad rows, UltraFeedback-shaped pairs with ties, through sft and dpo in one run; what
`validate` says matches what the run does; the result exported loads in plain transformers with the same logits."""

from __future__ import annotations

import gzip
import json
import re

import pytest
from conftest import REPO, build_hub_dataset_cache, build_hub_model_cache, run_pipeline

SMOKE = str(REPO / "configs" / "smoke.yaml")
BAD_ROWS = 3
TIES = 4


def _parts(text: str) -> list[dict]:
    return [{"type": "text", "text": text}]


def _chats() -> list[dict]:
    """40 of the shipped sft conversations with content as lists of parts (OpenAI's shape), and three bad rows."""
    records = [json.loads(line) for line in (REPO / "data/sft/beekeeping_qa.jsonl").read_text().splitlines()[:40]]
    for record in records[::2]:
        record["messages"] = [{**m, "content": _parts(m["content"])} for m in record["messages"]]
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
    records[5:5] = [{"messages": [user, answer], "label": False},                                    # KTO: undesirable
                    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                                  answer]},                                                           # an image part
                    {"messages": [user]}]                                                             # no answer
    return records


def _prefs() -> list[dict]:
    """UltraFeedback-shaped pairs: whole conversations with scores; the first TIES ties have equal scores."""
    rows, ties = [], 0
    for line in (REPO / "data/preferences/beekeeping_pairs.jsonl").read_text().splitlines():
        pair = json.loads(line)
        tie = pair["winner"] == "tie"
        if (ties if tie else len(rows) - ties) == (TIES if tie else 60 - TIES):
            continue
        ties += tie
        chosen, rejected = ((pair["response_b"], pair["response_a"]) if pair["winner"] == "b"
                            else (pair["response_a"], pair["response_b"]))
        prompt = [{"role": "user", "content": pair["prompt"]}]
        rows.append({"prompt": pair["prompt"], "prompt_id": str(len(rows)),
                     "chosen": [*prompt, {"role": "assistant", "content": chosen}],
                     "rejected": [*prompt, {"role": "assistant", "content": rejected}],
                     "score_chosen": 7.0 if tie else 9.0, "score_rejected": 7.0 if tie else 3.0})
    assert len(rows) == 60 and ties == TIES
    return rows


@pytest.fixture(scope="module")
def byo(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("byo")
    snapshot = build_hub_model_cache(root / "hub", "acme/tiny-chat", tiny_model_dir)
    build_hub_dataset_cache(root / "datasets", "acme/chats", {"train": _chats()})
    build_hub_dataset_cache(root / "datasets", "acme/prefs", {"train_prefs": _prefs()})
    extra = root / "extra.jsonl.gz"
    extra.write_bytes(gzip.compress(b"".join(
        json.dumps({"conversations": [{"from": "human", "value": f"Question {i}?"},
                                      {"from": "gpt", "value": f"Answer {i}."}]}).encode() + b"\n" for i in range(4))))
    env = {"HF_HUB_CACHE": str(root / "hub"), "HF_DATASETS_CACHE": str(root / "datasets"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    run_dir = root / "run"
    args = ["--config", SMOKE, "--run-dir", str(run_dir), "--stage", "sft", "--stage", "dpo",
            "--set", "model.name_or_path=acme/tiny-chat", "--set", "model.revision=main",
            "--set", f"sft.data.train=[{{name: acme/chats}}, {{path: {extra}, weight: 2}}]",
            "--set", "sft.data.bad_rows=drop", "--set", "sft.trainer.max_steps=2",
            "--set", "dpo.data.train={name: acme/prefs, split: train_prefs}", "--set", "dpo.trainer.max_length=150",
            "--set", "dpo.trainer.max_steps=2", "--set", "evaluation.prompts=", "--set", "evaluation.max_references=0"]
    import os

    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        validated = run_pipeline("validate", *args)
        run_pipeline("run", *args)
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    manifests = {name: json.loads((run_dir / name / "stage.json").read_text()) for name in ("sft", "dpo")}
    return {"run_dir": run_dir, "snapshot": snapshot, "validated": " ".join(validated.stderr.split()),
            "manifests": manifests, "env": env}


def test_hub_model_and_datasets_through_sft_and_dpo(byo):
    sft, dpo = byo["manifests"]["sft"], byo["manifests"]["dpo"]
    assert sft["status"] == dpo["status"] == "completed"
    assert sft["base_model"] == str(byo["snapshot"])  # the Hub id at main, as the commit's snapshot
    adapter = json.loads((byo["run_dir"] / "sft" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(byo["snapshot"])
    # 40 good chats from the Hub dataset and the local .jsonl.gz's 4 twice; the 3 bad rows left out and counted.
    metrics = sft["metrics"]
    assert metrics["data/dropped_bad_rows"] == BAD_ROWS
    assert metrics["data/train_records"] + metrics["data/eval_records"] == 40 + 4 * 2
    assert dpo["metrics"]["data/dropped_ties"] == TIES


def test_validate_reports_the_numbers_the_run_then_reports(byo):
    found = re.search(r"dpo: (\d+) train / (\d+) eval pairs -> (\d+) / (\d+) within max_length=150; (\d+) longer",
                      byo["validated"])
    assert found, byo["validated"][-2000:]
    train, held_out, kept_train, kept_eval, too_long = map(int, found.groups())
    metrics = byo["manifests"]["dpo"]["metrics"]
    assert too_long > 0, "the test's max_length must leave some pairs out"
    assert (metrics["data/train_pairs"], metrics["data/eval_pairs"], metrics["data/dropped_too_long"]) == (
        kept_train, kept_eval, too_long)
    assert train + held_out + TIES == 60
    assert f"left out: {TIES} ties" in byo["validated"]
    assert "sft.data: 3 bad rows left out" in byo["validated"] or "3 bad rows" in byo["validated"]
    assert "its default 'You are a helpful AI assistant named SmolLM" in byo["validated"]


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_export_merged_loads_in_plain_transformers_with_the_same_logits(byo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.cli import main
    from pipeline.export import load_result

    out = tmp_path / "dpo-model"
    assert main(["export", "--run-dir", str(byo["run_dir"]), "--stage", "dpo", "--out", str(out)]) == 0
    assert not (out / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded, tokenizer, _ = load_result(byo["run_dir"], "dpo")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "When do bees swarm?"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (_logits(plain, ids) - _logits(loaded, ids)).abs().max().item() <= 1e-6
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template
    assert main(["export", "--run-dir", str(byo["run_dir"]), "--stage", "dpo", "--out", str(out)]) == 2  # not over


def test_export_adapter_only_names_its_hub_base(byo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.cli import main
    from pipeline.export import load_result

    out = tmp_path / "sft-adapter"
    assert main(["export", "--run-dir", str(byo["run_dir"]), "--stage", "sft", "--out", str(out),
                 "--adapter-only"]) == 0
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "acme/tiny-chat"
    assert adapter_config["revision"] == byo["snapshot"].name
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(byo["snapshot"]), out).eval()
    loaded, tokenizer, _ = load_result(byo["run_dir"], "sft")
    ids = tokenizer("Varroa mites in spring", add_special_tokens=False)["input_ids"]
    assert (_logits(peft_model, ids) - _logits(loaded, ids)).abs().max().item() <= 1e-5


def test_generate_answers_a_prompt_file(byo, tmp_path):
    from pipeline.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "How many frames in a hive?"}\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--run-dir", str(byo["run_dir"]), "--stage", "sft", "--prompts", str(prompts),
                 "--out", str(out), "--max-new-tokens", "6"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["prompt"][-1]["content"] for a in answers] == ["How many frames in a hive?", "Hi"]
    assert all(isinstance(a["response"], str) for a in answers) and answers[1]["source"] == f"{prompts}:2"
    assert not out.with_name("answers.jsonl.progress").exists()


def test_chat_streams_and_remembers_the_conversation_in_a_terminal(byo):
    import sys

    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "pipeline", "chat", "--run-dir", str(byo["run_dir"]), "--stage",
                                           "sft", "--max-new-tokens", "6", "--temperature", "0"],
                          cwd=str(REPO), encoding="utf-8", timeout=120)
    try:
        child.expect_exact("you> ")
        for turn in ("Hello there", "And the second question?"):
            child.sendline(turn)
            child.expect_exact("bot> ")
            child.expect_exact("you> ")
        child.sendline("/history")
        child.expect_exact("you> ")
        history = child.before
        assert history.index("[user] Hello there") < history.index("[assistant]") < history.index(
            "[user] And the second question?")
        assert history.count("[assistant]") == 2
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
