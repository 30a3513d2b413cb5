"""Faults a cluster run meets, each ending where an uninterrupted run ends:
- signals: SIGTERM / SIGUSR1 finish the step, write a complete checkpoint, mark the stage interrupted and exit with
  128 + the signal; a second signal stops at once and its half-written checkpoint is never resumed from;
- damaged checkpoints: a checkpoint whose marker is there but whose files are missing or truncated is named and set
  aside, and resume takes the newest whole one;
- a full disk (a real tmpfs, where the test can mount one without root): a clear error, nothing complete lost.

The sft runs are in-process (signals are sent by the test process to itself, at a chosen step, from inside the
training step) and share one uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import REPO, max_abs_diff

from pipeline.cli import main

SMOKE = str(REPO / "configs" / "smoke.yaml")
SFT = ["run", "--config", SMOKE, "--stage", "sft", "--set", "sft.trainer.max_steps=6", "--set",
       "sft.trainer.save_steps=2", "--set", "sft.data.eval_split=0", "--set", "evaluation.max_references=0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """sft trained 6 steps without interruption: its final/ is what every faulted run must end with."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        patch.setenv("TENSORBOARD_LOGGING_DIR", "")
        assert main([*SFT, "--run-dir", str(run_dir)]) == 0
    return run_dir / "sft"


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "")


def checkpoints(stage) -> dict[str, bool]:
    """checkpoint name -> whether it holds its COMPLETE marker."""
    return {p.name: (p / "COMPLETE").exists() for p in sorted((stage / "checkpoints").glob("checkpoint-*"))}


def signal_at_step(monkeypatch, step: int, *signums: int, during_save: int | None = None) -> None:
    """Send `signums` to this process while optimiser step `step` is computed; `during_save`: one more once the
    checkpoint files of that step are written, before its COMPLETE marker."""
    from transformers import Trainer
    from trl import SFTTrainer

    clean_step, clean_save = SFTTrainer.training_step, Trainer._save_checkpoint

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == step - 1:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return clean_step(self, model, inputs, num_items_in_batch)

    def save_checkpoint(self, model, trial):
        clean_save(self, model, trial)
        if during_save is not None and self.state.global_step == step:
            os.kill(os.getpid(), during_save)

    monkeypatch.setattr(SFTTrainer, "training_step", training_step)
    monkeypatch.setattr(Trainer, "_save_checkpoint", save_checkpoint)


