"""The bad-input corpus: what a user can get wrong, per command and stage, and the words the one error line must
hold. tests/integration/test_bad_input.py runs every case in-process through `pipeline.cli.main` and asserts exit
code 2, a single error line with these words, no traceback, and a run directory left exactly as it was.

A case's `args` may use {smoke} (configs/smoke.yaml), {run} (the run directory, absent unless `setup` makes it) and
{tmp} (the test's own directory); `files` are written into {tmp} first; `env` sets (or, with None, unsets)
environment variables; `setup(tmp)` prepares anything else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Case:
    name: str
    args: list[str]
    expect: tuple[str, ...]
    files: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    setup: Callable[[Path], object] | None = None

    def __str__(self) -> str:
        return self.name


def run(stage: str, *sets: str) -> list[str]:
    """`run --stage <stage>` on the smoke config with `--set` overrides."""
    return ["run", "--config", "{smoke}", "--run-dir", "{run}", "--stage", stage,
            *(arg for item in sets for arg in ("--set", item))]


GOOD_SFT = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
PROBE = "data/preferences/cue_probe_pairs.jsonl"  # a {prompt, chosen, rejected} file the repo ships
RM_ON_FILE = (f"rm.data.train={PROBE}", "rm.data.probes={}")
DPO_ON_FILE = (f"dpo.data.train={PROBE}",)


def completed_stage(name: str, peft_type: str) -> Callable[[Path], None]:
    """A run directory where `name` completed with an adapter of `peft_type` (what resume and init_from read)."""

    def setup(tmp: Path) -> None:
        stage = tmp / "run" / name
        (stage / "final").mkdir(parents=True)
        (stage / "stage.json").write_text(json.dumps({"stage": name, "status": "completed", "base_model": str(tmp)}))
        (stage / "final" / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))

    return setup


def adapter_dir(peft_type: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))

    return setup


def locked_by_another_run(tmp: Path):
    """Another process's run lock on {run} (flock locks of two open files conflict within one process too); the
    open file is returned so the test keeps it until the command has run."""
    import fcntl

    (tmp / "run").mkdir()
    handle = open(tmp / "run" / ".lock", "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def damaged_manifest(tmp: Path) -> None:
    (tmp / "run" / "sft").mkdir(parents=True)
    (tmp / "run" / "sft" / "stage.json").write_text('{"stage": "sft", "status": "compl')


def failed_under_another_config(tmp: Path) -> None:
    (tmp / "run" / "sft").mkdir(parents=True)
    (tmp / "run" / "sft" / "stage.json").write_text(json.dumps(
        {"stage": "sft", "status": "failed", "attempts": 1, "metrics": {}, "hashes": {"config": "0123456789abcdef"}}))


def pairs_judged_by_a_rule(tmp: Path) -> None:
    (tmp / "run" / "preferences").mkdir(parents=True)
    (tmp / "run" / "config.yaml").write_text("preferences:\n  judge: {type: rule, function: reward.rules:specificity}\n")
    (tmp / "run" / "preferences" / "pairs.jsonl").write_text(
        json.dumps({"prompt": "q", "response_a": "a", "response_b": "b"}) + "\n")


def t5_model(tmp: Path) -> None:
    from transformers import T5Config

    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64).save_pretrained(tmp / "t5")


CASES = [
    # ---- data files (sft, cpt): file, line and field
    Case("sft_bad_json", run("sft", "sft.data.train={tmp}/bad.jsonl"), ("bad.jsonl:3:", "invalid JSON"),
         {"bad.jsonl": GOOD_SFT * 2 + '{"messages": [\n'}),
    Case("sft_missing_field", run("sft", "sft.data.train={tmp}/bad.jsonl"), ("bad.jsonl:2:", "'messages'"),
         {"bad.jsonl": GOOD_SFT + '{"conversation": []}\n'}),
    Case("sft_empty_response", run("sft", "sft.data.train={tmp}/bad.jsonl"),
         ("bad.jsonl:2:", "'messages[1].content'"),
         {"bad.jsonl": GOOD_SFT + '{"messages": [{"role": "user", "content": "q"}, '
                                  '{"role": "assistant", "content": "  "}]}\n'}),
    Case("sft_unknown_role", run("sft", "sft.data.train={tmp}/bad.jsonl"), ("bad.jsonl:1:", "'messages[0].role'"),
         {"bad.jsonl": '{"messages": [{"role": "robot", "content": "q"}]}\n'}),
    Case("sft_content_not_string", run("sft", "sft.data.train={tmp}/bad.jsonl"),
         ("bad.jsonl:1:", "'messages[0].content'"),
         {"bad.jsonl": '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}\n'}),
    Case("sft_empty_file", run("sft", "sft.data.train={tmp}/bad.jsonl"), ("bad.jsonl:", "empty"),
         {"bad.jsonl": ""}),
    Case("sft_not_utf8", run("sft", "sft.data.train={tmp}/bad.jsonl"), ("bad.jsonl:2:", "UTF-8"),
         {"bad.jsonl": b'{"messages": []}\n{"messages": "\xff"}\n'}),
    Case("cpt_empty_text", run("cpt", "cpt.data.train={tmp}/bad.jsonl"), ("bad.jsonl:2:", "'text'"),
         {"bad.jsonl": '{"text": "fine"}\n{"text": ""}\n'}),

    # ---- preflight holes (issue 15, item 5): each passed `validate` and failed later, some after training
    Case("rm_after_prefix_sft_in_one_run", run("sft", "peft.method=prefix", "peft.options={num_virtual_tokens: 4}",
                                               *RM_ON_FILE) + ["--stage", "rm"],
         ("rm starts from a prefix_tuning adapter", "peft.method lora")),
    Case("rm_on_a_completed_prefix_sft", run("rm", *RM_ON_FILE), ("rm starts from a prefix_tuning adapter",
                                                                   "sft's final/"),
         setup=completed_stage("sft", "PREFIX_TUNING")),
    Case("ppo_on_a_completed_prompt_sft", run("ppo", "ppo.reward.type=rule",
                                              "ppo.reward.function=reward.rules:specificity"),
         ("ppo starts from a prompt_tuning adapter",), setup=completed_stage("sft", "PROMPT_TUNING")),
    Case("dpo_from_a_p_tuning_adapter_path", run("dpo", *DPO_ON_FILE, "dpo.init_from={tmp}/adapter"),
         ("dpo starts from a p_tuning adapter", "init_from"), setup=adapter_dir("P_TUNING")),
    Case("dpo_with_ia3", run("dpo", *DPO_ON_FILE, "peft.method=ia3", "peft.options={}"),
         ("dpo with peft.method=ia3", "set peft.method to lora or full")),
    Case("dpo_loss_type_simpo", run("dpo", *DPO_ON_FILE, "dpo.trainer.loss_type=simpo"),
         ("dpo.trainer.loss_type 'simpo' is not one of", "sigmoid")),
    Case("sft_loss_type_unknown", run("sft", "sft.trainer.loss_type=nlll"),
         ("sft.trainer.loss_type 'nlll'", "did you mean 'nll'")),
    Case("seq2seq_model_run", run("sft", "model.name_or_path={tmp}/t5"), ("encoder-decoder (seq2seq)", "t5"),
         setup=t5_model),
    Case("seq2seq_model_validate", ["validate", "--config", "{smoke}", "--stage", "sft", "--set",
                                    "model.name_or_path={tmp}/t5", "--set", "peft.options.target_modules=[q, v]"],
         ("encoder-decoder (seq2seq)",), setup=t5_model),
    Case("model_init_kwargs_ignored", run("sft", "sft.trainer.model_init_kwargs={dtype: bfloat16}"),
         ("sft.trainer.model_init_kwargs would be ignored", "model.dtype")),
    Case("trust_remote_code", run("dpo", *DPO_ON_FILE, "dpo.trainer.trust_remote_code=true"),
         ("dpo.trainer.trust_remote_code would be ignored",)),
    Case("ppo_reward_model_null", run("ppo", "ppo.reward.model=null"),
         ("ppo.reward.model (rm, or a reward model directory) is required",)),
    Case("null_for_a_string_key", run("sft", "sft.data.format="),
         ("'sft.data.format' cannot be null", "leave the key out")),

    # ---- the config file and --set
    Case("config_not_found", ["run", "--config", "{tmp}/nope.yaml", "--run-dir", "{run}"],
         ("config file not found", "nope.yaml")),
    Case("config_bad_yaml", ["run", "--config", "{tmp}/bad.yaml", "--run-dir", "{run}"],
         ("bad.yaml:3:1: not valid YAML",), {"bad.yaml": "sft:\n  data: [unclosed\n"}),
    Case("config_top_level_list", ["run", "--config", "{tmp}/list.yaml", "--run-dir", "{run}"],
         ("list.yaml: the top level must be a mapping",), {"list.yaml": "- sft\n"}),
    Case("config_not_utf8", ["validate", "--config", "{tmp}/latin1.yaml"], ("latin1.yaml: not valid UTF-8",),
         {"latin1.yaml": "seed: 1 # caf\xe9\n".encode("latin-1")}),
    Case("unknown_top_level_key", run("sft", "sedd=1"), ("unknown key 'sedd'", "did you mean 'seed'")),
    Case("wrong_type", run("sft", "seed=abc"), ("'seed' must be int", "'abc'")),
    Case("section_not_a_mapping", run("sft", "sft.trainer=5"), ("'sft.trainer' must be dict",)),
    Case("set_without_a_value", ["run", "--config", "{smoke}", "--run-dir", "{run}", "--set", "seed"],
         ("--set expects KEY=VALUE", "'seed'")),
    Case("set_value_not_yaml", run("sft", "sft.trainer.max_steps=[1"),
         ("--set sft.trainer.max_steps: the value '[1' is not valid YAML",)),
    Case("trainer_key_typo", run("sft", "sft.trainer.learnig_rate=1e-4"),
         ("sft.trainer.learnig_rate is not an option of SFTConfig", "did you mean 'learning_rate'")),
    Case("trainer_key_the_pipeline_sets", run("rm", *RM_ON_FILE, "rm.trainer.output_dir=elsewhere"),
         ("rm.trainer.output_dir is set by the pipeline",)),
    Case("peft_option_typo", run("sft", "peft.options.rr=8"), ("peft.options.rr", "did you mean 'r'")),
    Case("peft_method_unknown", run("sft", "peft.method=lorra"), ("peft.method 'lorra'", "did you mean 'lora'")),
    Case("model_not_found", run("sft", "model.name_or_path={tmp}/no-model"),
         ("model.name_or_path", "no-model", "neither a built-in")),
    Case("model_dtype", run("sft", "model.dtype=float64"), ("model.dtype 'float64' is not one of",)),
    Case("tracker_unknown", run("sft", "tracking.report_to=[mlflow]"), ("tracking.report_to: 'mlflow'",)),

    # ---- cpt and sft data options
    Case("sft_format_unknown", run("sft", "sft.data.format=chatml"), ("sft.data.format 'chatml' is not one of",)),
    Case("cpt_format_ignored", run("cpt", "cpt.data.format=messages"), ("cpt.data.format 'messages'", "text")),
    Case("sft_columns_not_fields", run("sft", "sft.data.columns={answer: output}"),
         ("sft.data: columns ['answer'] are not fields of the 'messages' format",)),
    Case("delimiters_repeated", run("sft", "sft.data.format=delimited", "sft.data.train={tmp}/d.txt",
                                    "sft.data.delimiters={start: '#', sep: '#', eos: '$'}"),
         ("sft.data.delimiters must be non-empty and distinct",), {"d.txt": "#q#a$\n"}),
    Case("delimiters_on_cpt", run("cpt", "cpt.data.delimiters={sep: '|'}"), ("cpt.data.delimiters",)),
    Case("eval_split_out_of_range", run("sft", "sft.data.eval_split=1.5"), ("sft.data.eval_split must be in [0, 1)",)),
    Case("data_file_missing", run("sft", "sft.data.train={tmp}/missing.jsonl"), ("missing.jsonl: file not found",)),
    Case("data_file_extension", run("sft", "sft.data.train={tmp}/data.csv"),
         ("data.csv: unsupported file extension '.csv'",), {"data.csv": "question,answer\nq,a\n"}),
    Case("sft_json_array_holds_a_number", run("sft", "sft.data.train={tmp}/bad.json"),
         ("bad.json:3:", "expected a JSON object"), {"bad.json": "[\n" + GOOD_SFT.strip() + ",\n 5\n]\n"}),
    Case("alpaca_history_not_pairs", run("sft", "sft.data.format=alpaca", "sft.data.train={tmp}/a.jsonl"),
         ("a.jsonl:1:", "'history[0]'"),
         {"a.jsonl": '{"instruction": "q", "output": "a", "history": [["only the question"]]}\n'}),
    Case("sharegpt_role_unknown", run("sft", "sft.data.format=sharegpt", "sft.data.train={tmp}/s.jsonl"),
         ("s.jsonl:1:", "'conversations[0].from'"),
         {"s.jsonl": '{"conversations": [{"from": "bot", "value": "q"}, {"from": "gpt", "value": "a"}]}\n'}),
    Case("delimited_turn_without_separator", run("sft", "sft.data.format=delimited", "sft.data.train={tmp}/d.txt"), ("d.txt:2:", "<sep>"),
         {"d.txt": "<start>q<sep>a<eos>\n<start>q a<eos>\n"}),
    Case("validate_bad_data", ["validate", "--config", "{smoke}", "--stage", "sft", "--set",
                               "sft.data.train={tmp}/bad.jsonl"], ("bad.jsonl:1:", "'messages[0].role'"),
         {"bad.jsonl": '{"messages": [{"role": "robot", "content": "q"}]}\n'}),

    # ---- preferences
    Case("judge_type_unknown", run("preferences", "preferences.judge.type=gpt4"),
         ("preferences.judge.type 'gpt4' is not one of",)),
    Case("api_judge_key_variable_unset", run("preferences", "preferences.judge.type=api",
                                             "preferences.judge.base_url=http://127.0.0.1:9/v1",
                                             "preferences.judge.model=judge",
                                             "preferences.judge.api_key_env=PIPELINE_TEST_UNSET_KEY"),
         ("PIPELINE_TEST_UNSET_KEY, which is not set",), env={"PIPELINE_TEST_UNSET_KEY": None}),
    Case("api_judge_url_scheme", run("preferences", "preferences.judge.type=api",
                                     "preferences.judge.base_url=ftp://judge", "preferences.judge.model=judge"),
         ("base_url must start with http:// or https://",), env={"OPENAI_API_KEY": "sk-test"}),
    Case("rule_function_missing", run("preferences", "preferences.judge.type=rule",
                                      "preferences.judge.function=reward.rules:no_such_rule"),
         ("reward.rules:no_such_rule", "has no 'no_such_rule'")),
    Case("pairs_unknown_field", run("preferences", "preferences.pairs={tmp}/p.jsonl"), ("p.jsonl:1:", "'extra'"),
         {"p.jsonl": '{"prompt": "q", "response_a": "a", "response_b": "b", "extra": 1}\n'}),
    Case("human_file_winner", run("preferences", "preferences.judge.path={tmp}/l.jsonl"), ("l.jsonl:1:", "'winner'"),
         {"l.jsonl": '{"pair_id": "abc", "winner": "c"}\n'}),
    Case("prompt_empty", run("preferences", "preferences.prompts={tmp}/q.jsonl"), ("q.jsonl:2:", "'prompt'"),
         {"q.jsonl": '{"prompt": "q"}\n{"prompt": " "}\n'}),
    Case("one_response_per_prompt", run("preferences", "preferences.sampling.num_responses=1"),
         ("preferences.sampling.num_responses must be at least 2",)),

    # ---- rm and dpo
    Case("hh_transcript_without_assistant", run("rm", "rm.data.train={tmp}/hh.jsonl", "rm.data.probes={}"),
         ("hh.jsonl:1:", "'chosen'", "Assistant"),
         {"hh.jsonl": json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}) + "\n"}),
    Case("probe_not_held_out", run("rm", f"rm.data.train={PROBE}", f"rm.data.probes={{cue: {PROBE}}}"),
         ("rm.data.probes.cue", "a probe must be held out")),
    Case("probe_name", run("rm", *RM_ON_FILE[:1], f"rm.data.probes={{Cue: {PROBE}}}"),
         ("rm.data.probes.Cue: expected a lower-case name",)),
    Case("preference_format_unknown", run("rm", *RM_ON_FILE, "rm.data.format=ultrafeedback"),
         ("rm.data.format 'ultrafeedback' is not one of",)),
    Case("columns_on_preference_data", run("dpo", *DPO_ON_FILE, "dpo.data.columns={prompt: question}"),
         ("dpo.data.columns",)),
    Case("init_from_a_stage_not_run", run("dpo", *DPO_ON_FILE, "dpo.init_from=sft"),
         ("dpo.init_from is 'sft', but sft has not completed",)),
    Case("trains_on_preferences_not_run", run("dpo"), ("dpo trains on preferences's output", "dpo.data.train")),

    # ---- ppo and evaluation
    Case("ppo_mini_batch", run("ppo", "ppo.reward.type=rule", "ppo.reward.function=reward.rules:specificity",
                               "ppo.trainer.mini_batch_size=3"),
         ("ppo.trainer needs mini_batch_size to divide rollout_batch_size",)),
    Case("ppo_reward_model_not_a_model", run("ppo", "ppo.reward.model={tmp}/nothing"),
         ("ppo.reward.model", "nothing", "neither rm")),
    Case("ppo_reward_judge_human", run("ppo", "ppo.reward.type=judge", "ppo.reward.judge.type=human"),
         ("ppo.reward.judge.type 'human' cannot reward",)),
    Case("ppo_prompt_without_user_turn", run("ppo", "ppo.reward.type=rule",
                                             "ppo.reward.function=reward.rules:specificity",
                                             "ppo.data.train={tmp}/q.jsonl"),
         ("q.jsonl:1:", "'messages'"), {"q.jsonl": '{"messages": [{"role": "assistant", "content": "a"}]}\n'}),
    Case("ppo_critic_from_data", run("ppo", "ppo.critic=preferences"), ("ppo.critic 'preferences'",)),
    Case("evaluation_judge_human", run("dpo", *DPO_ON_FILE, "evaluation.judge.type=human"),
         ("evaluation.judge.type 'human' must be one of",)),

    # ---- distributed
    Case("deepspeed_config_missing", run("sft", "distributed.deepspeed={tmp}/ds.json"),
         ("distributed.deepspeed: no DeepSpeed config", "ds.json")),
    Case("run_on_another_machine", run("sft", "distributed.num_machines=2", "distributed.machine_rank=1",
                                       "distributed.main_process_ip=10.0.0.1"),
         ("distributed.machine_rank is 1", "pipeline join")),

    # ---- the environment: the run directory, the model cache, another run
    Case("run_dir_under_a_file", ["run", "--config", "{smoke}", "--stage", "sft", "--run-dir", "{tmp}/afile/run"],
         ("afile is a file, not a directory",), {"afile": "not a directory"}),
    Case("model_cache_unwritable", ["validate", "--config", "{smoke}", "--stage", "sft"],
         ("PIPELINE_CACHE_DIR", "cannot be written"), {"afile": "x"},
         env={"PIPELINE_CACHE_DIR": "{tmp}/afile/cache"}),
    Case("run_dir_in_use", run("sft"), ("is in use by",), setup=locked_by_another_run),
    Case("progress_under_another_config", run("sft"), ("sft has progress from an earlier attempt (failed)",
                                                       "--fresh"), setup=failed_under_another_config),

    # ---- the other commands and their arguments
    Case("unknown_command", ["train"], ("invalid choice: 'train'",)),
    Case("unknown_stage", ["run", "--stage", "reinforce"], ("argument --stage: invalid choice: 'reinforce'",)),
    Case("missing_required_argument", ["status"], ("the following arguments are required: --run-dir",)),
    Case("label_port_not_a_number", ["label", "--run-dir", "{run}", "--port", "http"],
         ("argument --port: invalid int value: 'http'",)),
    Case("status_without_a_run", ["status", "--run-dir", "{run}"], ("no run directory at run",)),
    Case("status_damaged_manifest", ["status", "--run-dir", "{run}"], ("sft/stage.json is damaged",),
         setup=damaged_manifest),
    Case("report_without_a_run", ["report", "--run-dir", "{run}"], ("no run directory at run",)),
    Case("label_before_pairs_exist", ["label", "--run-dir", "{run}"], ("has no pairs to label yet",),
         setup=lambda tmp: (tmp / "run").mkdir()),
    Case("label_when_an_ai_judges", ["label", "--run-dir", "{run}"], ("this run's judge is 'rule'",),
         setup=pairs_judged_by_a_rule),
    Case("join_as_machine_0", ["join", "--run-dir", "{run}", "--machine-rank", "0"],
         ("--machine-rank must be 1 or more",)),
    Case("plan_with_a_missing_start", ["plan", "--config", "{smoke}", "--run-dir", "{run}", "--stage", "dpo",
                                       "--set", f"dpo.data.train={PROBE}", "--set", "dpo.init_from=sft"],
         ("dpo.init_from is 'sft', but sft has not completed",)),
]
