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
    setup: Callable[[Path], None] | None = None

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
]
