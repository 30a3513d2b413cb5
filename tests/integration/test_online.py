"""The grpo and rloo stages (TRL's GRPOTrainer and RLOOTrainer) through the CLI on the tiny random model: from sft's
result with LoRA, rewarded by ppo's reward builder (an AI judge, pointwise and pairwise), compared with the policy
they started from and reported; under full fine-tuning, killed and resumed to the same weights as an uninterrupted
run (across epochs of the prompts); and what they cannot do refused before any compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO, assert_adapter_changes_output, kill_after_first_checkpoint, load_safetensors_dir, max_abs_diff, run_pipeline,
)

SMOKE = str(REPO / "configs" / "smoke.yaml")
STAGES = ("grpo", "rloo")
PIPELINE_ENV = {"PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1"}  # as in test_ppo.py
RULE = "rules_for_tests:distinct_trigrams"
# rloo's pairwise reward: the shorter response (in characters) wins. The starting policy samples near-uniformly from the
# tiny model's 2,048 tokens, so almost every response has only distinct trigrams and ties or beats its reference on
# distinct_trigrams alike: every group's rewards were equal and no step had a gradient. Lengths in characters differ,
# and rloo samples four responses to each of two prompts a step, so a group whose four verdicts are all equal is rare.
PAIRWISE_RULE = "rules_for_tests:shorter"


@pytest.fixture(autouse=True)
def pipeline_env(monkeypatch):
    for key, value in PIPELINE_ENV.items():
        monkeypatch.setenv(key, value)


def manifest(run_dir, stage) -> dict:
    return json.loads((Path(run_dir) / stage / "stage.json").read_text())


def logged(run_dir, stage, key) -> dict[int, float]:
    """{step: value} of a metric in metrics.jsonl; a step an interrupted attempt logged and its resume logged again
    keeps the resume's."""
    rows = [json.loads(line) for line in (Path(run_dir) / stage / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if row.get(key) is not None}


def sets(*settings: str) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


@pytest.fixture(scope="module")
def from_sft(tmp_path_factory):
    """One run: sft, then grpo rewarded by the contrastive judge's score of each response (pointwise) and rloo by a
    rule comparing each response with the reference policy's response to the same prompt (pairwise), both from sft's
    adapter with LoRA, two steps each."""
    run_dir = tmp_path_factory.mktemp("online") / "run"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in PIPELINE_ENV.items():
            patch.setenv(key, value)
        run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), "--stage", "sft", "--stage", "grpo",
                     "--stage", "rloo", *sets(
                         "sft.trainer.max_steps=2", "evaluation.max_prompts=2",
                         "grpo.reward.type=judge", "grpo.reward.judge.type=contrastive",
                         "grpo.reward.judge.violation=Be vague.",
                         "rloo.reward.type=judge", "rloo.reward.pairwise=true", "rloo.reward.judge.type=rule",
                         f"rloo.reward.judge.function={PAIRWISE_RULE}",
                         "rloo.trainer.num_generations=4", "rloo.trainer.per_device_train_batch_size=8",
                         *(f"{stage}.trainer.max_steps=2" for stage in STAGES)))
    return run_dir


@pytest.mark.parametrize("stage", STAGES)
def test_from_sft_every_adapter_weight_trains_and_the_result_is_compared_with_sft(from_sft, stage):
    from peft import get_peft_model
    from transformers import set_seed

    from pipeline.config import ModelConfig, load_config
    from pipeline.context import ModelSource
    from pipeline.models import load_causal_lm, load_policy, load_tokenizer, peft_config_for

    m = manifest(from_sft, stage)
    assert m["status"] == "completed" and m["metrics"]["train/steps"] == 2
    assert m["init"]["adapter"] == str(from_sft / "sft" / "final")
    # The reference (the base TRL's adapter switches off) is exactly sft's policy, merged into <stage>/base.
    assert m["base_model"] == str(from_sft / stage / "base")
    model_cfg = ModelConfig("tiny-random-smollm2")
    sft = ModelSource.of_stage(from_sft / "sft")
    tokenizer = load_tokenizer(model_cfg, sft.base)
    ids = torch.tensor([tokenizer("Bees make honey in summer.")["input_ids"]])
    with torch.no_grad():
        expected = load_policy(sft.base, sft.adapter, model_cfg, tokenizer)(input_ids=ids).logits
        actual = load_causal_lm(Path(m["base_model"]), model_cfg, tokenizer)(input_ids=ids).logits
    assert (expected - actual).abs().max().item() < 1e-5

    # Every adapter weight moved from where TRL started it (seeded with the run's seed before it adds the adapter).
    config = load_config(SMOKE)
    start = load_causal_lm(Path(m["base_model"]), model_cfg, tokenizer)
    set_seed(config.seed)
    start = get_peft_model(start, peft_config_for(config.peft))
    initial = {name.replace(".default", ""): param for name, param in start.named_parameters() if param.requires_grad}
    trained = load_safetensors_dir(from_sft / stage / "final")
    assert trained.keys() == initial.keys()
    unchanged = [name for name in trained if torch.equal(trained[name], initial[name])]
    assert unchanged == [], f"{len(unchanged)} of {len(trained)} adapter tensors did not change: {unchanged[:3]}"
    assert_adapter_changes_output(m["base_model"], from_sft / stage / "final")

    # Tracked: a reward per step in metrics.jsonl, its first and last in stage.json, the held-out reward before and
    # after, and the comparison with the starting policy the runner makes (evaluation:).
    rewards = logged(from_sft, stage, "reward")
    assert sorted(rewards) == [1, 2]
    metrics = m["metrics"]
    assert (metrics[f"{stage}/reward_mean_first"], metrics[f"{stage}/reward_mean"]) == (rewards[1], rewards[2])
    assert metrics["eval/score_mean_before"] is not None and metrics["eval/score_mean"] is not None
    assert metrics["eval/wins"] + metrics["eval/ties"] + metrics["eval/losses"] == 2
    assert metrics["eval/kl_to_start"] is not None and (from_sft / stage / "eval_samples.jsonl").exists()
    report = (from_sft / "report.md").read_text()
    assert f"## {stage.upper()}: reward and KL" in report and f"| {stage} |" in report


