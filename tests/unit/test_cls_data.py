"""cls's rows and labels, read without compute: every bad row named by file, line and field; the config refusing
what cls would not use; the held-out measures."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from pipeline.config import load_config
from pipeline.errors import ConfigError, PipelineError
from stages import cls
from stages.metrics import classification

CLASSIFY = REPO / "configs" / "classify.yaml"


def _config(tmp_path, train_lines: list, *overrides: str, eval_lines: list | None = None, suffix: str = ".jsonl"):
    train = tmp_path / f"train{suffix}"
    train.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in train_lines))
    sets = [f"cls.data.train={train}", "cls.data.eval=", "cls.data.eval_split=0", "cls.labels=[]",
            "cls.data.columns={}"]
    if eval_lines is not None:
        held = tmp_path / f"eval{suffix}"
        held.write_text("".join(json.dumps(line) + "\n" for line in eval_lines))
        sets.append(f"cls.data.eval={held}")
    return load_config(CLASSIFY, [*sets, *overrides]), train


GOOD = [{"text": "Lovely.", "label": "positive"}, {"text": "Awful.", "label": "negative"}]


def test_the_shipped_sentiment_set_is_balanced_and_its_held_out_wording_is_new():
    rows = cls.load(load_config(CLASSIFY))
    train, held_out = rows.split
    assert rows.labels == ["negative", "positive"] and (len(train), len(held_out)) == (320, 100)
    for split in (train, held_out):
        assert sum(label for _, label in split) * 2 == len(split)
    assert not {text for text, _ in train} & {text for text, _ in held_out}
    # No single word tells the labels apart: the commonest cue words occur on both sides.
    for word in ("not", "but", "good", "bad", "great"):
        sides = {label for text, label in train if word in text.lower().replace(",", " ").split()}
        assert sides == {0, 1}, word


@pytest.mark.parametrize("row, field, message", [
    ({"text": "", "label": "positive"}, "text", "is empty"),
    ({"text": "   ", "label": "positive"}, "text", "must be a non-empty string"),
    ({"label": "positive"}, "text", "is required but missing"),
    ({"text": "Fine."}, "label", "is required but missing"),
    ({"text": "Fine.", "label": True}, "label", "must be a string (a label's name) or an integer"),
    ({"text": "Fine.", "label": -1}, "label", "is -1: an index into cls.labels is 0 or more"),
    ({"text": 3, "label": "positive"}, "text", "must be a string, found number"),
])
def test_a_bad_row_is_named_by_file_line_and_field(tmp_path, row, field, message):
    config, train = _config(tmp_path, [*GOOD, row])
    with pytest.raises(PipelineError) as error:
        cls.load(config)
    assert f"{train}:3: field '{field}' {message}" in str(error.value)


def test_every_bad_row_is_listed_or_dropped_and_counted(tmp_path):
    rows = [*GOOD, {"text": "", "label": "positive"}, *GOOD, {"text": "Fine."}]
    config, train = _config(tmp_path, rows)
    with pytest.raises(PipelineError, match=r"2 bad rows") as error:
        cls.load(config)
    assert f"{train}:3:" in str(error.value) and f"{train}:6:" in str(error.value)
    config, _ = _config(tmp_path, rows, "cls.data.bad_rows=drop")
    loaded = cls.load(config)
    assert len(loaded.split.train) == 4 and loaded.split.dropped == {"data/dropped_bad_rows": 2}


def test_a_column_mapping_the_file_does_not_have_names_the_column(tmp_path):
    config, train = _config(tmp_path, GOOD, "cls.data.columns={text: review}")
    with pytest.raises(PipelineError, match=rf"{train}:1: field 'review' is required but missing \(see cls.data.columns\)"):
        cls.load(config)
    csv_text = "review,verdict\nLovely.,positive\nAwful.,negative\n"
    config, train = _config(tmp_path, [csv_text], "cls.data.columns={text: body, label: verdict}", suffix=".csv")
    with pytest.raises(PipelineError, match=rf"{train}:1: field 'body' is not a column of the CSV file; its header "
                                            r"has: review, verdict"):
        cls.load(config)


def test_csv_rows_with_renamed_columns_quoted_lines_and_index_labels(tmp_path):
    csv_text = 'review,verdict\n"Lovely, truly.",1\n"Awful\nand long.",0\n\nFine.,1\n'
    config, train = _config(tmp_path, [csv_text], "cls.data.columns={text: review, label: verdict}",
                            "cls.labels=[negative, positive]", suffix=".csv")
    rows = cls.load(config)
    assert rows.split.train == [("Lovely, truly.", 1), ("Awful\nand long.", 0), ("Fine.", 1)]
    bad = csv_text + "Broken,1,extra\n"
    config, train = _config(tmp_path, [bad], "cls.data.columns={text: review, label: verdict}", suffix=".csv")
    with pytest.raises(PipelineError, match=rf"{train}:7: has 3 fields, the header has 2"):
        cls.load(config)


def test_labels_unknown_to_the_config_or_the_training_rows_are_refused(tmp_path):
    config, train = _config(tmp_path, [*GOOD, {"text": "Meh.", "label": "neutral"}], "cls.labels=[negative, positive]")
    with pytest.raises(PipelineError, match=rf"{train}:3: field 'label' 'neutral' is not one of cls.labels: "
                                            "negative, positive"):
        cls.load(config)
    config, _ = _config(tmp_path, GOOD, eval_lines=[{"text": "Meh.", "label": "neutral"}])
    with pytest.raises(PipelineError, match=r"eval.jsonl:1: field 'label' 'neutral' is not one of the training rows' "
                                            r"labels \(set cls.labels to name every label\)"):
        cls.load(config)
    config, train = _config(tmp_path, [*GOOD, {"text": "Hm.", "label": 2}], "cls.labels=[negative, positive]")
    with pytest.raises(PipelineError, match=rf"{train}:3: field 'label' is the index 2, but there are 2 labels"):
        cls.load(config)
    config, train = _config(tmp_path, [*GOOD, {"text": "Hm.", "label": 1}])
    with pytest.raises(PipelineError, match=rf"{train}:3: field 'label' is the index 1, but other rows name their label"):
        cls.load(config)


def test_labels_come_from_the_training_rows_when_not_configured(tmp_path):
    rows = [{"text": f"Text {i}.", "label": label} for i, label in enumerate(["b", "c", "a", "c"])]
    config, _ = _config(tmp_path, rows)
    loaded = cls.load(config)
    assert loaded.labels == ["a", "b", "c"] and [label for _, label in loaded.split.train] == [1, 2, 0, 2]
    config, _ = _config(tmp_path, [{"text": f"Text {i}.", "label": i % 3} for i in range(6)])
    assert cls.load(config).labels == ["0", "1", "2"]
    config, _ = _config(tmp_path, [{"text": "One.", "label": "a"}, {"text": "Two.", "label": "a"}])
    with pytest.raises(ConfigError, match="1 distinct label"):
        cls.load(config)


@pytest.mark.parametrize("override, message", [
    ("cls.data.columns={body: review}", "cls.data.columns.body: cls reads the fields text and label"),
    ("cls.labels=[positive]", "cls.labels must name at least two distinct labels"),
    ("cls.labels=[a, a]", "cls.labels must name at least two distinct labels"),
    ("cls.data.format=messages", "cls.data holds rows of text and label"),
    ("cls.data.general_eval=data/general/general.txt", "cls.data holds rows of text and label"),
    ("cls.max_length=0", "cls.max_length must be at least 1"),
    ('cls.data.train=""', "cls.data.train (rows of text and label) is required"),
])
def test_the_config_refuses_what_cls_would_not_use(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(CLASSIFY, [override])


def test_check_refuses_a_chat_stage_to_start_from_and_distributed_runs():
    with pytest.raises(ConfigError, match="cls starts from the base model"):
        cls.check(load_config(CLASSIFY, ["cls.init_from=sft"]))
    with pytest.raises(ConfigError, match="cls trains in one process"):
        cls.check(load_config(CLASSIFY, ["distributed.num_processes=2"]))
    with pytest.raises(ConfigError, match="cls.trainer.max_lenght is not an option of TrainingArguments"):
        cls.check(load_config(CLASSIFY, ["cls.trainer.max_lenght=3"]))


def test_the_other_shipped_configs_leave_cls_off():
    for path in (REPO / "configs").glob("*.yaml"):
        assert load_config(path).cls.enabled == (path.name == "classify.yaml"), path.name


def test_classification_measures():
    found = classification([0, 1, 1, 2, 0], [0, 1, 2, 2, 1], 3)
    assert found["accuracy"] == pytest.approx(3 / 5)
    assert found["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    # F1 per label: 0: 2*1/(2+1), 1: 2*1/(2+2), 2: 2*1/(1+2)
    assert found["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)


def test_preflight_takes_an_encoder_or_a_causal_lm_for_cls(tiny_bert_dir, tiny_model_dir):
    """cls needs a model transformers has a sequence-classification head for, decided from config.json before any
    weights load: an encoder, or a causal LM (whose head reads the last token that is not padding)."""
    from pipeline.runner import preflight

    for model in (tiny_bert_dir, tiny_model_dir):
        preflight(load_config(CLASSIFY, [f"model.name_or_path={model}"]), ["cls"])
