"""W&B and TensorBoard from one smoke run of every stage (a few steps each), read back with the trackers' own
readers: wandb's reader of offline run files (`wandb leet inspect --json`) and TensorBoard's EventAccumulator."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from conftest import REPO, run_pipeline

SMOKE = str(REPO / "configs" / "smoke.yaml")
SHORT = [f"--set={key}" for key in (
    "tracking.report_to=[wandb, tensorboard]", "cpt.trainer.max_steps=2", "sft.trainer.max_steps=4",
    "sft.trainer.eval_steps=2", "rm.trainer.max_steps=2", "dpo.trainer.max_steps=2", "ppo.trainer.max_steps=2",
    "ppo.trainer.sample_every=1", "ppo.trainer.rollout_batch_size=4", "ppo.trainer.num_ppo_epochs=1",
    "evaluation.max_prompts=2", "evaluation.max_references=2", "sft.data.eval_split=0.03", "rm.data.eval_split=0.03",
    "dpo.data.eval_split=0.03", "ppo.data.eval_split=0.02", "grpo.trainer.max_steps=2", "rloo.trainer.max_steps=2",
    "grpo.data.eval_split=0.02", "rloo.data.eval_split=0.02",
    "iterative_dpo.enabled=true", "grpo.enabled=true", "rloo.enabled=true")]  # off in smoke.yaml
# Per stage, metric keys its W&B history must hold: the trainers' curves and the stage's own results.
EXPECTED = {
    "cpt": {"train/loss", "eval/loss", "eval/loss_before", "train/global_step"},
    "sft": {"train/loss", "eval/loss", "eval/loss_before", "data/train_sequences"},
    "preferences": {"preferences/rows", "preferences/ties"},
    "rm": {"train/loss", "rm/eval_accuracy", "rm/eval_accuracy_before", "rm/eval_ece"},
    "dpo": {"train/loss", "train/rewards/accuracies", "dpo/eval_accuracy", "eval/win_rate", "eval/kl_to_start"},
    "iterative_dpo": {"train/rewards/accuracies", "rounds/pairs/decided", "rounds/dpo/train_accuracy",
                      "rounds/win/win_rate", "eval/win_rate"},
    "ppo": {"ppo/reward_mean", "ppo/kl", "ppo/policy_loss", "ppo/response_length", "eval/win_rate"},
    "grpo": {"train/reward", "train/kl", "train/loss", "eval/reward", "grpo/reward_mean", "eval/win_rate"},
    "rloo": {"train/reward", "train/kl", "train/loss", "eval/reward", "rloo/reward_mean", "eval/win_rate"},
}
TABLES = {"rm": "rm/calibration", "dpo": "eval/samples", "ppo": "ppo/samples"}


def offline_runs(run_dir) -> list[dict]:
    """Every offline W&B run under the run directory as {id, job_type, group, config, history}, read by wandb."""
    dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    readers = [subprocess.Popen([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                                stdout=subprocess.PIPE, text=True) for path in dirs]
    runs = []
    for reader in readers:
        records = [json.loads(line) for line in reader.communicate()[0].splitlines() if line.strip()]
        assert reader.returncode == 0
        run = next(record["run"] for record in records if record["type"] == "run")
        runs.append({"id": run["run_id"], "job_type": run["job_type"], "group": run["run_group"],
                     "config": run["config"]["update"],
                     "history": [record["history"]["item"] for record in records if record["type"] == "history"]})
    return runs


def test_one_wandb_run_per_stage_in_one_group_and_a_resumed_stage_continues_its_own(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), *SHORT)

    runs = offline_runs(run_dir)
    assert sorted(run["job_type"] for run in runs) == sorted(EXPECTED)
    assert {run["group"] for run in runs} == {"run"}
    for run in runs:
        stage = run["job_type"]
        assert run["id"] == json.loads((run_dir / stage / "stage.json").read_text())["wandb_run_id"]
        keys = {key for row in run["history"] for key in row}
        assert EXPECTED[stage] <= keys, f"{stage} lacks {EXPECTED[stage] - keys}"
        if stage in TABLES:
            assert f"{TABLES[stage]}._type" in keys, f"{stage} logged no {TABLES[stage]} table"
        # The resolved config, with its stage sections, is the run's config.
        assert run["config"]["pipeline"]["sft"]["trainer"]["max_steps"] == 4
    # TensorBoard gets the same scalars, from our own PPO loop as from the HF trainers.
    for stage, key in (("sft", "train/loss"), ("ppo", "ppo/reward_mean"), ("rm", "rm/eval_accuracy"),
                       ("grpo", "train/reward"), ("rloo", "train/reward")):
        events = EventAccumulator(str(run_dir / stage / "tensorboard"))
        events.Reload()
        assert key in events.Tags()["scalars"], f"{stage}: {key} not in TensorBoard"

    # sft interrupted after checkpoint-2: the re-run resumes it into the same W&B run, with steps 3 and 4 logged.
    sft = run_dir / "sft"
    shutil.rmtree(sft / "checkpoints" / "checkpoint-4")
    manifest = json.loads((sft / "stage.json").read_text())
    (sft / "stage.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    run_pipeline("run", "--config", SMOKE, "--run-dir", str(run_dir), "--stage", "sft", *SHORT)
    assert json.loads((sft / "stage.json").read_text())["resumed_from"] == "checkpoint-2"
    sft_runs = [run for run in offline_runs(run_dir) if run["job_type"] == "sft"]
    assert len(sft_runs) == 2 and {run["id"] for run in sft_runs} == {manifest["wandb_run_id"]}
    resumed = sft_runs[-1]["history"]
    assert {row["train/global_step"] for row in resumed if "train/loss" in row} == {3, 4}