def samples(run_dir, stage) -> list[dict]:
    """The responses of samples.jsonl's tables (one per logged step) with their step."""
    tables = [json.loads(line) for line in (run_dir / stage / "samples.jsonl").read_text().splitlines()]
    return [{"step": table["step"], **row} for table in tables for row in table["samples"]]


def test_grpo_is_rewarded_by_the_contrastive_judge_s_score_of_each_response(from_sft):
    from pipeline.config import ModelConfig
    from reward.contrastive_judge import ContrastiveJudge

    rows = samples(from_sft, "grpo")
    assert [row["step"] for row in rows] == [1] * 4 + [2] * 4  # 2 prompts x 2 responses per step
    prompts, responses = [row["prompt"] for row in rows], [row["response"] for row in rows]
    judge = ContrastiveJudge.from_path(Path(manifest(from_sft, "grpo")["init"]["base"]),
                                       ModelConfig("tiny-random-smollm2"), violation="Be vague.")
    assert [row["score"] for row in rows] == pytest.approx(judge.score(prompts, responses), abs=1e-4)


def test_rloo_is_rewarded_by_a_judge_s_verdict_against_the_reference_policy_s_response(from_sft):
    """A rule gives no confidence: a win is +1, a loss -1, equal scores 0. The reference responses are sampled once,
    one per distinct prompt (training and held-out), from the starting policy."""
    from rules_for_tests import shorter

    from pipeline.config import load_config
    from stages.online import REFERENCE_FILE, prompt_key
    from stages.rloo import load

    train, held_out = load(load_config(SMOKE))
    unique = list({prompt_key(p): p for p in train + held_out}.values())
    batches = sorted((json.loads(line) for line in (from_sft / "rloo" / REFERENCE_FILE).read_text().splitlines()),
                     key=lambda batch: batch["batch"])
    references = [responses[0] for batch in batches for responses in batch["responses"]]
    assert len(references) == len(unique)
    reference = dict(zip(map(prompt_key, unique), references))

    def sign(x):
        return float((x > 0) - (x < 0))

    rows = samples(from_sft, "rloo")
    assert [row["step"] for row in rows] == [1] * 8 + [2] * 8  # 2 prompts x 4 responses per step
    expected = [sign(shorter(row["prompt"], row["response"])
                     - shorter(row["prompt"], reference[prompt_key(row["prompt"])])) for row in rows]
    assert [row["score"] for row in rows] == pytest.approx(expected)


