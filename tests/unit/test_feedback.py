"""kto's data: unpaired thumbs-up/down rows in LLaMA-Factory's and TRL's shapes, pairs turned into such rows, and the
errors a bad file or option gets before any compute (file:line:field, or the config key)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError
from reward.importers import load_feedback
from reward.pairs import FeedbackRow, PreferenceRow, unpaired
from stages import kto, simpo

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_every_feedback_shape_reads_to_the_same_rows(tmp_path):
    """LLaMA-Factory's KTO files (its kto_en_demo.json: messages + label; sharegpt or alpaca with kto_tag) and TRL's
    unpaired prompt/completion rows: the last assistant turn is the response judged, the turns before it the prompt."""
    path = write_jsonl(tmp_path / "f.jsonl", [
        {"messages": [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "2+2?"), msg("assistant", "4")],
         "label": True},
    ])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "5"}], "system": "Be brief.",
         "kto_tag": False}])
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "2+2?", "input": "", "output": "4", "kto_tag": True}])
    trl = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": [msg("user", "2+2?")], "completion": [msg("assistant", "5")], "label": False}])

    [row] = load_feedback(path)
    assert row == FeedbackRow([msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "2+2?")], "4", True,
                              f"{path}:1")
    [row] = load_feedback(sharegpt)
    assert (row.prompt, row.completion, row.label) == ([msg("system", "Be brief."), msg("user", "2+2?")], "5", False)
    assert [(r.prompt, r.completion, r.label) for r in load_feedback(alpaca)] == [([msg("user", "2+2?")], "4", True)]
    assert [(r.prompt, r.completion, r.label) for r in load_feedback(trl, "prompt_completion")] == [
        ([msg("user", "2+2?")], "4", True), ([msg("user", "2+2?")], "5", False)]


@pytest.mark.parametrize("record, field, message", [
    ({"messages": [msg("user", "Hi"), msg("assistant", "Yo")]}, "label", "is required but missing"),
    ({"messages": [msg("user", "Hi"), msg("assistant", "Yo")], "label": "true"}, "label",
     "must be true or false, found string 'true'"),
    ({"messages": [msg("user", "Hi"), msg("assistant", "Yo")], "label": True, "kto_tag": True}, "kto_tag",
     "label and kto_tag are both given"),
    ({"messages": [msg("user", "Hi")], "label": True}, "messages[0].role", "must end with an assistant turn"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}], "label": True},
     "conversations[1].from", "unknown role 'bot'"),
    ({"prompt": "Hi", "completion": 3, "label": True}, "completion", "must be a string or an array of messages"),
])
def test_a_bad_row_names_file_line_and_field(tmp_path, record, field, message):
    good = {"messages": [msg("user", "Hi"), msg("assistant", "Yo")], "label": False}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record] if "messages" in record else [record])
    line = 2 if "messages" in record else 1
    with pytest.raises(DataError, match=message) as error:
        load_feedback(path)
    assert f"bad.jsonl:{line}" in str(error.value) and field in str(error.value)


def test_pairs_become_a_desirable_and_an_undesirable_row():
    rows = unpaired([PreferenceRow([msg("user", "Q")], "good", "bad", source="p.jsonl:3")])
    assert rows == [FeedbackRow([msg("user", "Q")], "good", True, "p.jsonl:3"),
                    FeedbackRow([msg("user", "Q")], "bad", False, "p.jsonl:3")]


def test_kto_refuses_a_file_with_one_label_and_options_it_cannot_honour(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    one_kind = write_jsonl(tmp_path / "up.jsonl", [{"prompt": f"Q{i}", "completion": "A", "label": True}
                                                  for i in range(4)])
    with pytest.raises(ConfigError, match=r"kto.data.train: every row of .*up.jsonl is labelled true"):
        kto.check(load_config(SMOKE, [f"kto.data.train={one_kind}"]))
    for override, message in [
        ("kto.trainer.per_device_train_batch_size=1", "must be at least 2: KTO estimates its KL term"),
        ("kto.trainer.train_sampling_strategy=random", "must stay sequential"),
        ("kto.trainer.desirable_wieght=2", r"kto.trainer.desirable_wieght is not an option of KTOConfig.*"
                                           r"'desirable_weight'"),
        ("kto.data.format=prompt", "kto.data.format 'prompt' is not one of auto, messages"),
        ("kto.data.columns={label: thumbs}", "kto.data.columns: kto reads its files by their own field names"),
    ]:
        with pytest.raises(ConfigError, match=message):
            kto.check(load_config(SMOKE, [override]))
    # apo_zero_unpaired has no KL term, so a batch of one is fine there.
    kto.check(load_config(SMOKE, ["kto.trainer.per_device_train_batch_size=1",
                                  "kto.trainer.loss_type=apo_zero_unpaired"]))


def test_kto_holds_out_by_prompt_and_shuffles_its_training_rows(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": f"Q{i // 2}", "completion": f"A{i}", "label": i % 2 == 0}
                                              for i in range(40)])
    train, held_out = kto.load(load_config(SMOKE, [f"kto.data.train={path}", "kto.data.eval_split=0.25"]))
    assert len(train) + len(held_out) == 40 and len(held_out) == 10
    assert not {r.completion for r in held_out} & {r.completion for r in train}
    assert not {r.prompt[0]["content"] for r in held_out} & {r.prompt[0]["content"] for r in train}
    assert [r.completion for r in train] != sorted((r.completion for r in train), key=lambda c: int(c[1:]))


def test_simpo_trains_simpo_and_refuses_cpo_s_other_losses(monkeypatch):
    monkeypatch.chdir(REPO)
    from stages import hf_trainer

    args = hf_trainer.check_trainer_keys(load_config(SMOKE), "simpo", simpo.DEFAULTS)
    assert (args.loss_type, args.cpo_alpha) == ("simpo", 0.0)
    with pytest.raises(ConfigError, match="simpo.trainer.loss_type is 'sigmoid'"):
        simpo.check(load_config(SMOKE, ["simpo.trainer.loss_type=sigmoid"]))
    simpo.check(load_config(SMOKE, ["simpo.trainer.cpo_alpha=0.5"]))  # CPO-SimPO: SimPO plus CPO's NLL term
