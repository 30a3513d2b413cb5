"""Config loading and validation: every shipped config is valid, every mistake names its dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import PEFT_METHODS, RunConfig, load_config
from pipeline.errors import ConfigError
from pipeline.models import peft_config_for
from pipeline.runner import preflight, selected_stages
from stages.hf_trainer import MANAGED_KEYS, trainer_args

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SFT_TRAIN = "data/sft/beekeeping_qa.jsonl"


def write_config(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def minimal(**sections) -> dict:
    """A valid config with only the sft stage; keyword sections are merged in."""
    data = {"sft": {"data": {"train": SFT_TRAIN, "format": "messages"}}}
    for key, value in sections.items():
        data[key] = value
    return data


@pytest.fixture
def in_repo(monkeypatch):
    """Data paths in the configs are relative to the repository root."""
    monkeypatch.chdir(REPO)


# ---------------------------------------------------------------------------- shipped configs

def test_there_are_configs():
    assert CONFIGS, "configs/*.yaml is empty"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_passes_preflight(path, in_repo):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert config.source == str(path)
    stages = selected_stages(config, None)
    assert stages
    preflight(config, stages)


def test_default_config_is_demo():
    config = load_config(None)
    assert Path(config.source).name == "demo.yaml"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top_list = tmp_path / "list.yaml"
    top_list.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top_list)


def test_writing_a_stage_section_enables_it(tmp_path):
    config = load_config(write_config(tmp_path, minimal(cpt={"data": {"train": "data/cpt/beekeeping.txt"}})))
    assert config.cpt.enabled and config.sft.enabled
    assert selected_stages(config, None) == ["cpt", "sft"]
    off = load_config(write_config(tmp_path, minimal(cpt={"enabled": False, "data": {"train": "x.txt"}})))
    assert selected_stages(off, None) == ["sft"]
    assert load_config(write_config(tmp_path, minimal())).cpt.enabled is False  # absent section: off


def test_selected_stages_errors(tmp_path):
    config = load_config(write_config(tmp_path, minimal()))
    assert selected_stages(config, ["sft", "cpt"]) == ["cpt", "sft"]  # pipeline order, not argument order
    with pytest.raises(ConfigError, match="unknown stage 'stf'"):
        selected_stages(config, ["stf"])
    none = load_config(write_config(tmp_path, {"sft": {"enabled": False}}))
    with pytest.raises(ConfigError, match="no stage is enabled"):
        selected_stages(none, None)


# ---------------------------------------------------------------------------- unknown keys

@pytest.mark.parametrize("data, dotted, suggestion", [
    ({"sed": 1}, "sed", "seed"),
    ({"trackng": {}}, "trackng", "tracking"),
    ({"sft": {"trainr": {}}}, "sft.trainr", "trainer"),
    ({"model": {"nme_or_path": "x"}}, "model.nme_or_path", "name_or_path"),
    ({"sft": {"data": {"trian": "x"}}}, "sft.data.trian", "train"),
    ({"peft": {"metod": "lora"}}, "peft.metod", "method"),
    ({"cpt": {"dta": {}}}, "cpt.dta", "data"),
])
def test_unknown_key_names_dotted_key_and_suggests(tmp_path, data, dotted, suggestion):
    merged = minimal()
    for key, value in data.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, merged))
    message = str(info.value)
    assert f"unknown key '{dotted}'" in message
    assert f"did you mean '{suggestion}'" in message
    assert "run.yaml" in message  # names the file too


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'model.zzzzzz' \(valid: .*name_or_path"):
        load_config(write_config(tmp_path, minimal(model={"zzzzzz": 1})))


def test_source_is_not_a_user_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'source'"):
        load_config(write_config(tmp_path, minimal(source="x")))


# ---------------------------------------------------------------------------- wrong types

@pytest.mark.parametrize("data, key", [
    ({"seed": "abc"}, "seed"),  # string for int
    ({"seed": True}, "seed"),  # bool is not an int here
    ({"seed": 1.5}, "seed"),  # float for int
    ({"run_dir": 3}, "run_dir"),
    ({"model": {"name_or_path": 3}}, "model.name_or_path"),
    ({"model": {"chat_template": ["x"]}}, "model.chat_template"),
    ({"peft": {"options": ["r"]}}, "peft.options"),  # list for dict
    ({"tracking": {"report_to": {"wandb": 1}}}, "tracking.report_to"),  # mapping for list
    ({"sft": {"enabled": [True], "data": {"train": SFT_TRAIN}}}, "sft.enabled"),  # list for bool
    ({"sft": {"enabled": "yes", "data": {"train": SFT_TRAIN}}}, "sft.enabled"),  # string for bool
    ({"sft": {"data": {"train": SFT_TRAIN, "eval_split": "0.1"}}}, "sft.data.eval_split"),  # string for float
    ({"sft": {"data": {"train": SFT_TRAIN, "eval_split": True}}}, "sft.data.eval_split"),
    ({"sft": {"data": {"train": 5}}}, "sft.data.train"),
    ({"sft": {"data": {"train": SFT_TRAIN}, "trainer": 5}}, "sft.trainer"),
])
def test_wrong_type_names_key(tmp_path, data, key):
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, minimal(**data)))
    assert f"'{key}' must be" in str(info.value)


@pytest.mark.parametrize("data, section", [
    ({"model": "smollm2"}, "model"),
    ({"sft": ["a"]}, "sft"),
    ({"sft": {"data": "data.jsonl"}}, "sft.data"),
])
def test_section_must_be_mapping(tmp_path, data, section):
    with pytest.raises(ConfigError, match=f"'{section}' must be a mapping"):
        load_config(write_config(tmp_path, minimal(**data)))


def test_accepted_coercions(tmp_path):
    config = load_config(write_config(tmp_path, minimal(
        tracking={"report_to": "tensorboard"},  # a single string reads as a one-item list
        sft={"data": {"train": SFT_TRAIN, "eval_split": 0}},  # int where float is expected
    )))
    assert config.tracking.report_to == ["tensorboard"]
    assert config.sft.data.eval_split == 0.0 and isinstance(config.sft.data.eval_split, float)


def test_bad_report_to_value(tmp_path):
    with pytest.raises(ConfigError, match="'mlflow' is not wandb or tensorboard"):
        load_config(write_config(tmp_path, minimal(tracking={"report_to": ["mlflow"]})))


def test_enabled_stage_needs_train_file(tmp_path):
    with pytest.raises(ConfigError, match="sft.data.train is required"):
        load_config(write_config(tmp_path, {"sft": {"trainer": {}}}))


@pytest.mark.parametrize("data, message", [
    ({"sft": {"data": {"train": SFT_TRAIN, "probes": {"cue": "p.jsonl"}}}}, "sft.data.probes: only rm"),
    ({"rm": {"data": {"probes": {"Cue set": "p.jsonl"}}}}, "rm.data.probes.Cue set: expected a lower-case name"),
    ({"rm": {"data": {"probes": {"cue": ""}}}}, "rm.data.probes.cue: expected"),
])
def test_probe_sets_are_rm_only_and_named(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, {**minimal(), **data}))


def test_a_probe_must_be_held_out():
    """A probe whose prompts the reward model trains on would measure memory, not the cue it was built to break."""
    from reward.pairs import PreferenceRow
    from stages.rm import check_probes_held_out

    row = PreferenceRow(prompt=[{"role": "user", "content": "How much syrup?"}], chosen="2 litres.", rejected="Some.")
    other = PreferenceRow(prompt=[{"role": "user", "content": "When?"}], chosen="In May.", rejected="Later.")
    check_probes_held_out({"cue": [row]}, [other])
    with pytest.raises(ConfigError, match=r"rm.data.probes.cue: 1 of its 1 prompts are among the training pairs"):
        check_probes_held_out({"cue": [row]}, [other, row])


# ---------------------------------------------------------------------------- --set overrides

def test_override_learning_rate_decimal_is_float(tmp_path):
    config = load_config(write_config(tmp_path, minimal()), ["sft.trainer.learning_rate=1.0e-4"])
    assert config.sft.trainer["learning_rate"] == pytest.approx(1e-4)
    assert isinstance(config.sft.trainer["learning_rate"], float)


@pytest.mark.parametrize("via", ["override", "file"])
@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("5E-5", 5e-5), ("1.0e4", 1e4), ("-2e+3", -2e3)])
def test_exponent_without_dot_is_float(tmp_path, via, text, value):
    # PyYAML alone (YAML 1.1) reads `1e-4` as a string, which SFTConfig accepts and the optimizer later rejects.
    if via == "override":
        config = load_config(write_config(tmp_path, minimal()), [f"sft.trainer.learning_rate={text}"])
    else:
        path = tmp_path / "run.yaml"
        path.write_text(f"sft:\n  data: {{train: {SFT_TRAIN}}}\n  trainer:\n    learning_rate: {text}\n")
        config = load_config(path)
    assert isinstance(config.sft.trainer["learning_rate"], float)
    assert config.sft.trainer["learning_rate"] == pytest.approx(value)


def test_quoted_exponent_and_plain_words_stay_strings(tmp_path):
    config = load_config(write_config(tmp_path, minimal()), [
        "sft.trainer.learning_rate='1e-4'", "sft.trainer.hub_model_id=e5", "sft.trainer.run_tag=1e", "seed=10"])
    assert config.sft.trainer == {"learning_rate": "1e-4", "hub_model_id": "e5", "run_tag": "1e"}
    assert config.seed == 10 and isinstance(config.seed, int)


def test_override_values_are_yaml(tmp_path):
    config = load_config(write_config(tmp_path, minimal()), [
        "seed=7", "sft.trainer.max_steps=5", "sft.trainer.bf16=false", "tracking.report_to=[wandb, tensorboard]",
        "model.chat_template=",
    ])
    assert config.seed == 7
    assert config.sft.trainer == {"max_steps": 5, "bf16": False}
    assert config.tracking.report_to == ["wandb", "tensorboard"]
    assert config.model.chat_template is None  # `--set key=` unsets, like `key:` in YAML


def test_override_replaces_file_value(tmp_path):
    path = write_config(tmp_path, minimal(seed=1, sft={"data": {"train": SFT_TRAIN}, "trainer": {"max_steps": 3}}))
    config = load_config(path, ["sft.trainer.max_steps=9", "seed=2"])
    assert config.sft.trainer["max_steps"] == 9 and config.seed == 2


def test_override_creates_nested_sections(tmp_path):
    config = load_config(write_config(tmp_path, minimal()), [
        "cpt.data.train=data/cpt/beekeeping.txt",  # whole section created -> stage enabled
        "sft.data.columns.output=answer",
        "sft.trainer.model_init_kwargs.attn_implementation=eager",
        "peft.options.r=4",
    ])
    assert config.cpt.enabled and config.cpt.data.train == "data/cpt/beekeeping.txt"
    assert config.sft.data.columns == {"output": "answer"}
    assert config.sft.trainer == {"model_init_kwargs": {"attn_implementation": "eager"}}
    assert config.peft.options == {"r": 4}


def test_override_keys_are_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'sft.trainr'.*did you mean 'trainer'"):
        load_config(write_config(tmp_path, minimal()), ["sft.trainr.max_steps=3"])
    with pytest.raises(ConfigError, match="'seed' must be int"):
        load_config(write_config(tmp_path, minimal()), ["seed=abc"])


@pytest.mark.parametrize("item", ["sft.trainer.learning_rate", "=5", ""])
def test_malformed_override(tmp_path, item):
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        load_config(write_config(tmp_path, minimal()), [item])


def test_override_through_a_value_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        load_config(write_config(tmp_path, minimal(seed=3)), ["seed.x=1"])


# ---------------------------------------------------------------------------- trainer options

def test_unknown_trainer_key_in_preflight(tmp_path, in_repo):
    config = load_config(write_config(tmp_path, minimal()), ["sft.trainer.learnig_rate=1.0e-4"])
    with pytest.raises(ConfigError) as info:
        preflight(config, selected_stages(config, None))
    assert "sft.trainer.learnig_rate" in str(info.value)
    assert "did you mean 'learning_rate'" in str(info.value)


def test_unknown_trainer_key_in_trainer_args():
    from trl import SFTConfig

    with pytest.raises(ConfigError, match=r"cpt.trainer.max_step is not an option of SFTConfig.*'max_steps'"):
        trainer_args(SFTConfig, "cpt", {"max_step": 3}, 0, output_dir="unused")


def test_activation_checkpointing_under_its_new_name_without_a_deprecation_warning():
    """transformers 5.24 renamed gradient_checkpointing; TRL's default (on) is kept under the new name, a config
    written with the old name still works, and neither path triggers transformers' FutureWarning."""
    import warnings

    from trl import DPOConfig, SFTConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing.*", category=FutureWarning)
        default = trainer_args(SFTConfig, "sft", {}, 0, output_dir="unused")
        old_name = trainer_args(DPOConfig, "dpo", {"gradient_checkpointing": False}, 0, output_dir="unused")
        new_name = trainer_args(SFTConfig, "sft", {"activation_checkpointing": False}, 0, output_dir="unused")
    assert default.activation_checkpointing is True and default.gradient_checkpointing is True
    assert old_name.activation_checkpointing is False and old_name.gradient_checkpointing is False
    assert new_name.activation_checkpointing is False
    with pytest.raises(ConfigError, match="sft.trainer sets gradient_checkpointing and activation_checkpointing"):
        trainer_args(SFTConfig, "sft", {"gradient_checkpointing": True, "activation_checkpointing": False}, 0,
                     output_dir="unused")