def test_full_fine_tuning_killed_then_rerun_resumes_each_stage_to_the_uninterrupted_result(tmp_path, tiny_model_dir):
    """peft.method full: every weight trains against a frozen reference TRL loads from the starting weights (the KL
    grows from 0), final/ is a whole model, and a SIGKILL after a checkpoint of grpo, then of rloo, resumes each one
    to the uninterrupted run's weights and rewards. Three prompts, two per step: every step is a new epoch of the
    prompts, whose order a resumed run must draw as the uninterrupted one did."""
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"How do I look after hive {i}?"}) + "\n" for i in range(3)))

    def args(run_dir):
        return ["run", "--config", SMOKE, "--run-dir", str(run_dir), "--stage", "grpo", "--stage", "rloo", *sets(
            "peft.method=full", "peft.options={}", "evaluation.prompts=",
            *(f"{stage}.{key}" for stage in STAGES for key in (
                "init_from=base", "reward.type=rule", f"reward.function={RULE}", f"data.train={prompts}",
                "data.eval_split=0", "trainer.max_steps=6", "trainer.save_steps=2")))]

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_pipeline(*args(reference))
    newest = {"grpo": kill_after_first_checkpoint("grpo", killed, args(killed))}
    newest["rloo"] = kill_after_first_checkpoint("rloo", killed, args(killed))  # grpo resumes and completes first
    run_pipeline(*args(killed))
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for stage in STAGES:
        resumed = manifest(killed, stage)
        assert resumed["status"] == "completed" and resumed["resumed_from"] == newest[stage]
        assert resumed["metrics"]["train/steps"] == 6
        diff = max_abs_diff(reference / stage / "final", killed / stage / "final")
        assert diff <= 1e-6, f"resumed {stage} differs from the uninterrupted run by {diff}"
        for key in ("reward", "kl"):
            assert logged(killed, stage, key) == pytest.approx(logged(reference, stage, key), abs=1e-6), key
        kl = logged(reference, stage, "kl")
        assert abs(kl[1]) < 1e-6 and abs(kl[6]) > 1e-6, "the reference stayed where the policy started"
        final = AutoModelForCausalLM.from_pretrained(reference / stage / "final").state_dict()
        unchanged = [name for name in start if torch.equal(final[name], start[name])]
        assert unchanged == [], f"{stage}: {unchanged[:3]} did not change"


def test_vllm_is_refused_before_any_compute_where_there_is_no_gpu(tmp_path):
    run_dir = tmp_path / "run"
    result = run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), "--stage", "grpo",
                          *sets("grpo.trainer.use_vllm=true"), check=False)
    assert result.returncode == 2, result.stderr
    assert "grpo.trainer.use_vllm: generating with vLLM needs a CUDA GPU" in " ".join(result.stderr.split())
    assert not (run_dir / "grpo").exists()


@pytest.mark.parametrize("settings, message", [
    (["grpo.trainer.use_vllm=true"], "grpo.trainer.use_vllm: generating with vLLM needs a CUDA GPU"),
    (["grpo.trainer.vllm_mode=server"], "grpo.trainer.vllm_mode is set but grpo.trainer.use_vllm is not"),
    (["grpo.trainer.steps_per_generation=4"], r"grpo.trainer.save_steps \(2\) must be a multiple of 4"),
    (["grpo.trainer.num_iterations=3"], r"grpo.trainer.save_steps \(2\) must be a multiple of 3"),
    (["grpo.trainer.reward_weights=[1.0, 2.0]"], "at most one weight"),
    (["grpo.trainer.per_device_eval_batch_size=3"], "must hold whole groups of 2 responses"),
    (["grpo.trainer.num_generation=4"], "did you mean 'num_generations'"),
    (["peft.method=ia3", "peft.options={}"], "grpo with peft.method=ia3"),
    (["grpo.reward.type=judge", "grpo.reward.judge.type=llm"], "grpo.reward.judge.type 'llm' cannot reward pointwise"),
    (["grpo.data.format=messages"], "grpo.data holds prompts"),
])
def test_the_check_names_the_key(settings, message, monkeypatch):
    """The stage's check (what `run` and `validate` call before any stage starts), in this process: no GPU here, so
    TRL's vLLM generation is refused; vllm_* keys without it would be ignored, so they are refused too."""
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from stages import grpo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=message):
        grpo.check(load_config(SMOKE, settings))
    grpo.check(load_config(SMOKE, ["grpo.trainer.steps_per_generation=2", "grpo.trainer.num_iterations=2",
                                   "grpo.trainer.save_steps=4"]))


def test_vllm_passes_through_on_a_cuda_machine_with_vllm_installed(monkeypatch):
    """use_vllm and its keys reach RLOOConfig unchanged; where CUDA is present only a missing vllm is refused."""
    import importlib.util

    from trl import RLOOConfig

    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from stages import hf_trainer, rloo, trl_online

    config = load_config(SMOKE, ["rloo.trainer.use_vllm=true", "rloo.trainer.vllm_mode=server"])
    args = hf_trainer.trainer_args(RLOOConfig, "rloo", config.rloo.trainer, config.seed, output_dir="unused")
    assert (args.use_vllm, args.vllm_mode) == (True, "server")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match="rloo.trainer.use_vllm: the vllm package is not installed"):
            rloo.check(config)
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())
    trl_online.check_vllm("rloo", config.rloo.trainer)
