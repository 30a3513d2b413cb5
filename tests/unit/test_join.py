"""The follower side of a multi-machine run, without training: what it waits for, what it refuses."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.join import follow
from pipeline.launch import announced, current_run_id


def _two_machines():
    return load_config(None, ["distributed.num_machines=2", "distributed.main_process_ip=10.0.0.1"])


def test_a_multi_machine_run_announces_itself_then_how_it_ended(tmp_path):
    with announced(tmp_path, _two_machines()):
        state = json.loads((tmp_path / "join.json").read_text())
        assert state == {"run_id": current_run_id(tmp_path), "finished": False}
    assert json.loads((tmp_path / "join.json").read_text())["ok"] is True

    with pytest.raises(RuntimeError), announced(tmp_path, _two_machines()):
        raise RuntimeError("a stage failed")
    state = json.loads((tmp_path / "join.json").read_text())
    assert state["finished"] is True and state["ok"] is False


def test_a_single_machine_run_writes_nothing_for_followers(tmp_path):
    with announced(tmp_path, load_config(None, [])):
        pass
    assert not (tmp_path / "join.json").exists()


def test_follower_waits_for_a_new_run_rather_than_reporting_an_old_one(tmp_path):
    with announced(tmp_path, _two_machines()):
        pass  # an earlier run that has ended: a follower started now waits for the next
    with pytest.raises(PipelineError, match="no run in .* finished within 1 s"):
        follow(tmp_path, machine_rank=1, timeout_s=1)


def test_follower_on_machine_0_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="--machine-rank must be 1 or more"):
        follow(tmp_path, machine_rank=0, timeout_s=1)
