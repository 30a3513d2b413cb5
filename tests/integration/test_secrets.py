"""Secrets and untrusted files: an API judge's key is written nowhere, remote code never runs, and a checkpoint is
only ever loaded as weights (safetensors, or torch.load with weights_only), never as a pickle that runs code.

The pipeline test runs the API judge with a recognisable key, in a HOME and TMPDIR of its own so that everything any
library writes (W&B's offline files and caches, TensorBoard events, checkpoints, the logs) is under the test's
directory, and searches every byte of it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from conftest import REPO
from judge_server import start_server, stop_server

SMOKE = str(REPO / "configs" / "smoke.yaml")
KEY = "sk-canary-7f3a9c1e5b2d4680e1-never-write-me"
NEEDLES = [KEY.encode(), b"7f3a9c1e5b2d4680e1"]  # the whole key, and its random part alone (a partial leak)


def judge_args(url: str) -> list[str]:
    return [f"--set={item}" for item in (
        "preferences.judge.type=api", f"preferences.judge.base_url={url}", "preferences.judge.model=canary-judge",
        "preferences.judge.api_key_env=CANARY_JUDGE_KEY", "preferences.judge.path=", "preferences.judge.batch_size=64",
        "preferences.judge.max_concurrency=8", "tracking.report_to=[wandb, tensorboard]")]


def leaks(root: Path, since: float = 0.0) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since:
            data = path.read_bytes()
            found += [f"{path}: {needle!r}" for needle in NEEDLES if needle in data]
    return found


def test_an_api_judge_key_is_written_nowhere(tmp_path):
    server = start_server()
    server.prefers = lambda a, b: len(a) <= len(b)
    env = {**os.environ, "CANARY_JUDGE_KEY": KEY, "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"),
           "WANDB_MODE": "offline"}
    for name in ("home", "tmp"):
        (tmp_path / name).mkdir()
    started = time.time()
    try:
        # 1. The API judge labels the shipped pairs; a reward model trains on its labels (checkpoints, trackers).
        ok = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", SMOKE, "--run-dir",
                             str(tmp_path / "run"), "--stage", "preferences", "--stage", "rm", *judge_args(server.url),
                             "--set=rm.trainer.max_steps=2", "--set=rm.data.eval_split=0", "--set=rm.data.probes={}"], cwd=REPO, env=env, capture_output=True)
        assert ok.returncode == 0, ok.stderr.decode()[-3000:]
        # 2. A server that refuses the key and echoes it back, as real APIs do ("Incorrect API key provided: sk-...").
        server.script = [(401, {}, json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}"}}))]
        refused = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", SMOKE, "--run-dir",
                                  str(tmp_path / "refused"), "--stage", "preferences", *judge_args(server.url)],
                                 cwd=REPO, env=env, capture_output=True)
    finally:
        stop_server(server)
    assert refused.returncode == 2 and b"HTTP 401" in refused.stderr and b"***" in refused.stderr
    assert server.requests and {r["headers"]["Authorization"] for r in server.requests} == {f"Bearer {KEY}"}
    (tmp_path / "logs").mkdir()
    for name, result in (("ok", ok), ("refused", refused)):  # the logs: what the runs printed
        (tmp_path / "logs" / f"{name}.out").write_bytes(result.stdout + result.stderr)

    run = tmp_path / "run"
    assert list((run / "wandb").glob("offline-run-*/*.wandb")), "no W&B offline files to search"
    assert list((run / "rm" / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard events to search"
    assert list((run / "rm" / "checkpoints").glob("checkpoint-*/COMPLETE"))
    assert json.loads((tmp_path / "refused" / "preferences" / "stage.json").read_text())["status"] == "failed"
    assert not leaks(tmp_path)
    cache = Path(os.environ["PIPELINE_CACHE_DIR"])
    assert not leaks(cache, since=started)


def test_a_traceback_through_the_api_judge_holds_no_key(monkeypatch):
    """An unexpected failure while a request is under way, printed plainly and as a traceback that shows every
    frame's locals (pytest -l, error trackers)."""
    import urllib.request

    from pipeline.config import JudgeConfig
    from reward.api_judge import ApiJudge, ApiJudgeConfig
    from reward.pairs import Pair

    monkeypatch.setenv("CANARY_JUDGE_KEY", KEY)

    def broken(request, timeout):
        raise RuntimeError("the connection pool broke")

    monkeypatch.setattr(urllib.request, "urlopen", broken)
    config = JudgeConfig(type="api", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="CANARY_JUDGE_KEY")
    judge = ApiJudge(ApiJudgeConfig(config.base_url, config.model, config.api_key_env, max_retries=0))
    with pytest.raises(RuntimeError) as info:
        judge.judge([Pair.create([{"role": "user", "content": "q"}], "a", "b", "test")])
    for text in ("".join(traceback.format_exception(info.value)),
                 "".join(traceback.TracebackException.from_exception(info.value, capture_locals=True).format())):
        assert "the connection pool broke" in text and "_post" in text
        assert KEY not in text and "7f3a9c1e5b2d4680e1" not in text


