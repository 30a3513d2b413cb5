"""Bad input stops `run` before any compute, with an error naming file, line and field, and leaves no run dir."""

from __future__ import annotations

import pytest
from conftest import REPO

from pipeline.cli import main

SMOKE = str(REPO / "configs" / "smoke.yaml")
GOOD = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'

CASES = {
    "bad_json": (GOOD + GOOD + '{"messages": [\n', "sft", "bad.jsonl:3:", None),
    "missing_field": (GOOD + '{"conversation": []}\n', "sft", "bad.jsonl:2:", "messages"),
    "empty_response": (GOOD + '{"messages": [{"role": "user", "content": "q"}, '
                       '{"role": "assistant", "content": "  "}]}\n', "sft", "bad.jsonl:2:", "messages[1].content"),
    "unknown_role": ('{"messages": [{"role": "robot", "content": "q"}]}\n', "sft", "bad.jsonl:1:", "messages[0].role"),
    "wrong_type": ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}\n',
                   "sft", "bad.jsonl:1:", "messages[0].content"),
    "empty_file": ("", "sft", "bad.jsonl:", None),
    "non_utf8": (b'{"messages": []}\n{"messages": "\xff"}\n', "sft", "bad.jsonl:2:", None),
    "cpt_empty_text": ('{"text": "fine"}\n{"text": ""}\n', "cpt", "bad.jsonl:2:", "text"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_names_file_line_field_and_leaves_nothing(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(REPO)
    content, stage, where, field = CASES[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    run_dir = tmp_path / "run"
    code = main(["run", "--config", SMOKE, "--stage", stage, "--run-dir", str(run_dir),
                 "--set", f"{stage}.data.train={bad}"])
    message = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert where in message.replace(str(tmp_path) + "/", "")
    if field:
        assert f"'{field}'" in message
    assert not run_dir.exists()


def test_bad_config_key_suggests_and_leaves_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", "--config", SMOKE, "--run-dir", str(run_dir), "--set", "sft.trainer.learnig_rate=1e-4"])
    assert code == 2
    assert "did you mean 'learning_rate'" in " ".join(capsys.readouterr().err.split())
    assert not run_dir.exists()


def test_validate_reports_lengths_and_a_rendered_sample_without_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = main(["validate", "--config", SMOKE, "--run-dir", str(tmp_path / "run"), "--set", "sft.trainer.max_length=96"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 0
    assert "over max_length=96 (these would be left out)" in err
    assert "⟦" in err and "<|im_end|>⟧" in err
    assert "target modules all-linear" in err
    assert not (tmp_path / "run").exists()


def test_validate_names_missing_peft_target_modules(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = main(["validate", "--config", SMOKE, "--set", "peft.options.target_modules=[q_proj, qkv]"])
    assert code == 2
    assert "['qkv'] are not modules of this model" in " ".join(capsys.readouterr().err.split())