@pytest.mark.parametrize("key", MANAGED_KEYS)
def test_managed_trainer_key_refused(tmp_path, in_repo, key):
    assert "output_dir" in MANAGED_KEYS
    config = load_config(write_config(tmp_path, minimal()), [f"sft.trainer.{key}=somewhere"])
    with pytest.raises(ConfigError, match=f"sft.trainer.{key} is set by the pipeline"):
        preflight(config, selected_stages(config, None))


def test_bad_trainer_value_is_config_error():
    from trl import SFTConfig

    with pytest.raises(ConfigError, match="sft.trainer:"):
        trainer_args(SFTConfig, "sft", {"lr_scheduler_type": "not-a-scheduler"}, 0, output_dir="unused")


def test_trainer_args_applies_seed_and_user_keys():
    from trl import SFTConfig

    args = trainer_args(SFTConfig, "sft", {"max_steps": 3, "learning_rate": 2e-4}, 123, output_dir="unused")
    assert (args.seed, args.max_steps, args.learning_rate, args.output_dir) == (123, 3, 2e-4, "unused")
    assert trainer_args(SFTConfig, "sft", {"seed": 5}, 123, output_dir="unused").seed == 5  # trainer.seed wins


# ---------------------------------------------------------------------------- peft

def test_bad_peft_method(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, minimal(peft={"method": "lorra"})))
    assert "peft.method 'lorra'" in str(info.value)
    assert "did you mean 'lora'" in str(info.value)