def output(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_sigterm_checkpoints_the_step_and_resumes_to_the_uninterrupted_result(reference, tmp_path, capsys,
                                                                              monkeypatch, in_repo):
    run_dir = tmp_path / "run"
    stage = run_dir / "sft"
    with monkeypatch.context() as patch:
        signal_at_step(patch, 3, signal.SIGTERM)
        assert main([*SFT, "--run-dir", str(run_dir)]) == 128 + signal.SIGTERM
    said = output(capsys)
    assert "SIGTERM: finishing the current step" in said
    assert "interrupted: sft stopped for SIGTERM after step 3; checkpoint-3 is complete" in said
    assert checkpoints(stage) == {"checkpoint-2": True, "checkpoint-3": True}
    assert not (stage / "final").exists()
    assert json.loads((stage / "stage.json").read_text())["status"] == "interrupted"

    assert main([*SFT, "--run-dir", str(run_dir)]) == 0
    assert "resuming from checkpoint-3" in output(capsys)
    assert json.loads((stage / "stage.json").read_text())["resumed_from"] == "checkpoint-3"
    assert max_abs_diff(reference / "final", stage / "final") <= 1e-6


def test_a_second_signal_stops_at_once_and_its_partial_checkpoint_is_never_resumed(reference, tmp_path, capsys,
                                                                                  monkeypatch, in_repo):
    run_dir = tmp_path / "run"
    stage = run_dir / "sft"
    with monkeypatch.context() as patch:
        signal_at_step(patch, 3, signal.SIGUSR1, during_save=signal.SIGUSR1)
        assert main([*SFT, "--run-dir", str(run_dir)]) == 128 + signal.SIGUSR1
    assert "interrupted" in output(capsys)
    assert checkpoints(stage) == {"checkpoint-2": True, "checkpoint-3": False}  # written, never marked complete
    assert json.loads((stage / "stage.json").read_text())["status"] == "interrupted"

    assert main([*SFT, "--run-dir", str(run_dir)]) == 0
    said = output(capsys)
    assert "checkpoint-3 was never completed; moved to" in said and "resuming from checkpoint-2" in said
    assert max_abs_diff(reference / "final", stage / "final") <= 1e-6


def test_damaged_checkpoints_are_named_set_aside_and_the_newest_whole_one_resumes(reference, tmp_path, capsys,
                                                                                  in_repo):
    """A preemption after the last checkpoint, then a bad copy: checkpoint-6 truncated, checkpoint-4 missing a file."""
    run_dir = tmp_path / "run"
    stage = run_dir / "sft"
    shutil.copytree(reference.parent, run_dir)
    shutil.rmtree(stage / "final")
    manifest = json.loads((stage / "stage.json").read_text())
    (stage / "stage.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    weights = stage / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    (stage / "checkpoints" / "checkpoint-4" / "optimizer.pt").unlink()

    assert main([*SFT, "--run-dir", str(run_dir)]) == 0
    said = output(capsys)
    assert f"checkpoint-6 is damaged (adapter_model.safetensors is {size // 2} bytes, {size} when written)" in said
    assert "checkpoint-4 is damaged (optimizer.pt is missing)" in said
    assert "resuming from checkpoint-2" in said
    assert sorted(p.name.rsplit("-", 2)[0] for p in (stage / "checkpoints" / ".history").iterdir()) == \
        ["checkpoint-4", "checkpoint-6"]
    assert json.loads((stage / "stage.json").read_text())["resumed_from"] == "checkpoint-2"
    assert max_abs_diff(reference / "final", stage / "final") <= 1e-6


def test_ppo_stops_for_a_signal_with_a_complete_checkpoint_and_resumes(tmp_path, capsys, monkeypatch, in_repo):
    from stages.ppo import trainer

    run_dir = tmp_path / "run"
    args = ["run", "--config", SMOKE, "--stage", "ppo", "--run-dir", str(run_dir), *(
        arg for item in ("ppo.reward.type=rule", "ppo.reward.function=reward.rules:specificity",
                         "ppo.data.eval_split=0", "ppo.trainer.max_steps=3", "ppo.trainer.save_steps=10",
                         "ppo.trainer.rollout_batch_size=4", "ppo.trainer.mini_batch_size=4",
                         "ppo.trainer.num_ppo_epochs=1", "ppo.trainer.max_new_tokens=8", "evaluation.prompts=")
        for arg in ("--set", item))]
    clean = trainer.optimise

    def optimise(*args):  # (..., step): the signal comes while iteration 2 optimises
        if args[-1] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return clean(*args)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "optimise", optimise)
        assert main(args) == 128 + signal.SIGTERM
    assert "ppo stopped for SIGTERM after step 2; checkpoint-2 is complete" in output(capsys)
    stage = run_dir / "ppo"
    assert checkpoints(stage) == {"checkpoint-2": True}
    assert json.loads((stage / "checkpoints" / "checkpoint-2" / "progress.json").read_text())["step"] == 2
    assert not (stage / "final").exists()

    assert main(args) == 0
    assert "resuming from checkpoint-2" in output(capsys)
    manifest = json.loads((stage / "stage.json").read_text())
    assert manifest["status"] == "completed" and manifest["metrics"]["train/steps"] == 3


def _can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no unprivileged user namespace to mount a tmpfs in (unshare -Urm)")
def test_a_full_disk_fails_clearly_and_the_rerun_resumes(reference, tmp_path):
    """On a tmpfs the test mounts in a user namespace of its own: the run is paused at its first complete
    checkpoint, the disk filled, and the run let go; then space is freed and the same command run again."""
    mount, out = tmp_path / "disk", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    command = " ".join([sys.executable, "-m", "pipeline", *SFT, "--run-dir", f"{mount}/run"])
    script = f"""
        mount -t tmpfs -o size=64m tmpfs {mount}
        {command} > {out}/first.log 2>&1 & pid=$!
        while [ ! -e {mount}/run/sft/checkpoints/checkpoint-2/COMPLETE ] && kill -0 $pid 2>/dev/null; do sleep 0.02; done
        kill -STOP $pid
        dd if=/dev/zero of={mount}/filler bs=64k 2>/dev/null
        kill -CONT $pid
        wait $pid; echo $? > {out}/first.code
        cp -a {mount}/run {out}/full
        rm {mount}/filler
        {command} > {out}/second.log 2>&1; echo $? > {out}/second.code
        cp -a {mount}/run {out}/resumed
    """
    subprocess.run(["unshare", "-Urm", "bash", "-c", script], cwd=REPO, check=True, timeout=600)
    first = " ".join((out / "first.log").read_text().split())
    assert (out / "first.code").read_text().strip() == "2", first[-2000:]
    assert "error: no space left on the device holding" in first and "Traceback" not in first
    full = out / "full" / "sft"
    assert checkpoints(full)["checkpoint-2"] and not (full / "final").exists()
    assert json.loads((full / "stage.json").read_text())["status"] in ("failed", "running")
    assert not list(full.glob(".*.tmp")) and not list(full.parent.glob(".*.tmp"))  # no half-written files kept

    second = " ".join((out / "second.log").read_text().split())
    assert (out / "second.code").read_text().strip() == "0", second[-2000:]
    assert "resuming from checkpoint-" in second
    resumed = out / "resumed" / "sft"
    assert json.loads((resumed / "stage.json").read_text())["status"] == "completed"
    assert max_abs_diff(reference / "final", resumed / "final") <= 1e-6


def test_a_report_that_does_not_fit_on_the_disk_fails_nothing(tmp_path, capsys, monkeypatch, in_repo):
    """Every stage's result is saved before the report is written: ENOSPC there is a warning, and the run succeeds."""
    import errno

    from pipeline import report

    def full(run_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write", full)
    run_dir = tmp_path / "run"
    assert main(["run", "--config", SMOKE, "--stage", "preferences", "--run-dir", str(run_dir)]) == 0
    said = output(capsys)
    assert "the report could not be written (No space left on device)" in said
    assert "writes it once there is room" in said
    assert json.loads((run_dir / "preferences" / "stage.json").read_text())["status"] == "completed"
