"""The iterative_dpo stage through the CLI on the tiny model with a rule judge, two rounds of two steps: each round
samples from the policy the round before trained, the judge's labels become the round's pairs, the result loads like
dpo's and is evaluated against the start; killed while judging and again while training, it resumes the unfinished
round and ends with the weights of an uninterrupted run; reference: start holds every round to the start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO, assert_adapter_changes_output, kill_after_first_checkpoint, kill_when, load_safetensors_dir, max_abs_diff,
    run_pipeline,
)

SMOKE = str(REPO / "configs" / "smoke.yaml")
STAGE = ["--stage", "iterative_dpo", "--set", "iterative_dpo.init_from=base", "--set", "evaluation.max_prompts=2"]
# rules_for_tests: shorter and slow_shorter score alike (minus the length); the slow one can be killed mid-judging.
FAST_JUDGE = ["--set", "iterative_dpo.judge.function=rules_for_tests:shorter"]
SLOW_JUDGE = ["--set", "iterative_dpo.judge.function=rules_for_tests:slow_shorter",
              "--set", "iterative_dpo.judge.batch_size=1"]


@pytest.fixture(autouse=True)
def pipeline_env(monkeypatch):
    # One thread per pipeline process on a shared CPU (see tests/integration/test_ppo.py); the test rules on the path.
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _args(run_dir: Path, *extra: str) -> list[str]:
    return ["run", "--config", SMOKE, "--run-dir", str(run_dir), *STAGE, *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "iterative_dpo" / "stage.json").read_text())


def round_metrics(run_dir: Path, k: int) -> dict:
    return json.loads((run_dir / "iterative_dpo" / f"round_{k}" / "round.json").read_text())


def first_step(run_dir: Path, k: int) -> dict:
    """What TRL logged at round k's first training step, before any update of that round."""
    return next(row for row in read_jsonl(run_dir / "iterative_dpo" / f"round_{k}" / "metrics.jsonl")
                if row["step"] == 1 and "loss" in row)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("iterative") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(REPO / "tests"))
        patch.setenv("OMP_NUM_THREADS", "1")
        run_pipeline(*_args(run_dir, *FAST_JUDGE))
    return run_dir


def test_each_round_samples_the_policy_before_it_and_trains_on_the_judges_labels(uninterrupted):
    from pipeline.config import ModelConfig, SamplingConfig
    from pipeline.models import load_policy, load_tokenizer
    from reward.importers import load_preferences
    from stages.generate import sample_responses
    from stages.iterative_dpo import ROUND_SEED

    stage = uninterrupted / "iterative_dpo"
    result = manifest(uninterrupted)
    assert result["status"] == "completed" and result["metrics"]["rounds/count"] == 2
    assert result["metrics"]["train/steps"] == 4  # two rounds of two steps
    for k in (1, 2):
        m = round_metrics(uninterrupted, k)
        # Rounds take consecutive prompts of the file: 1-4, then 5-8.
        rows = load_preferences(stage / f"round_{k}" / "pairs.jsonl")  # the format rm and dpo read
        sources = {row["source"] for row in read_jsonl(stage / f"round_{k}" / "pairs.jsonl")}
        assert sources <= {f"data/preferences/prompts.jsonl:{n}" for n in range(4 * k - 3, 4 * k + 1)}
        assert len(rows) == m["pairs/decided"] == m["pairs/judged"] - m["pairs/ties"] - m["pairs/unlabelled"] > 0
        assert all(len(row.chosen) < len(row.rejected) for row in rows), "the judge prefers the shorter response"
        assert m["data/train_pairs"] + m["data/eval_pairs"] == len(rows)
        assert m["train/steps"] == 2 and 0 <= m["dpo/train_accuracy"] <= 1 and m["dpo/eval_accuracy"] is not None
        assert m["win/wins"] + m["win/ties"] + m["win/losses"] == 2
        # reference: previous. At a round's first step the policy is still the reference: no implicit reward.
        assert abs(first_step(uninterrupted, k)["rewards/chosen"]) < 1e-6

    # Round 2 sampled from round 1's policy: the same draw from that policy gives its responses again.
    config = ModelConfig("tiny-random-smollm2")
    tokenizer = load_tokenizer(config)
    policy = load_policy(Path(result["base_model"]), stage / "round_1" / "final", config, tokenizer)
    prompts = [[{"role": "user", "content": json.loads(line)["prompt"]}]
               for line in (REPO / "data/preferences/prompts.jsonl").read_text().splitlines()[4:8]]
    torch.set_num_threads(1)
    again = sample_responses(policy, tokenizer, prompts, SamplingConfig(num_responses=2, max_new_tokens=16),
                             42 + 2 * ROUND_SEED, stage / "resampled.jsonl").responses
    assert again == [r for batch in read_jsonl(stage / "round_2" / "samples.jsonl") for r in batch["responses"]]

    # final/ is the last round's policy, loaded as dpo's: an adapter on the recorded base, every LoRA B trained.
    final = load_safetensors_dir(stage / "final")
    assert max_abs_diff(stage / "round_2" / "final", stage / "final") == 0
    assert all(torch.count_nonzero(t) for name, t in final.items() if "lora_B" in name)
    assert_adapter_changes_output(result["base_model"], stage / "final")
    # Compared with its start by the runner (evaluated=True), and reported round by round.
    assert result["metrics"]["eval/wins"] + result["metrics"]["eval/ties"] + result["metrics"]["eval/losses"] == 2
    report = (uninterrupted / "report.md").read_text()
    assert "## Iterative DPO: rounds" in report
    assert report.count("\n| 1 | 4 | 4 |") == 1 and report.count("\n| 2 | 4 | 4 |") == 1