def test_bad_peft_option_in_preflight(tmp_path, in_repo):
    config = load_config(write_config(tmp_path, minimal(peft={"method": "lora", "options": {"rr": 8}})))
    with pytest.raises(ConfigError) as info:
        preflight(config, selected_stages(config, None))
    assert "peft.options.rr" in str(info.value) and "LoraConfig" in str(info.value)
    assert "did you mean 'r'" in str(info.value)


def test_bad_peft_option_for_other_method(tmp_path):
    config = load_config(write_config(tmp_path, minimal(peft={"method": "prompt", "options": {"num_virtual_tokns": 8}})))
    with pytest.raises(ConfigError, match=r"peft.options.num_virtual_tokns .*PromptTuningConfig.*'num_virtual_tokens'"):
        peft_config_for(config.peft)


def test_bad_peft_option_value(tmp_path):
    config = load_config(write_config(tmp_path, minimal(peft={"method": "lora", "options": {"lora_bias": True, "use_dora": True}})))
    with pytest.raises(ConfigError, match="peft.options for lora"):
        peft_config_for(config.peft)


def test_full_takes_no_options(tmp_path):
    config = load_config(write_config(tmp_path, minimal(peft={"method": "full", "options": {"r": 8}})))
    with pytest.raises(ConfigError, match="'full', which takes no options"):
        peft_config_for(config.peft)


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_every_peft_method_builds(tmp_path, method):
    config = load_config(write_config(tmp_path, minimal(peft={"method": method})))
    built = peft_config_for(config.peft)
    assert (built is None) == (method == "full")


