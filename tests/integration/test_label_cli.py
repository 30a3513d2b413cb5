"""`python -m pipeline label`: a person labels a run's pairs in the terminal, stdin fed by the test. No models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.cli import main
from reward.build import human_labels_path
from pipeline.lock import RunLock
from reward.pairs import LabelStore, Pair, write_pairs

ROOT = Path(__file__).resolve().parents[2]


def make_run(tmp_path: Path, n: int = 3) -> tuple[Path, list[Pair]]:
    run_dir = tmp_path / "run"
    pairs = [Pair.create([{"role": "user", "content": f"How do bees find flower {i}?"}], f"By smell [{i}].",
                         f"By [bold]dancing[/bold] {i}.", f"prompts.jsonl:{i}") for i in range(n)]
    write_pairs(run_dir / "preferences" / "pairs.jsonl", pairs)
    return run_dir, pairs


def label(run_dir: Path, stdin: str, *extra: str) -> tuple[int, str]:
    """The exit code and stderr, whitespace collapsed: rich wraps long lines (tmp paths) at 80 columns in a pipe."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline", "label", "--run-dir", str(run_dir), *extra],
                            input=stdin, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    return result.returncode, " ".join(result.stderr.split())


def test_label_quit_then_resume_until_done(tmp_path):
    run_dir, pairs = make_run(tmp_path)
    code, output = label(run_dir, "a\nb\nq\n", "--judge-name", "alice")
    assert code == 0, output
    store = LabelStore(human_labels_path(run_dir))
    assert [(label.pair_id, label.winner, label.judge) for label in store.labels()] == [
        (pairs[0].id, "a", "alice"), (pairs[1].id, "b", "alice")]
    assert f"1 of 3 pairs still unlabelled; continue with `python -m pipeline label --run-dir {run_dir}`" in output
    assert "By [bold]dancing[/bold] 0." in output  # model text is shown as written

    code, output = label(run_dir, "tie\n")
    assert code == 0, output
    assert "all 3 pairs labelled; run `python -m pipeline run` to continue" in output
    assert "pair 3 of 3 · 2 labelled · 1 to go" in output
    assert "pair 1 of 3" not in output  # labelled pairs are not shown again
    lines = human_labels_path(run_dir).read_text().splitlines()
    assert len(lines) == 3
    store = LabelStore(human_labels_path(run_dir))  # raises if any pair were labelled twice
    assert [store.get(pair.id).winner for pair in pairs] == ["a", "b", "tie"]


def test_labels_go_where_the_preferences_stage_reads_them(tmp_path):
    from pipeline.config import load_config
    from reward.build import labels_path

    config = load_config(ROOT / "configs" / "smoke.yaml", ["preferences.judge={type: human}"])
    assert labels_path(config, tmp_path) == human_labels_path(tmp_path)


def test_a_run_judged_by_something_else_is_refused(tmp_path, capsys):
    run_dir, _ = make_run(tmp_path)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"preferences": {"judge": {"type": "rule"}}}))
    assert main(["label", "--run-dir", str(run_dir)]) == 2
    assert "this run's judge is 'rule'" in " ".join(capsys.readouterr().err.split())
    assert not human_labels_path(run_dir).exists()


def test_missing_pairs_file_exits_2(tmp_path):
    code, output = label(tmp_path / "run", "a\n")
    assert code == 2
    assert "has no pairs to label yet" in output
    assert "run `python -m pipeline run --stage preferences` first" in output


def test_run_in_use_exits_2(tmp_path):
    run_dir, _ = make_run(tmp_path)
    with RunLock(run_dir):
        code, output = label(run_dir, "a\n")
    assert code == 2
    assert "in use" in output
    assert not human_labels_path(run_dir).exists()
