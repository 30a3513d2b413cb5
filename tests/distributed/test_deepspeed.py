"""Two CPU processes under DeepSpeed (gloo), launched by the pipeline through `accelerate launch`, exactly as README's
multi-GPU command does: sft, rm and ppo train under ZeRO-2 and ZeRO-3, dpo, kto, orpo, simpo, grpo and rloo under
one of the two each (the suite has a 20-minute budget, and most of a stage's time here is starting two processes;
ZERO_MATRIX=full runs every stage under both), their adapters hold real trained weights, and a killed two-process
run resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO, assert_adapter_changes_output, kill_when, load_safetensors_dir, max_abs_diff, run_pipeline,
)

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _args(run_dir, zero: str, *stages: str, processes: int = 2) -> list[str]:
    return ["run", "--config", SMOKE, "--run-dir", str(run_dir), *(f"--stage={s}" for s in stages),
            "--set", f"distributed.num_processes={processes}",
            "--set", f"distributed.deepspeed=configs/deepspeed/{zero}.json",
            "--set", f"distributed.main_process_port={_free_port()}",
            "--set", "evaluation.prompts="]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _manifest(run_dir, stage) -> dict:
    return json.loads((run_dir / stage / "stage.json").read_text())


def _assert_trained_adapter(final_dir) -> None:
    """Every tensor saved has its full shape (ZeRO-3 leaves empty ones unless gathered) and every LoRA B moved."""
    adapter = load_safetensors_dir(final_dir)
    assert adapter and all(t.numel() > 0 for t in adapter.values()), "empty tensors in the saved adapter"
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(t) for t in lora_b), "a LoRA B matrix is still at its zero init"


PREFERENCE_OPTIMISERS = ("dpo", "kto", "orpo", "simpo")
ONLINE = ("ppo", "grpo", "rloo")
SHORT = [f"--set={stage}.trainer.max_steps=2" for stage in ("sft", "rm", *PREFERENCE_OPTIMISERS, *ONLINE)]
# The stages each ZeRO run trains after sft, preferences and rm. ZeRO-3 takes the ones that generate while training
# (grpo, rloo: every forward gathers the sharded weights), dpo (its reference model is sharded too) and simpo;
# ZeRO-2 kto and orpo; ppo, our own loop, runs under both. ZERO_MATRIX=full trains every one under both (about
# 4 minutes more on two cores).
TRAINED = {"zero2": ("kto", "orpo", "ppo"), "zero3": ("dpo", "simpo", "ppo", "grpo", "rloo")}
if os.environ.get("ZERO_MATRIX") == "full":
    TRAINED = dict.fromkeys(TRAINED, (*PREFERENCE_OPTIMISERS, *ONLINE))


def _model_that_often_stops_at_once(tmp_path, tiny_model_dir) -> str:
    """The tiny model with a generation config that favours its end-of-turn token: responses of 0 to ~5 tokens, so
    the processes sample responses of different lengths, many of them empty (the end-of-turn token alone). A bias of 7
    over the 2,048-token vocabulary, as 10 was over 49,152 (at 3, 94% of the responses ran to max_new_tokens)."""
    from transformers import AutoTokenizer

    model_dir = tmp_path / "stops-early"
    shutil.copytree(tiny_model_dir, model_dir)
    config_path = model_dir / "generation_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    config_path.write_text(json.dumps({**config, "sequence_bias": [[[eos], 7.0]]}))
    return str(model_dir)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_every_training_stage_in_two_processes(tmp_path, zero, tiny_model_dir):
    """Under ZeRO-3 every forward gathers weights from both processes, so one that finished sampling must keep
    stepping while the other samples on: the ZeRO-3 run uses a model whose responses are often empty."""
    run_dir = tmp_path / "run"
    if zero == "zero3":  # and the llm judge, its model sharded over the two processes, labels the pairs
        model = _model_that_often_stops_at_once(tmp_path, tiny_model_dir)
        shipped = [json.loads(line) for line in
                   (REPO / "data/preferences/beekeeping_pairs.jsonl").read_text().splitlines()[:40]]
        pairs, rows, feedback = tmp_path / "pairs.jsonl", tmp_path / "rows.jsonl", tmp_path / "feedback.jsonl"
        pairs.write_text("".join(json.dumps(pair) + "\n" for pair in shipped))
        # The random judge's labels mean nothing, so rm and the preference optimisers train on the file's own labels
        # (kto on each pair as two unpaired rows, TRL's prompt/completion shape).
        decided = [(pair["prompt"], pair["response_" + pair["winner"]],
                    pair["response_" + ("b" if pair["winner"] == "a" else "a")])
                   for pair in shipped if pair["winner"] != "tie"]
        rows.write_text("".join(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n"
                                for prompt, chosen, rejected in decided))
        feedback.write_text("".join(json.dumps({"prompt": prompt, "completion": completion, "label": label}) + "\n"
                                    for prompt, *responses in decided
                                    for completion, label in zip(responses, (True, False))))
        judge = ["--set", f"preferences.pairs={pairs}", "--set", "preferences.judge.type=llm",
                 "--set", "preferences.judge.path=null", "--set", "preferences.judge.batch_size=4",
                 "--set", f"rm.data.train={rows}", "--set", f"kto.data.train={feedback}",
                 *(f"--set={name}.data.train={rows}" for name in ("dpo", "orpo", "simpo"))]
    else:
        model, judge = "tiny-random-smollm2", []
    policies = TRAINED[zero]
    # ppo's first iteration trains its critic alone: the actor's weights get no gradient under DeepSpeed either.
    warmup = ["--set", "ppo.trainer.critic_warmup_steps=1"] if zero == "zero2" else []
    run_pipeline(*_args(run_dir, zero, "sft", "preferences", "rm", *policies), *SHORT, *judge, *warmup,
                 "--set", "evaluation.prompts=data/preferences/eval_prompts.jsonl", "--set", "evaluation.max_prompts=2",
                 "--set", f"model.name_or_path={model}")
    for stage in ("sft", "rm", *policies):
        manifest = _manifest(run_dir, stage)
        assert manifest["status"] == "completed" and manifest["world_size"] == 2
        assert manifest["deepspeed"].endswith(f"{zero}.json")
        _assert_trained_adapter(run_dir / stage / "final")
    assert _manifest(run_dir, "sft")["metrics"]["eval/loss"] < _manifest(run_dir, "sft")["metrics"]["eval/loss_before"]
    # sft's held-out prompts are answered on its saved result, as without DeepSpeed.
    assert _manifest(run_dir, "sft")["metrics"]["eval/references"] > 0
    _assert_trained_adapter(run_dir / "ppo" / "critic")  # the critic adapter and the value head
    # The policy stages are compared with their starting policy by the runner, on the saved results.
    for stage in policies:
        metrics = _manifest(run_dir, stage)["metrics"]
        assert metrics["eval/wins"] + metrics["eval/ties"] + metrics["eval/losses"] == 2
        assert metrics["eval/kl_to_start"] is not None
    # Only the main process wrote the logs: one record per logged step.
    steps = [json.loads(line)["step"] for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # grpo and rloo: each step sampled two responses to each of four prompts, two prompts in each process, and
    # rewarded them with the rm stage's model; the main process's table holds both processes' responses.
    for stage in {"grpo", "rloo"} & set(policies):
        rewards = [row["reward"] for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()
                   if (row := json.loads(line)).get("reward") is not None]
        assert len(rewards) == 2 and _manifest(run_dir, stage)["metrics"][f"{stage}/reward_mean"] == rewards[-1]
        tables = [json.loads(line) for line in (run_dir / stage / "samples.jsonl").read_text().splitlines()]
        assert [len(table["samples"]) for table in tables] == [8, 8]

    assert_adapter_changes_output(_manifest(run_dir, "sft")["base_model"], run_dir / "sft" / "final")
    if zero == "zero3":
        responses = [row["response"] for line in (run_dir / "ppo" / "samples.jsonl").read_text().splitlines()
                     for row in json.loads(line)["samples"]]
        assert "" in responses and any(responses), f"expected empty and non-empty responses, got {responses}"
        _assert_labels_as_in_one_process(run_dir, model)


def _assert_labels_as_in_one_process(run_dir, model: str) -> None:
    """The labels the two processes stored are the ones the judge gives in one process, every pair labelled once."""
    from pipeline.config import ModelConfig
    from reward.importers import load_pairs
    from reward.llm_judge import LlmJudge
    from reward.pairs import LabelStore

    pairs = load_pairs(run_dir / "preferences" / "pairs.jsonl")
    with LabelStore(_manifest(run_dir, "preferences")["labels_file"]) as store:
        stored = {label.pair_id: label for label in store.labels()}
    assert len(stored) == len(pairs) == 40
    expected = LlmJudge.from_path(Path(model), ModelConfig(model), batch_size=4).judge(pairs)
    for label in expected:
        got = stored[label.pair_id]
        assert got.verdicts["p_a_first"] == pytest.approx(label.verdicts["p_a_first"], abs=1e-4)
        assert got.verdicts["strength"] == pytest.approx(label.verdicts["strength"], abs=1e-3)
        if abs(label.verdicts["strength"]) > 1e-3:  # a sign within rounding of zero may differ across processes
            assert got.winner == label.winner


@pytest.mark.timeout(900)
def test_signalled_then_killed_two_process_run_resumes_and_refuses_another_process_count(tmp_path):
    """A preemption under `accelerate launch`: SIGTERM to the pipeline reaches both processes, which finish the same
    step, checkpoint it together and exit 143 with the stage interrupted; the re-run resumes from that checkpoint and is
    then SIGKILLed with the whole process group (no warning this time); a re-run with one process is refused; the last
    one resumes and ends equal to an uninterrupted run."""
    import subprocess
    import sys
    import time

    def args(run_dir, processes=2):
        return [*_args(run_dir, "zero2", "sft", processes=processes), "--set", "sft.trainer.max_steps=6",
                "--set", "sft.trainer.save_steps=2"]

    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    checkpoints = run_dir / "sft" / "checkpoints"

    def complete() -> list[int]:
        return sorted(int(marker.parent.name.split("-")[1]) for marker in checkpoints.glob("checkpoint-*/COMPLETE"))

    run_pipeline(*args(reference))
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *args(run_dir)], cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not complete() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGTERM)  # the pipeline alone, as a scheduler's notice reaches the job's main process
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert _manifest(run_dir, "sft")["status"] == "interrupted"
    signalled = complete()[-1]
    assert 2 <= signalled < 6
    # Every checkpoint on disk is whole: none was left half-written by either process.
    assert sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*")) == complete()

    newest = kill_when(args(run_dir), lambda: complete()[-1] > signalled and f"checkpoint-{complete()[-1]}",
                       "after a checkpoint past the signalled one")

    refused = run_pipeline(*args(run_dir, processes=1), check=False)
    assert refused.returncode == 2
    assert "written by 2 DeepSpeed process(es) and this run has 1" in " ".join(refused.stderr.split())

    result = run_pipeline(*args(run_dir))
    assert f"resuming from {newest}" in " ".join(result.stderr.split())
    manifest = _manifest(run_dir, "sft")
    assert manifest["status"] == "completed" and manifest["metrics"]["train/steps"] == 6
    assert manifest["resumed_from"] == newest
    _assert_trained_adapter(run_dir / "sft" / "final")
    diff = max_abs_diff(reference / "sft" / "final", run_dir / "sft" / "final")
    assert diff <= 1e-6, f"the resumed two-process run differs from the uninterrupted one by {diff}"


@pytest.mark.timeout(600)
def test_two_machines_machine_1_joins_every_stage_machine_0_launches(tmp_path):
    """Two "machines" of one process each on this host: machine 1 runs `join` first (as a job scheduler starts every
    node at once) and takes its part in each stage machine 0's `run` launches, then exits with machine 0's result."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    args = ["run", "--config", SMOKE, "--run-dir", str(run_dir), "--stage", "cpt", "--stage", "sft",
            "--set", "distributed.num_machines=2", "--set", "distributed.main_process_ip=127.0.0.1",
            "--set", f"distributed.main_process_port={_free_port()}",
            "--set", "distributed.deepspeed=configs/deepspeed/zero2.json",
            "--set", "cpt.trainer.max_steps=2", "--set", "sft.trainer.max_steps=2"]
    refused = run_pipeline(*args, "--set", "distributed.machine_rank=1", check=False)
    assert refused.returncode == 2 and "python -m pipeline join --run-dir" in " ".join(refused.stderr.split())

    machine1 = subprocess.Popen([sys.executable, "-m", "pipeline", "join", "--run-dir", str(run_dir),
                                 "--machine-rank", "1", "--timeout", "500"], cwd=REPO, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        machine0 = run_pipeline(*args, check=False)
        joined = machine1.communicate(timeout=120)[0]
    finally:
        if machine1.poll() is None:
            os.killpg(machine1.pid, signal.SIGKILL)
    assert machine0.returncode == 0, machine0.stderr[-3000:]
    assert machine1.returncode == 0, joined[-3000:]
    assert "pipeline join --run-dir" in " ".join(machine0.stderr.split())
    for stage in ("cpt", "sft"):
        assert f"{stage}: joining as machine 1 of 2" in joined
        manifest = _manifest(run_dir, stage)
        assert manifest["status"] == "completed" and manifest["world_size"] == 2
        _assert_trained_adapter(run_dir / stage / "final")