# ---------------------------------------------------------------------------- data section values

@pytest.mark.parametrize("value", [1, 1.0, 1.5, -0.1])
def test_eval_split_out_of_range(tmp_path, value):
    with pytest.raises(ConfigError, match=r"sft.data.eval_split must be in \[0, 1\)"):
        load_config(write_config(tmp_path, minimal(sft={"data": {"train": SFT_TRAIN, "eval_split": value}})))


@pytest.mark.parametrize("value", [0, 0.0, 0.5, 0.99])
def test_eval_split_in_range(tmp_path, value):
    config = load_config(write_config(tmp_path, minimal(sft={"data": {"train": SFT_TRAIN, "eval_split": value}})))
    assert config.sft.data.eval_split == value


@pytest.mark.parametrize("stage", ["rm", "ppo", "grpo", "cls"])
def test_eval_split_checked_for_every_stage_with_data(tmp_path, stage):
    """One check serves every section with a data: key, the chat stages', the online ones' and cls's."""
    with pytest.raises(ConfigError, match=rf"{stage}.data.eval_split must be in \[0, 1\), got 1.5"):
        load_config(write_config(tmp_path, minimal(**{stage: {"enabled": False, "data": {"eval_split": 1.5}}})))


def test_eval_split_checked_for_disabled_stage_too(tmp_path):
    with pytest.raises(ConfigError, match="cpt.data.eval_split"):
        load_config(write_config(tmp_path, minimal(cpt={"enabled": False, "data": {"eval_split": 2}})))


