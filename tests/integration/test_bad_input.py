"""Bad input stops every command before any compute, with one line naming the file, line and field (or the config
key), exit code 2, and the run directory untouched. The cases are in bad_input_corpus.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_input_corpus import CASES, GOOD_SFT
from conftest import REPO

from pipeline.cli import main

SMOKE = str(REPO / "configs" / "smoke.yaml")


def snapshot(path: Path) -> dict | None:
    """Every file under `path` with its size and modification time; None when there is no such directory."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def fill(arg: str, run_dir: Path, tmp: Path) -> str:
    """The corpus's placeholders; not str.format, as YAML values hold braces of their own."""
    return arg.replace("{smoke}", SMOKE).replace("{run}", str(run_dir)).replace("{tmp}", str(tmp))


def test_the_corpus_covers_every_command_and_stage():
    assert len(CASES) >= 40 and len({case.name for case in CASES}) == len(CASES)
    used = {arg for case in CASES for arg in case.args}
    assert {"run", "plan", "status", "validate", "label", "report", "join"} <= used
    stages = {stage for case in CASES for flag, stage in zip(case.args, case.args[1:]) if flag == "--stage"}
    assert {"cpt", "sft", "preferences", "rm", "dpo", "ppo"} <= stages


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_gives_one_clear_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(REPO)
    for name, content in case.files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    for var, value in case.env.items():
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, fill(value, tmp_path / "run", tmp_path))
    kept = case.setup(tmp_path) if case.setup else None  # e.g. another process's lock, held until the end
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    try:
        code = main([fill(arg, run_dir, tmp_path) for arg in case.args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line.replace(str(tmp_path) + "/", "") for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for words in case.expect:
        assert words in errors[0], errors[0]
    assert code == 2
    assert snapshot(run_dir) == before, "the run directory changed"
    del kept


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
    bad.write_text((GOOD_SFT + '{"messages": [{"role": "user", "content": "q"}]}\n') * 9)
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