def test_remote_code_is_off_and_cannot_be_switched_on():
    from pipeline.config import REGISTRY
    from pipeline.errors import ConfigError
    from stages.hf_trainer import trainer_args

    for name, stage in REGISTRY.items():
        if stage.trainer and stage.trainer.startswith("trl:"):
            config_cls = stage.trainer_config()
            assert trainer_args(config_cls, name, {}, 0, output_dir="unused").trust_remote_code is False
            with pytest.raises(ConfigError, match=f"{name}.trainer.trust_remote_code would be ignored"):
                trainer_args(config_cls, name, {"trust_remote_code": True}, 0, output_dir="unused")
    ours = "\n".join(p.read_text() for d in ("pipeline", "stages", "reward") for p in (REPO / d).rglob("*.py"))
    assert not re.search(r"trust_remote_code\s*=\s*True", ours)


def test_checkpoints_load_as_weights_only():
    """Our code never unpickles: no pickle module loads, and every torch.load says weights_only=True (a resume of
    an HF trainer's checkpoint goes through transformers, which passes weights_only=True; torch defaults to it)."""
    import inspect

    import torch

    for path in (p for d in ("pipeline", "stages", "reward") for p in (REPO / d).rglob("*.py")):
        source = path.read_text()
        assert not re.search(r"pickle\.loads?\(", source), path
        for call in re.finditer(r"torch\.load\(([^)]*)\)", source):
            assert "weights_only=True" in call.group(1), f"{path}: {call.group(0)}"
    assert inspect.signature(torch.load).parameters["weights_only"].default in (None, True)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pipeline-secrets-test-pwned",))


def test_a_ppo_checkpoint_that_would_run_code_is_refused(tmp_path):
    """PPO keeps its loop state as progress.json; a checkpoint from before that holds accelerate's pickle, which
    is read as plain data only. One that would run code is refused, not run."""
    import torch

    from pipeline.errors import PipelineError
    from stages.ppo.losses import FixedKLController
    from stages.ppo.trainer import PROGRESS, Progress

    marker = Path("/tmp/pipeline-secrets-test-pwned")
    marker.unlink(missing_ok=True)
    saved = Progress(FixedKLController(0.07))
    saved.step = 3
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / PROGRESS).write_text(json.dumps(saved.state_dict()))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(saved.state_dict(), legacy / "custom_checkpoint_0.pkl")
    for checkpoint in (plain, legacy):
        loaded = Progress(FixedKLController(0.0))
        loaded.load(checkpoint)
        assert (loaded.step, loaded.kl_controller.value) == (3, 0.07)

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    with open(hostile / "custom_checkpoint_0.pkl", "wb") as handle:
        pickle.dump({"step": _RunsCode()}, handle)
    with pytest.raises(PipelineError, match="holds more than plain data"):
        Progress(FixedKLController(0.0)).load(hostile)
    assert not marker.exists()