def test_unknown_delimiter_key(tmp_path):
    data = minimal(sft={"data": {"train": "data.txt", "format": "delimited", "delimiters": {"strat": "<s>"}}})
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, data))
    assert "unknown key 'sft.data.delimiters.strat'" in str(info.value)
    assert "did you mean 'start'" in str(info.value)


def test_known_delimiter_keys(tmp_path):
    delimiters = {"start": "[Q]", "sep": "[A]", "eos": "[END]"}
    data = minimal(sft={"data": {"train": "data.txt", "format": "delimited", "delimiters": delimiters}})
    assert load_config(write_config(tmp_path, data)).sft.data.delimiters == delimiters


@pytest.mark.parametrize("settings, message", [
    (["ppo.reward.judge.type=llm"], "cannot reward pointwise.*pairwise=true"),
    (["ppo.reward.judge.type=human", "ppo.reward.pairwise=true"], "'human' cannot reward pairwise"),
    (["ppo.reward.judge.type=api", "ppo.reward.pairwise=true"], "ppo.reward.judge.model is required"),
    (["ppo.reward.judge.length_norm=max"], "ppo.reward.judge.length_norm must be sum or mean"),
    (["ppo.reward.type=judges"], "did you mean 'judge'"),
])
def test_a_judge_that_cannot_reward_ppo_is_refused(tmp_path, in_repo, settings, message):
    data = minimal(ppo={"data": {"train": "data/preferences/prompts.jsonl"}, "reward": {"type": "judge"}})
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, data), settings)


