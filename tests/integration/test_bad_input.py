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


def test_every_bad_row_is_listed_in_one_pass(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad.jsonl"
    bad.write_text((GOOD + '{"messages": [{"role": "user", "content": "q"}]}\n') * 9)
    code = main(["validate", "--config", SMOKE, "--stage", "sft", "--set", f"sft.data.train={bad}"])
    message = capsys.readouterr().err
    assert code == 2
    assert "sft.data: 9 bad rows:" in message and "sft.data.bad_rows: drop" in message
    assert [f"bad.jsonl:{line}:" in message for line in range(2, 19, 2)] == [True] * 9


def test_a_txt_corpus_of_one_document_per_line_is_not_split_silently(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Document number {i} on a line of its own.\n" for i in range(20)))
    code = main(["validate", "--config", SMOKE, "--stage", "cpt", "--set", f"cpt.data.train={corpus}"])
    assert code == 2
    assert "set cpt.data.format: lines" in " ".join(capsys.readouterr().err.split())
    code = main(["validate", "--config", SMOKE, "--stage", "cpt", "--set", f"cpt.data.train={corpus}",
                 "--set", "cpt.data.format=lines", "--set", "cpt.data.eval_split=0.1"])
    assert code == 0
    assert "18 train / 2 eval records" in " ".join(capsys.readouterr().err.split())


def test_options_that_do_not_apply_are_refused(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    for setting, fragment in [("rm.data.columns={chosen: good}", "rm.data.format and rm.data.columns describe"),
                              ("dpo.data.delimiters={start: '<s>'}", "only sft reads delimited samples"),
                              ("sft.data.bad_rows=skip", "must be error or drop")]:
        code = main(["validate", "--config", SMOKE, "--stage", "rm", "--stage", "dpo", "--set", setting])
        assert code == 2 and fragment in " ".join(capsys.readouterr().err.split()), setting


@pytest.mark.parametrize("settings, fragment", [
    (["model.load_in_4bit=true"], "model.load_in_4bit loads the base weights quantised by bitsandbytes, which needs a "
                                  "CUDA GPU (this machine has none)"),
    (["model.load_in_8bit=true", "peft.method=full", "peft.options={}"], "peft.method full would train the quantised"),
    (["model.load_in_4bit=true", "model.load_in_8bit=true"], "choose one"),
    (["model.attn_implementation=flash_attention_2"], "needs a CUDA GPU"),
    (["sft.trainer.model_init_kwargs={attn_implementation: eager}"], "would be ignored: the pipeline loads the model"),
    (["model.name_or_path=acme/not-cached"], "is not in the Hugging Face cache"),
    (["model.revision=v2"], "applies to Hub models"),
])
def test_model_options_this_machine_cannot_honour_are_refused_before_compute(tmp_path, capsys, monkeypatch,
                                                                              settings, fragment):
    import torch

    if torch.cuda.is_available() and "CUDA" in fragment:
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    code = main(["run", "--config", SMOKE, "--stage", "sft", "--run-dir", str(run_dir),
                 *[arg for setting in settings for arg in ("--set", setting)]])
    assert code == 2
    assert fragment in " ".join(capsys.readouterr().err.split())
    assert not run_dir.exists()