def test_killed_while_judging_and_while_training_resumes_the_round_to_the_same_weights(uninterrupted, tmp_path,
                                                                                      monkeypatch):
    run_dir, calls = tmp_path / "run", tmp_path / "calls.jsonl"
    monkeypatch.setenv("RULE_CALL_LOG", str(calls))
    monkeypatch.setenv("RULE_DELAY", "0.2")
    args = _args(run_dir, *SLOW_JUDGE)
    stage = run_dir / "iterative_dpo"

    # 1. Killed while the judge labels round 2's pairs: round 1 is finished, round 2 has some labels.
    labels = stage / "round_2" / "labels.jsonl"
    kill_when(args, lambda: labels.exists() and len(read_jsonl(labels)) >= 1, "while judging round 2")
    assert (stage / "round_1" / "round.json").exists() and not (stage / "round_2" / "round.json").exists()
    round_1 = {path: path.read_bytes() for path in (stage / "round_1").rglob("*") if path.is_file()}
    before = {label["pair_id"] for label in read_jsonl(labels)}
    first_pid = read_jsonl(calls)[0]["pid"]

    # 2. Resumed, then killed after round 2's first checkpoint.
    newest = kill_after_first_checkpoint("iterative_dpo", run_dir, args, stage / "round_2" / "checkpoints")
    status = json.loads(run_pipeline("status", "--run-dir", str(run_dir), "--json").stdout)["stages"]
    assert status["iterative_dpo"]["newest_checkpoint"] == f"round_2/{newest}"

    # 3. Resumed to the end.
    result = run_pipeline(*args)
    log = " ".join(result.stderr.split())
    assert f"1 finished round(s) kept; resuming from round_2/{newest}" in log
    assert "round 1 of 2 finished in an earlier attempt" in log
    assert manifest(run_dir)["resumed_from"] == f"round_2/{newest}" and manifest(run_dir)["attempts"] == 3

    # Nothing finished was redone or lost: round 1's files are untouched, no labelled pair was judged again.
    assert {path: path.read_bytes() for path in round_1} == round_1
    pairs = {row["pair_id"]: row for row in read_jsonl(stage / "round_2" / "pairs.jsonl")}
    asked_again = {call["response"] for call in read_jsonl(calls) if call["pid"] != first_pid}
    round_1_responses = {r for batch in read_jsonl(stage / "round_1" / "samples.jsonl")
                         for responses in batch["responses"] for r in responses}
    assert not asked_again & round_1_responses, "a finished round's pairs were judged again"
    for pair_id in before & set(pairs):
        assert not {pairs[pair_id]["chosen"], pairs[pair_id]["rejected"]} & asked_again
    # And the run ends where the uninterrupted one did.
    for k in (1, 2):
        expected = read_jsonl(uninterrupted / "iterative_dpo" / f"round_{k}" / "pairs.jsonl")
        actual = read_jsonl(stage / f"round_{k}" / "pairs.jsonl")
        assert [(r["chosen"], r["rejected"]) for r in actual] == [(r["chosen"], r["rejected"]) for r in expected]
    diff = max_abs_diff(uninterrupted / "iterative_dpo" / "final", stage / "final")
    assert diff <= 1e-6, f"the resumed run differs from the uninterrupted one by {diff}"


def test_reference_start_holds_every_round_to_the_start(tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline(*_args(run_dir, *FAST_JUDGE, "--set", "iterative_dpo.reference=start",
                        "--set", "iterative_dpo.win_rate_prompts=0", "--set", "iterative_dpo.eval_split=0",
                        "--set", "iterative_dpo.trainer.max_steps=1", "--set", "evaluation.prompts="))
    assert abs(first_step(run_dir, 1)["rewards/chosen"]) < 1e-6  # round 1 starts at the start
    # Round 2 starts from round 1's policy but is held to the start: an implicit reward before its first update.
    assert abs(first_step(run_dir, 2)["rewards/chosen"]) > 1e-6
    assert manifest(run_dir)["status"] == "completed"