def test_one_key_makes_any_judge_ppo_s_reward(tmp_path, in_repo):
    data = minimal(ppo={"data": {"train": "data/preferences/prompts.jsonl"}})
    config = load_config(write_config(tmp_path, data), ["ppo.reward.type=judge"])
    assert config.ppo.reward.judge.type == "contrastive" and not config.ppo.reward.pairwise
    config = load_config(write_config(tmp_path, data), ["ppo.reward.type=judge", "ppo.reward.judge.type=llm",
                                                        "ppo.reward.pairwise=true"])
    assert config.ppo.reward.judge.type == "llm"


def test_the_contrastive_judge_is_one_key_and_checks_its_values(tmp_path, in_repo):
    data = minimal(preferences={"enabled": True, "pairs": "data/preferences/beekeeping_pairs.jsonl",
                                "judge": {"type": "human_file", "path": "data/preferences/beekeeping_pairs.jsonl"}})
    config = load_config(write_config(tmp_path, data), ["preferences.judge.type=contrastive"])
    assert config.preferences.judge.type == "contrastive"
    with pytest.raises(ConfigError, match="preferences.judge.length_norm must be sum or mean"):
        load_config(write_config(tmp_path, data), ["preferences.judge.type=contrastive",
                                                   "preferences.judge.length_norm=avg"])


def test_a_partly_written_nested_section_keeps_that_section_s_own_defaults(tmp_path, in_repo):
    """evaluation.judge defaults to the rm stage's reward model: naming only its tie_margin keeps that, rather than
    falling back to JudgeConfig's class defaults (a human judge)."""
    config = load_config(write_config(tmp_path, minimal(evaluation={"judge": {"tie_margin": 0.5}})))
    assert (config.evaluation.judge.type, config.evaluation.judge.model) == ("reward_model", "rm")
    assert config.evaluation.judge.tie_margin == 0.5
    ppo = minimal(ppo={"data": {"train": "data/preferences/prompts.jsonl"}})
    config = load_config(write_config(tmp_path, ppo), ["ppo.reward.judge.length_norm=mean"])
    assert (config.ppo.reward.judge.type, config.ppo.reward.judge.length_norm) == ("contrastive", "mean")


def test_evaluation_takes_more_judges_each_checked(tmp_path, in_repo):
    config = load_config(write_config(tmp_path, minimal(evaluation={"judges": [{"type": "contrastive"},
                                                                                {"type": "rule", "function": "x:y"}]})))
    assert [(j.type, j.function) for j in config.evaluation.judges] == [("contrastive", None), ("rule", "x:y")]
    with pytest.raises(ConfigError, match=r"unknown key 'evaluation.judges.0.rubrik'.*'rubric'"):
        load_config(write_config(tmp_path, minimal(evaluation={"judges": [{"type": "llm", "rubrik": "x"}]})))
    with pytest.raises(ConfigError, match=r"evaluation.judges.1.function is required"):
        load_config(write_config(tmp_path, minimal(evaluation={"judges": [{"type": "llm"}, {"type": "rule"}]})))
    with pytest.raises(ConfigError, match=r"evaluation.judge.type 'human_file' must be one of"):
        load_config(write_config(tmp_path, minimal(evaluation={"judge": {"type": "human_file", "path": "x"}})))


def test_every_registered_stage_has_its_section_and_module():
    """A stage is one registry entry plus its module: the entry's section class is the RunConfig field of its name,
    its trainer config resolves, and stages/ has a module with the stage interface."""
    import dataclasses

    from pipeline.config import REGISTRY
    from stages import STAGES

    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name, stage in REGISTRY.items():
        assert isinstance(getattr(RunConfig(), name), stage.section), name
        assert stage.trainer is None or dataclasses.is_dataclass(stage.trainer_config()), name
        assert all(callable(getattr(STAGES[name], f, None)) for f in ("check", "data_files", "uses_model", "run"))
        assert stage.data_from is None or list(REGISTRY).index(stage.data_from) < list(REGISTRY).index(name)
    stage_fields = [name for name, f in fields.items() if any(f.type in (s.section, s.section.__name__)
                                                              for s in REGISTRY.values())]
    assert stage_fields == list(REGISTRY)  # RunConfig's sections come in pipeline order, as config.yaml shows them


def test_one_key_switches_the_demo_s_preference_optimisation_stage(tmp_path, in_repo):
    """preference_optimisation names the one of dpo, kto, orpo, simpo that `run` runs; the demo keeps dpo."""
    from pipeline.config import PREFERENCE_OPTIMISERS

    def chosen(config):
        return [name for name in PREFERENCE_OPTIMISERS if config.stage(name).enabled]

    assert PREFERENCE_OPTIMISERS == ("dpo", "kto", "orpo", "simpo")
    assert chosen(load_config(None)) == ["dpo"]
    for name in PREFERENCE_OPTIMISERS:
        config = load_config(None, [f"preference_optimisation={name}"])
        assert chosen(config) == [name]
        assert selected_stages(config, None) == ["cpt", "sft", "preferences", "rm", name, "ppo"]
        preflight(config, [name])
    with pytest.raises(ConfigError, match=r"preference_optimisation 'orpoo' is not one of .*did you mean 'orpo'"):
        load_config(None, ["preference_optimisation=orpoo"])
    for contradiction in ("kto.enabled=true", "dpo.enabled=false"):
        with pytest.raises(ConfigError, match=r"\.enabled is (true|false), but preference_optimisation \(dpo\) decides"):
            load_config(None, [contradiction])
    # A run's resolved config.yaml, which every launched process reads, writes both the key and each `enabled`.
    resolved = load_config(None, ["preference_optimisation=orpo"]).to_dict()
    assert chosen(load_config(write_config(tmp_path, resolved, "resolved.yaml"))) == ["orpo"]
    # Without the key each section decides, as for every other stage: writing one out switches it on.
    assert chosen(load_config(write_config(tmp_path, minimal(kto={}, orpo={"enabled": False})))) == ["kto"]


def test_null_means_unset_for_optional_keys_and_says_how_for_the_others(tmp_path):
    """`--set ppo.reward.model=null` is as valid as `preferences.judge.path=null` where the reward type needs no
    model; where it does, and for a key that cannot be null, the error says what to give instead."""
    path = write_config(tmp_path, minimal())
    off = ["ppo.enabled=false", "preferences.enabled=false"]
    rule = ["ppo.reward.type=rule", "ppo.reward.function=reward.rules:specificity"]
    assert load_config(path, [*off, *rule, "ppo.reward.model=null"]).ppo.reward.model is None
    assert load_config(path, [*off, "preferences.judge.path=null"]).preferences.judge.path is None
    with pytest.raises(ConfigError, match=r"ppo.reward.model \(rm, or a reward model directory\) is required"):
        load_config(path, [*off, "ppo.reward.model=null"])
    with pytest.raises(ConfigError, match="'seed' cannot be null: give int, or leave the key out"):
        load_config(path, ["seed="])


@pytest.mark.parametrize("settings, message", [
    (["iterative_dpo.judge.type=human"], "no person .* can label them; use an AI judge"),
    (["iterative_dpo.judge.type=human_file", "iterative_dpo.judge.path=labels.jsonl"], "'human_file': each round"),
    (["iterative_dpo.prompts="], "iterative_dpo.prompts .* is required"),
    (["iterative_dpo.reference=initial"], "reference must be previous or start"),
    (["iterative_dpo.rounds=0"], "rounds must be at least 1"),
    (["iterative_dpo.win_rate_prompts=4", "evaluation.prompts="], "win_rate_prompts .* evaluation.prompts"),
    (["iterative_dpo.sampling.num_responses=1"], "num_responses must be at least 2"),
])
def test_what_iterative_dpo_cannot_do_is_refused_before_any_compute(tmp_path, in_repo, settings, message):
    data = minimal(iterative_dpo={"prompts": "data/preferences/prompts.jsonl", "judge": {"type": "contrastive"}})
    assert load_config(write_config(tmp_path, data)).iterative_dpo.enabled
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, data), settings)
