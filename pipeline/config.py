"""One YAML schema for a whole run, validated before any compute is spent.

A run config has shared sections (`model`, `peft`, `tracking`, `distributed`) and one section per stage. Our own keys are the
dataclass fields below, each with a one-line docstring; a stage's `trainer:` mapping is handed untouched to the TRL
config dataclass of that stage (SFTConfig, ...), so every TRL option works without being declared here. Unknown
keys and wrong types are errors that name the key and suggest the closest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

JUDGE_TYPES = ("human", "human_file", "llm", "contrastive", "api", "rule", "reward_model")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
PEFT_METHODS = ("lora", "prefix", "prompt", "p_tuning", "ia3", "full")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"
    """A local Hugging Face model directory, a Hub model id (org/name, downloaded into the Hugging Face cache on
    first use; HF_HUB_OFFLINE=1 reads only the cache), or a built-in name (see `pipeline.models.BUILTIN_MODELS`)."""
    revision: str | None = None
    """A Hub model's branch, tag or commit (default: main)."""
    trust_remote_code: bool = False
    """Run the modelling code a Hub model ships (needed by some architectures). Off unless set: it is code from the
    model's authors, run on this machine."""
    attn_implementation: str | None = None
    """The attention kernel, as transformers names it: eager, sdpa, flash_attention_2, flex_attention...; None:
    transformers' default for the model."""
    load_in_4bit: bool = False
    """QLoRA: the base weights the stages train on are loaded in 4-bit NF4 (bitsandbytes, double quantisation,
    computing in `dtype`) and prepared with PEFT's prepare_model_for_kbit_training; needs a CUDA GPU and a PEFT
    adapter (peft.method other than full)."""
    load_in_8bit: bool = False
    """As load_in_4bit, in 8-bit (LLM.int8)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    chat_template: str | None = None
    """A Jinja chat template that replaces the tokenizer's own (needed for base models that have none)."""
    system_prompt: str | None = None
    """The system message of every conversation that has none. None: the chat template's own default, if it has one
    (SmolLM2's adds "You are a helpful AI assistant named SmolLM..."; `validate` shows it); "": an empty system
    message, which turns that default off; any text: that text instead."""


@dataclass
class PeftConfig:
    method: str = "lora"
    """lora, prefix, prompt, p_tuning, ia3 or full (no adapter: every weight trains)."""
    options: dict = field(default_factory=dict)
    """Passed to the method's PEFT config class (LoraConfig: r, lora_alpha, lora_dropout, target_modules...)."""


@dataclass
class TrackingConfig:
    report_to: list = field(default_factory=list)
    """Any of wandb, tensorboard. W&B honours WANDB_MODE (offline works) and groups a run's stages."""
    project: str = "alignment-pipeline"
    """W&B project name."""


@dataclass
class DistributedConfig:
    """How a training stage is launched: under `accelerate launch`, with DeepSpeed when a JSON config is named."""

    num_processes: int = 1
    """Processes per machine (one per GPU)."""
    num_machines: int = 1
    """Machines taking part; each one runs the same command with its own machine_rank."""
    machine_rank: int = 0
    """This machine's rank, 0 to num_machines - 1; rank 0 is the main machine."""
    main_process_ip: str = ""
    """The address of machine 0, which every machine connects to (needed with num_machines > 1)."""
    main_process_port: int = 29500
    """The port on machine 0 the processes rendezvous on."""
    deepspeed: str = ""
    """A DeepSpeed JSON config (configs/deepspeed/zero2.json, zero3.json, zero3_offload.json); empty: no DeepSpeed."""

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or bool(self.deepspeed)


@dataclass
class DataConfig:
    train: str | list | dict = ""
    """The training data: a file (.jsonl, .json, .parquet, .txt, each optionally .gz), a local dataset directory, a
    Hub dataset {name: org/dataset, config, split, data_files, revision}, or a list of these, each with an optional
    `weight` (how many times its records count: 2 twice, 0.5 a seeded half). See pipeline/sources.py."""
    eval: str | list | dict | None = None
    """Held-out data, as `train`; when absent, `eval_split` of the training records are held out instead."""
    eval_split: float = 0.1
    """Fraction of training records held out for evaluation when no `eval` file (nor cpt's `eval_documents`) is given
    (0 disables eval)."""
    format: str = "auto"
    """auto (detected from the first record) or: cpt text (a .txt's documents separated by blank lines) or lines
    (one document per line); sft delimited, alpaca, sharegpt, messages; rm, dpo, orpo and simpo prompt, hh, sharegpt;
    kto messages, sharegpt, alpaca, prompt_completion; ppo, grpo and rloo auto."""
    columns: dict = field(default_factory=dict)
    """Maps our field names to the file's, e.g. {instruction: question, output: answer} (sft), {chosen: preferred}
    (rm, dpo, orpo, simpo), {label: thumbs} (kto), {prompt: question} (ppo, grpo, rloo), {text: body} (cpt)."""
    delimiters: dict = field(default_factory=dict)
    """sft's delimited format: start, sep, eos strings (defaults <start>, <sep>, <eos>)."""
    bad_rows: str = "error"
    """error: a bad record stops the run before any compute, listing every bad one (the first 20 and the count);
    drop: bad records are left out, counted in stage.json (data/dropped_bad_rows) and listed in the log."""
    streaming: bool = False
    """cpt: read the corpus through `datasets` streaming while training instead of into memory first, for corpora
    larger than memory; needs trainer.max_steps, and held-out data from `eval` or `eval_documents` (README:
    Streaming a corpus larger than memory)."""
    eval_documents: int | None = None
    """cpt: hold out the first N documents of train (instead of eval_split's seeded fraction, which a streamed corpus
    cannot take without reading it all); 0 holds out none."""
    general_eval: str | None = None
    """cpt: general (not domain) text, .txt/.jsonl/.json like train, whose perplexity before and after training shows
    what the domain training cost elsewhere (forgetting); e.g. data/general/general.txt."""
    probes: dict = field(default_factory=dict)
    """rm: more held-out preference files, {name: path}, whose accuracy is measured before and after training, e.g.
    pairs built so that a surface cue (a marker, the length) points to the rejected answer. Their prompts must not be
    among the training pairs'."""


@dataclass
class StageConfig:
    enabled: bool = True
    """Whether `run` without --stage runs this stage."""
    init_from: str = "auto"
    """auto (the previous completed stage, else the base model), base, a stage name, or a model/adapter path."""
    data: DataConfig = field(default_factory=DataConfig)
    """The stage's dataset."""
    trainer: dict = field(default_factory=dict)
    """Passed to the TRL config dataclass (SFTConfig for cpt and sft): learning_rate, max_steps, save_steps..."""


@dataclass
class SamplingConfig:
    num_responses: int = 2
    """Responses sampled per prompt (k >= 2); every two of them make a pair (k=2: one pair, k=4: six)."""
    max_new_tokens: int = 128
    """The longest response; one that reaches it without an end-of-turn token is counted as truncated."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set with this much probability."""
    batch_size: int = 8
    """Prompts per generate call (each with num_responses samples)."""


@dataclass
class JudgeConfig:
    type: str = "human"
    """human (people, in the terminal or on `label --web`'s page), human_file, llm, contrastive, api, rule or
    reward_model: swapping a person for an AI is this key. contrastive: a local LM's likelihood of each response
    when told to follow the rubric minus when told to violate it (the AI judge that works on small models); llm: the
    same LM asked "A or B?"."""
    path: str | None = None
    """human_file: the labels file ({prompt, response_a, response_b, winner} or {pair_id, winner} per line)."""
    function: str | None = None
    """rule: 'module:function' scoring (prompt messages, response) -> float; the higher score wins."""
    model: str | None = None
    """llm, contrastive: a model directory or built-in name (default: model.name_or_path); api: the model name sent to the
    endpoint; reward_model: a stage name of this run (rm) or a reward model directory (full model or adapter)."""
    base_url: str | None = None
    """api: the OpenAI-compatible endpoint root, e.g. https://api.openai.com/v1."""
    api_key_env: str = "OPENAI_API_KEY"
    """api: the NAME of the environment variable holding the key (the key itself is never in a config or a file)."""
    rubric: str | None = None
    """llm, contrastive, api: what makes a response better (default: helpful, honest, harmless, answers what was
    asked)."""
    principles: list = field(default_factory=list)
    """llm, contrastive, api: a list of principles (a constitution) to judge by, instead of a rubric."""
    follow: str | None = None
    """contrastive: the instruction a response that follows the rubric follows, word for word (default: "Write the
    response that best follows this guidance." and the rubric); wording matters to a small model: README, the judges."""
    violation: str | None = None
    """contrastive: the instruction a response that violates the rubric follows (default: "go against" the rubric);
    small models follow a direct wording ("give a vague answer with no figures") better than a negation."""
    length_norm: str = "sum"
    """contrastive: sum (the score adds up over the response's tokens) or mean (per token: length does not count)."""
    batch_size: int = 8
    """Pairs judged per batch; labels are saved as they come, so an interrupted stage loses none."""
    max_length: int = 1024
    """llm, contrastive, reward_model: the longest judge input in tokens; longer pairs stay unlabelled (counted)."""
    max_concurrency: int = 4
    """api: requests in flight at once."""
    max_retries: int = 5
    """api: retries of a request after a 429, 5xx, timeout or dropped connection, with exponential backoff."""
    timeout: float = 60.0
    """api: seconds to wait for one response."""
    tie_margin: float = 0.0
    """llm, contrastive, reward_model: score differences up to this are ties (llm: half the log-odds difference
    of the two orders)."""
    overlap: float = 0.0
    """human: the share of pairs (0 to 1) that two annotators each label, to measure their agreement (Fleiss' κ)."""
    disagreement: str = "majority"
    """human: how annotators who disagree become one label: majority (a split asks one more annotator; a three-way
    split is a tie) or drop (the pair is left out, counted)."""


DISAGREEMENT_RULES = ("majority", "drop")
BAD_ROW_POLICIES = ("error", "drop")
# The formats pipeline.data reads: cpt's text (blank-line-separated documents, or one per line) and sft's chats.
TEXT_FORMATS = ("auto", "text", "lines")
CONVERSATION_FORMATS = ("delimited", "alpaca", "sharegpt", "messages")
# Which judge type uses which of the optional JudgeConfig keys (the rest are shared).
JUDGE_KEYS = {
    "human": ("overlap", "disagreement"), "human_file": ("path",), "rule": ("function",),
    "llm": ("model", "rubric", "principles", "max_length", "tie_margin"),
    "contrastive": ("model", "rubric", "principles", "follow", "violation", "length_norm", "max_length", "tie_margin"),
    "api": ("model", "base_url", "api_key_env", "rubric", "principles", "max_concurrency", "max_retries", "timeout"),
    "reward_model": ("model", "max_length", "tie_margin"),
}
# What can reward ppo, grpo and rloo: a judge scoring each response alone, or any AI judge comparing two (not a
# person).
POINTWISE_REWARD_JUDGES = ("contrastive", "reward_model", "rule")
PAIRWISE_REWARD_JUDGES = ("llm", "contrastive", "api", "reward_model", "rule")
REWARD_TYPES = ("reward_model", "rule", "judge")
# Judges whose `model` can be a stage of this run.
MODEL_JUDGES = ("llm", "contrastive", "reward_model")
JUDGE_REQUIRED = {"human_file": ("path",), "rule": ("function",), "api": ("model", "base_url"),
                  "reward_model": ("model",)}


@dataclass
class PreferencesConfig:
    enabled: bool = True
    """Whether `run` without --stage runs this stage."""
    init_from: str = "auto"
    """The policy that samples responses: auto (the latest of cpt/sft), base, a stage name, or a model/adapter path."""
    prompts: str | None = None
    """Prompts to sample responses for: {"prompt": str or messages} or {"messages": [...]} per line."""
    max_prompts: int | None = None
    """Use only the first N prompts of the file."""
    pairs: str | None = None
    """Ready-made pairs to label: {"prompt", "response_a", "response_b"} per line (with `prompts`, both are used)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How responses are sampled from the policy."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Who labels the pairs."""
    compare_with: str | None = None
    """A human_file of labels for the same pairs; agreement, Cohen's kappa, tie and order-flip rates are reported."""


REFERENCES = ("previous", "start")


@dataclass
class IterativeDPOConfig:
    """Online RLAIF by rounds: sample pairs from the current policy, label them with an AI judge, train DPO on them."""

    enabled: bool = True
    """Whether `run` without --stage runs this stage."""
    init_from: str = "auto"
    """The policy round 1 samples from and trains: auto (the latest of cpt/sft), base, a stage name, or a path."""
    rounds: int = 3
    """Rounds of sample -> judge -> train; each starts from the policy the round before trained."""
    prompts: str | None = None
    """Prompts the rounds sample for: {"prompt": str or messages} or {"messages": [...]} per line."""
    prompts_per_round: int | None = None
    """Each round takes the next this many prompts of the file (wrapping around at its end), so rounds see fresh
    prompts while the file lasts; None: every prompt, every round."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How each round's responses are sampled from its policy (seeded by seed and round)."""
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(type="contrastive"))
    """The AI judge that labels each round's pairs, with the keys of preferences.judge (not a person: the pairs
    exist only while the stage runs)."""
    reference: str = "previous"
    """The DPO reference of each round: previous (the policy the round starts from) or start (the policy round 1
    started from, every round)."""
    eval_split: float = 0.1
    """Share of each round's prompts whose pairs are held out of its training: DPO's reward accuracy and margin on
    them, before and after the round (0: none held out)."""
    win_rate_prompts: int = 0
    """After each round, the judge compares the round's policy with the start on this many of evaluation.prompts
    (one sampled response each); 0 skips it (the evaluation after the stage compares the final policy anyway)."""
    trainer: dict = field(default_factory=dict)
    """Passed to DPOConfig for every round's training: beta, loss_type, learning_rate, max_steps (per round)..."""


@dataclass
class EvaluationConfig:
    prompts: str | None = None
    """Held-out prompts on which the policy stages (dpo, kto, orpo, simpo, ppo, grpo, rloo, iterative_dpo) are
    compared with the policy they started from; None skips that."""
    max_prompts: int | None = None
    """Use only the first N prompts."""
    max_new_tokens: int = 96
    """The longest response sampled from each policy."""
    temperature: float = 1.0
    """Responses are sampled (seeded), so the KL estimate is over what the policy actually says."""
    batch_size: int = 8
    """Prompts per generate call."""
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(type="reward_model", model="rm"))
    """Who decides the win rate of the new policy over the starting one (any judge but human)."""
    judges: list = field(default_factory=list)
    """More judges, each a mapping with the keys of `judge`, each giving its own win rate (eval/<type>/win_rate):
    judges that did not train the policy (an AI judge beside the reward model that ppo and dpo's data came from)."""
    measure: str | None = None
    """A held-out check never trained on: 'module:function' (prompt, response) -> float, averaged over the
    responses before and after (the demo: reward.rules:is_specific)."""
    max_references: int = 16
    """sft: this many held-out conversations are answered by the trained policy (sampled as above) and the answers
    scored against the held-out ones with BLEU and ROUGE; 0 skips that."""


@dataclass
class RewardSourceConfig:
    type: str = "reward_model"
    """reward_model (a scalar from a Bradley-Terry model), rule (a Python scoring function) or judge (any AI judge,
    as `judge` describes: online RLAIF)."""
    model: str | None = "rm"
    """reward_model: a stage name of this run (rm) or a reward model directory (unused by the other types)."""
    function: str | None = None
    """rule: 'module:function' scoring (prompt messages, response) -> float."""
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(type="contrastive"))
    """judge: the judge that rewards, with the keys of preferences.judge (default: the contrastive judge on the
    policy's own base model)."""
    pairwise: bool = False
    """judge: reward each response by the judge's verdict against the reference policy's response to the same
    prompt, 2 p(win) - 1 in [-1, 1], instead of the judge's score of the response alone (pointwise, which only
    judges that score one response have: contrastive, reward_model, rule)."""


@dataclass
class PPOTrainerConfig:
    max_steps: int = 20
    """PPO iterations; each samples a rollout batch, scores it and runs the optimisation epochs over it."""
    rollout_batch_size: int = 8
    """Prompts per iteration (one response each)."""
    mini_batch_size: int = 4
    """Responses per optimiser step within an epoch."""
    num_ppo_epochs: int = 4
    """Passes over each rollout batch."""
    critic_warmup_steps: int = 0
    """The first N iterations train the critic alone (value head included), the actor unchanged. A critic that
    starts untrained (a value head at zero) makes GAE's first advantages mostly a token's distance from the end of its
    response, since with lam < 1 the score reaches the later tokens more, not how good the response was: the actor
    then learns to end early. OpenRLHF's freezing_actor_steps; not needed with a critic started from the reward
    model (critic: rm), whose values already predict the score."""
    learning_rate: float = 1e-5
    """AdamW learning rate for everything that trains: actor, critic (adapters or whole models), value head."""
    max_new_tokens: int = 64
    """The longest response."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts."""
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """PPO's clip range of the policy ratio."""
    cliprange_value: float = 0.2
    """Clip range of the value function around its rollout-time values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    kl_coef: float = 0.05
    """Initial coefficient of the per-token KL penalty to the reference policy."""
    kl_target: float | None = None
    """With a target, the KL coefficient adapts (Ziegler et al.) to keep the KL near it; None keeps it fixed."""
    kl_horizon: int = 10000
    """The adaptive KL controller's horizon, in samples."""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the score of a response that hits max_new_tokens without an end-of-turn token."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean, unit variance per rollout batch."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    save_steps: int = 10
    """Checkpoint every N iterations (and at the end)."""
    sample_every: int = 5
    """Log a table of (prompt, response, reward) samples every N iterations."""
    logging_steps: int = 1
    """Log metrics every N iterations."""


@dataclass
class PPOConfig:
    enabled: bool = True
    """Whether `run` without --stage runs this stage."""
    init_from: str = "auto"
    """The policy the actor starts from (and the reference it is held to): auto (the latest of cpt/sft), base, a
    stage name, or a model/adapter path."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts ({"prompt"} or {"messages"} per line) in data.train; eval/eval_split hold some out for evaluation."""
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    """Where the scalar reward comes from."""
    critic: str | None = None
    """None: the critic is a value head with its own LoRA adapter on the policy's base (one copy of the weights; under
    peft.method full, a trainable copy of the starting policy). Or a separate critic: a (small) model directory,
    built-in name, adapter directory or stage of this run (cpt, sft, rm, dpo; rm starts the value head from the
    reward model's score head), which must share the policy's tokenizer. It trains like the actor: its own LoRA
    adapter from `peft` under lora, every weight under full; critic/ holds it whole, with value_head.safetensors."""
    trainer: PPOTrainerConfig = field(default_factory=PPOTrainerConfig)
    """The PPO hyperparameters (our own trainer: TRL has no PPO)."""


@dataclass
class OnlineRLConfig:
    """grpo and rloo: critic-free online RL through TRL's GRPOTrainer and RLOOTrainer. Each step samples
    `trainer.num_generations` responses to every prompt of its batch and learns from how each one's reward compares
    with the others' (GRPO: the group's mean and std; RLOO: the mean of the other responses)."""

    enabled: bool = True
    """Whether `run` without --stage runs this stage."""
    init_from: str = "auto"
    """The policy it starts from (and, with a KL term, is held to): auto (the latest of cpt/sft), base, a stage name,
    or a model/adapter path."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts, as ppo's ({"prompt"} or {"messages"} per line) in data.train; eval/eval_split hold some out, on which
    the reward is measured before and after training."""
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    """Where the scalar reward comes from: the same choices as ppo.reward."""
    trainer: dict = field(default_factory=dict)
    """Passed to TRL's GRPOConfig or RLOOConfig: num_generations, max_completion_length, beta, learning_rate,
    use_vllm... (seed, output_dir, report_to are the pipeline's)."""


@dataclass
class ClassifyConfig:
    """cls: a text classifier (any number of labels) trained with transformers' Trainer on rows of text and label;
    with a PEFT adapter its classification head trains in full beside it and is saved with it. A branch of its own,
    not part of the chat chain: `init_from: auto` is the base model."""

    enabled: bool = True
    """Whether `run` without --stage runs this stage."""
    init_from: str = "auto"
    """auto or base (the base model, under a new head), a model directory, or an adapter directory cls trained."""
    data: DataConfig = field(default_factory=DataConfig)
    """Rows of {"text", "label"} (.jsonl, .json, .csv, .parquet, datasets); columns renames them, e.g. {text: review,
    label: sentiment}; a label is a string or an integer. format, delimiters, general_eval and probes do not apply."""
    labels: list = field(default_factory=list)
    """The label names in the order of their ids; an integer label in the data is an index into it. Empty: the
    sorted labels of the training rows. A held-out label not among them is an error."""
    max_length: int = 256
    """Tokens per text; a longer one is cut there (counted in stage.json as data/truncated)."""
    trainer: dict = field(default_factory=dict)
    """Passed to transformers' TrainingArguments: learning_rate, num_train_epochs, max_steps, save_steps..."""


@dataclass
class RunConfig:
    seed: int = 42
    """Seeds data splits, model init and the trainers (unless a stage's trainer.seed says otherwise)."""
    run_dir: str | None = None
    """Where the run's artifacts go; default runs/<config file name>. The CLI's --run-dir wins."""
    preference_optimisation: str | None = None
    """dpo, kto, orpo or simpo: the one preference-optimisation stage `run` without --stage runs; the others' sections
    stay in the config, switched off (their `enabled` is then this key's to set). None: each section's `enabled`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Multi-process, multi-machine and DeepSpeed launching of the training stages."""
    cpt: StageConfig = field(default_factory=lambda: StageConfig(enabled=False))
    sft: StageConfig = field(default_factory=StageConfig)
    preferences: PreferencesConfig = field(default_factory=lambda: PreferencesConfig(enabled=False))
    rm: StageConfig = field(default_factory=lambda: StageConfig(enabled=False))
    dpo: StageConfig = field(default_factory=lambda: StageConfig(enabled=False))
    kto: StageConfig = field(default_factory=lambda: StageConfig(enabled=False))
    orpo: StageConfig = field(default_factory=lambda: StageConfig(enabled=False))
    simpo: StageConfig = field(default_factory=lambda: StageConfig(enabled=False))
    iterative_dpo: IterativeDPOConfig = field(default_factory=lambda: IterativeDPOConfig(enabled=False))
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(enabled=False))
    grpo: OnlineRLConfig = field(default_factory=lambda: OnlineRLConfig(enabled=False))
    rloo: OnlineRLConfig = field(default_factory=lambda: OnlineRLConfig(enabled=False))
    cls: ClassifyConfig = field(default_factory=lambda: ClassifyConfig(enabled=False))
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """How the policy stages (dpo, kto, orpo, simpo, ppo, grpo, rloo) are evaluated against their starting policy, and
    how sft's answers are sampled."""

    source: str = field(default="<defaults>", metadata={"internal": True})

    def stage(self, name: str) -> StageConfig | PreferencesConfig:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}


@dataclass(frozen=True)
class Stage:
    """A stage as the runner, the config, validate and the launcher see it. Its work is the module stages/<name>.py
    (check, data_files, uses_model, run); its config section is the RunConfig field of the same name."""

    name: str
    section: type
    """Its config section's class."""
    trainer: str | None
    """'module:Class' of the config its `trainer:` keys build (TRL's config for the stages TRL trains), or None."""
    output: str
    """What final/ holds: policy, reward_model or pairs (preference data)."""
    starts_later_stages: bool = False
    """`init_from: auto` starts every later stage from the latest enabled stage that has this (cpt, sft)."""
    data_from: str | None = None
    """The stage whose output it trains on when its config names no data file of its own."""
    launched: bool = False
    """It trains in the processes `accelerate launch` starts when `distributed:` asks for several, or DeepSpeed."""
    evaluated: bool = False
    """Its result is compared with the policy it started from (evaluation:), by the runner once it has saved it."""
    optimises_preferences: bool = False
    """It is one of the offline preference-optimisation stages the run's `preference_optimisation` key chooses from."""
    uses: Callable[[RunConfig], list[str]] = lambda config: []
    """The models it uses besides its starting one (a judge's, its reward's, its critic's): stage names or paths.
    Those that are stages of this run join its inputs, so a retrained reward model re-runs what scores with it."""
    model_kind: str = "causal_lm"
    """What it makes of model.name_or_path: causal_lm (checked to be one before any compute), or classifier (cls:
    any model transformers has a sequence-classification head for, starting from the base, not the chat chain)."""

    def trainer_config(self) -> type:
        module, name = self.trainer.split(":")
        return getattr(importlib.import_module(module), name)


def _preferences_uses(config: RunConfig) -> list[str]:
    judge = config.preferences.judge
    return [judge.model] if judge.type in MODEL_JUDGES else []


def _iterative_dpo_uses(config: RunConfig) -> list[str]:
    judge = config.iterative_dpo.judge
    return [judge.model] if judge.type in MODEL_JUDGES and judge.model else []


def _reward_uses(reward: RewardSourceConfig) -> list[str]:
    if reward.type == "reward_model":
        return [reward.model]
    if reward.type == "judge" and reward.judge.type in MODEL_JUDGES:
        return [reward.judge.model]
    return []


def _ppo_uses(config: RunConfig) -> list[str]:
    return _reward_uses(config.ppo.reward) + ([config.ppo.critic] if config.ppo.critic else [])


# Every stage, in pipeline order: the one place a stage is described.
REGISTRY = {stage.name: stage for stage in (
    Stage("cpt", StageConfig, "trl:SFTConfig", "policy", starts_later_stages=True, launched=True),
    Stage("sft", StageConfig, "trl:SFTConfig", "policy", starts_later_stages=True, launched=True),
    Stage("preferences", PreferencesConfig, None, "pairs", uses=_preferences_uses),
    Stage("rm", StageConfig, "trl:RewardConfig", "reward_model", data_from="preferences", launched=True),
    Stage("dpo", StageConfig, "trl:DPOConfig", "policy", data_from="preferences", launched=True, evaluated=True,
          optimises_preferences=True),
    Stage("kto", StageConfig, "trl:KTOConfig", "policy", data_from="preferences", launched=True, evaluated=True,
          optimises_preferences=True),
    Stage("orpo", StageConfig, "trl.experimental.orpo:ORPOConfig", "policy", data_from="preferences", launched=True,
          evaluated=True, optimises_preferences=True),
    Stage("simpo", StageConfig, "trl.experimental.cpo:CPOConfig", "policy", data_from="preferences", launched=True,
          evaluated=True, optimises_preferences=True),
    Stage("iterative_dpo", IterativeDPOConfig, "trl:DPOConfig", "policy", evaluated=True, uses=_iterative_dpo_uses),
    Stage("ppo", PPOConfig, "pipeline.config:PPOTrainerConfig", "policy", launched=True, evaluated=True,
          uses=_ppo_uses),
    Stage("grpo", OnlineRLConfig, "trl:GRPOConfig", "policy", launched=True, evaluated=True,
          uses=lambda config: _reward_uses(config.grpo.reward)),
    Stage("rloo", OnlineRLConfig, "trl:RLOOConfig", "policy", launched=True, evaluated=True,
          uses=lambda config: _reward_uses(config.rloo.reward)),
    Stage("cls", ClassifyConfig, "transformers:TrainingArguments", "classifier", model_kind="classifier"),
)}
STAGE_ORDER = tuple(REGISTRY)
PREFERENCE_OPTIMISERS = tuple(name for name, stage in REGISTRY.items() if stage.optimises_preferences)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply `KEY=VALUE` overrides (dotted keys, YAML values) and validate it."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.object[exc.start]:#04x}); re-save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}:{_yaml_where(exc)} not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, found {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    config = _build(RunConfig, raw, prefix="", source=str(path))
    config.source = str(path)
    _choose_preference_optimisation(config, raw)
    _check_values(config)
    return config


def _choose_preference_optimisation(config: RunConfig, raw: dict) -> None:
    """`preference_optimisation: X` switches X on and the other preference-optimisation stages off, whether or not
    their sections are written out: one key swaps dpo for kto, orpo or simpo. A section's own `enabled` that says
    otherwise is refused rather than overruled; one that agrees (a run's resolved config.yaml writes every section's)
    is kept."""
    choice = config.preference_optimisation
    if choice is None:
        return
    if choice not in PREFERENCE_OPTIMISERS:
        raise ConfigError(f"{config.source}: preference_optimisation '{choice}' is not one of "
                          f"{', '.join(PREFERENCE_OPTIMISERS)}{suggest(choice, PREFERENCE_OPTIMISERS)}")
    for name in PREFERENCE_OPTIMISERS:
        chosen = name == choice
        if isinstance(raw.get(name), dict) and raw[name].get("enabled", chosen) != chosen:
            raise ConfigError(f"{config.source}: {name}.enabled is {str(not chosen).lower()}, but "
                              f"preference_optimisation ({choice}) decides which of {', '.join(PREFERENCE_OPTIMISERS)} "
                              f"runs; remove {name}.enabled, or remove preference_optimisation to switch each stage "
                              "with its own `enabled`")
        config.stage(name).enabled = chosen


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"{mark.line + 1}:{mark.column + 1}:" if mark else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message on one line: the problem (and its context) without the quoted source it draws."""
    words = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    return " ".join(" ".join(str(w).split()) for w in words if w) or " ".join(str(exc).split())


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. sft.trainer.learning_rate=1e-4), got '{item}'")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
    try:
        node[leaf] = parse_yaml(value)  # an empty value is null, as in a YAML file: `--set key=` unsets key
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: the value {value!r} is not valid YAML: {_yaml_problem(exc)} (quote a "
                          "string that starts with [ { * & ! or holds ': ')") from None


def _build(cls, raw: Any, prefix: str, source: str, defaults: Any = None):
    """Turn a mapping into dataclass `cls`, checking every key and type; errors name the dotted key. Keys the
    mapping leaves out keep their values in `defaults` (a nested section's own default, e.g. evaluation.judge's
    type reward_model), else the class's defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {_kind(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{suggest(key, fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            factory = fields[key].default_factory
            nested_defaults = None if factory is dataclasses.MISSING else factory()
            values[key] = _build(hint, value, f"{prefix}{key}.", source, nested_defaults)
        else:
            values[key] = _check_type(value, hint, f"{prefix}{key}", source)
    if any(cls is stage.section for stage in REGISTRY.values()) and "enabled" not in raw:
        values["enabled"] = True  # writing a stage section into the config is how a user turns it on
    return cls(**values) if defaults is None else dataclasses.replace(defaults, **values)


def _check_type(value: Any, hint: Any, key: str, source: str) -> Any:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        base = typing.get_origin(kind) or kind
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if base is list and isinstance(value, str):
            return [value]  # report_to: wandb reads as naturally as [wandb]
        if isinstance(value, base) and not (base is int and isinstance(value, bool)):
            return copy.deepcopy(value)
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    if value is None:  # `key: ` or `--set key=` in YAML is null: say how to get the default back
        raise ConfigError(f"{source}: '{key}' cannot be null: give {names}, or leave the key out for its default")
    raise ConfigError(f"{source}: '{key}' must be {names}, got {_kind(value)} {value!r}")


def _check_values(config: RunConfig) -> None:
    if config.peft.method not in PEFT_METHODS:
        raise ConfigError(
            f"{config.source}: peft.method '{config.peft.method}' is not one of {', '.join(PEFT_METHODS)}"
            f"{suggest(config.peft.method, PEFT_METHODS)}"
        )
    if config.model.dtype not in DTYPES:
        raise ConfigError(f"{config.source}: model.dtype '{config.model.dtype}' is not one of {', '.join(DTYPES)}"
                          f"{suggest(config.model.dtype, DTYPES)}")
    for target in config.tracking.report_to:
        if target not in ("wandb", "tensorboard"):
            raise ConfigError(f"{config.source}: tracking.report_to: '{target}' is not wandb or tensorboard")
    for name in (name for name, spec in REGISTRY.items() if spec.section is StageConfig):
        stage = config.stage(name)
        if stage.enabled and REGISTRY[name].data_from is None and not stage.data.train:
            raise ConfigError(f"{config.source}: {name}.data.train is required when the {name} stage is enabled")
        _check_data_format(config, name)
        for key in stage.data.delimiters:
            if key not in ("start", "sep", "eos"):
                raise ConfigError(f"{config.source}: unknown key '{name}.data.delimiters.{key}'"
                                  f"{suggest(key, ('start', 'sep', 'eos'))}")
        if stage.data.general_eval and name != "cpt":
            raise ConfigError(f"{config.source}: {name}.data.general_eval: only cpt evaluates on general text")
        if stage.data.probes and name != "rm":
            raise ConfigError(f"{config.source}: {name}.data.probes: only rm measures accuracy on probe sets")
        for probe, path in stage.data.probes.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", str(probe)) or not isinstance(path, str) or not path:
                raise ConfigError(f"{config.source}: {name}.data.probes.{probe}: expected a lower-case name "
                                  "(letters, digits, _) mapped to a preference file path")
    for name in (name for name, spec in REGISTRY.items()
                 if "data" in {f.name for f in dataclasses.fields(spec.section)}):
        data = config.stage(name).data
        if not 0 <= data.eval_split < 1:
            raise ConfigError(f"{config.source}: {name}.data.eval_split must be in [0, 1), got {data.eval_split}")
        if name != "cpt" and (data.streaming or data.eval_documents is not None):
            raise ConfigError(f"{config.source}: {name}.data.{'streaming' if data.streaming else 'eval_documents'}: "
                              "only cpt streams its corpus and holds out a count of documents")
        policy = data.bad_rows
        if policy not in BAD_ROW_POLICIES:
            raise ConfigError(f"{config.source}: {name}.data.bad_rows must be error or drop, got {policy!r}"
                              f"{suggest(policy, BAD_ROW_POLICIES)}")
    _check_cpt_held_out(config)
    _check_preferences(config)
    _check_iterative_dpo(config)
    _check_evaluation(config)
    _check_ppo(config)
    _check_cls(config)
    for name in (name for name, spec in REGISTRY.items() if spec.section is OnlineRLConfig):
        _check_prompts_and_reward(config, name)
    _check_distributed(config)


def _check_cpt_held_out(config: RunConfig) -> None:
    """cpt's held-out documents are named one way, and a streamed corpus can train and hold out only what needs no
    count of it: the trainer a number of steps, the held-out set a number of documents."""
    data, trainer, source = config.cpt.data, config.cpt.trainer, config.source
    if data.eval_documents is not None:
        if isinstance(data.eval_documents, bool) or data.eval_documents < 0:
            raise ConfigError(f"{source}: cpt.data.eval_documents must be a count of documents (0 or more), got "
                              f"{data.eval_documents!r}")
        if data.eval:
            raise ConfigError(f"{source}: cpt.data.eval and cpt.data.eval_documents both name held-out documents; "
                              "keep one")
    if not data.streaming:
        return
    steps = trainer.get("max_steps", -1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ConfigError(f"{source}: cpt.data.streaming needs cpt.trainer.max_steps (a positive number of optimiser "
                          "steps): a streamed corpus is never counted, so the trainer cannot tell how many steps an "
                          "epoch is")
    if not data.eval and data.eval_documents is None and data.eval_split > 0:
        raise ConfigError(f"{source}: cpt.data.eval_split ({data.eval_split:g}) is a fraction of the corpus, which "
                          "streaming never reads whole: set cpt.data.eval_documents to hold out the first N "
                          "documents, give held-out data in cpt.data.eval, or set cpt.data.eval_split: 0 to train "
                          "without held-out evaluation")


def _check_data_format(config: RunConfig, name: str) -> None:
    """format and delimiters where the stage reads them; a stage that would ignore one refuses it. (The preference
    and feedback formats of rm, dpo, kto, orpo and simpo are checked by those stages, which know them; every stage's
    reader checks `columns` against the fields of the format it reads.)"""
    data, source = config.stage(name).data, config.source
    formats = {"cpt": TEXT_FORMATS, "sft": ("auto", *CONVERSATION_FORMATS)}
    if name in formats and data.format not in formats[name]:
        raise ConfigError(f"{source}: {name}.data.format '{data.format}' is not one of {', '.join(formats[name])}"
                          f"{suggest(data.format, formats[name])}")
    if data.delimiters and name != "sft":
        raise ConfigError(f"{source}: {name}.data.delimiters: only sft reads delimited samples")


def _check_distributed(config: RunConfig) -> None:
    dist, source = config.distributed, config.source
    if dist.num_processes < 1 or dist.num_machines < 1:
        raise ConfigError(f"{source}: distributed.num_processes and distributed.num_machines must be at least 1")
    if not 0 <= dist.machine_rank < dist.num_machines:
        raise ConfigError(f"{source}: distributed.machine_rank must be in [0, {dist.num_machines}), "
                          f"got {dist.machine_rank}")
    if dist.num_machines > 1 and not dist.main_process_ip:
        raise ConfigError(f"{source}: distributed.main_process_ip (the address of machine 0) is required when "
                          f"distributed.num_machines > 1")
    if dist.deepspeed:
        import json

        path = Path(dist.deepspeed)
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except OSError:
            raise ConfigError(f"{source}: distributed.deepspeed: no DeepSpeed config at {path}") from None
        except ValueError as exc:
            raise ConfigError(f"{source}: distributed.deepspeed: {path} is not valid JSON: {exc}") from None


def _check_evaluation(config: RunConfig) -> None:
    evaluation, source = config.evaluation, config.source
    evaluation.judges = [entry if isinstance(entry, JudgeConfig)
                         else _build(JudgeConfig, entry, f"evaluation.judges.{i}.", source)
                         for i, entry in enumerate(evaluation.judges)]
    for where, judge in [("evaluation.judge", evaluation.judge),
                         *((f"evaluation.judges.{i}", judge) for i, judge in enumerate(evaluation.judges))]:
        if judge.type not in JUDGE_TYPES or judge.type in ("human", "human_file"):
            raise ConfigError(f"{source}: {where}.type '{judge.type}' must be one of "
                              f"{', '.join(t for t in JUDGE_TYPES if t not in ('human', 'human_file'))} (new "
                              "responses have no labels yet, and a person is not asked here)")
        for key in JUDGE_REQUIRED.get(judge.type, ()):
            if not getattr(judge, key):
                raise ConfigError(f"{source}: {where}.{key} is required for judge type {judge.type}")
        _check_judge_values(judge, f"{source}: {where}")
    if evaluation.max_new_tokens < 1 or evaluation.batch_size < 1 or evaluation.temperature <= 0:
        raise ConfigError(f"{source}: evaluation needs max_new_tokens >= 1, batch_size >= 1 and temperature > 0")
    if evaluation.max_references < 0:
        raise ConfigError(f"{source}: evaluation.max_references must be >= 0, got {evaluation.max_references}")


def _check_judge_values(judge: JudgeConfig, where: str) -> None:
    if judge.length_norm not in ("sum", "mean"):
        raise ConfigError(f"{where}.length_norm must be sum or mean, got {judge.length_norm!r}"
                          f"{suggest(judge.length_norm, ('sum', 'mean'))}")
    if judge.tie_margin < 0:
        raise ConfigError(f"{where}.tie_margin must be >= 0, got {judge.tie_margin}")
    if not 0 <= judge.overlap <= 1:
        raise ConfigError(f"{where}.overlap must be a share between 0 and 1, got {judge.overlap}")
    if judge.disagreement not in DISAGREEMENT_RULES:
        raise ConfigError(f"{where}.disagreement must be majority or drop, got {judge.disagreement!r}"
                          f"{suggest(judge.disagreement, DISAGREEMENT_RULES)}")


def _check_sampling(sampling, where: str) -> None:
    """A section's `sampling:` (preferences, iterative_dpo) can make pairs; `where` is "<file>: <section>"."""
    if sampling.num_responses < 2:
        raise ConfigError(f"{where}.sampling.num_responses must be at least 2 to make a pair")
    if sampling.temperature <= 0 or not 0 < sampling.top_p <= 1 or sampling.max_new_tokens < 1 \
            or sampling.batch_size < 1:
        raise ConfigError(f"{where}.sampling needs temperature > 0, 0 < top_p <= 1, max_new_tokens >= 1 and "
                          "batch_size >= 1")


def _check_preferences(config: RunConfig) -> None:
    prefs, source = config.preferences, config.source
    if prefs.enabled and not (prefs.prompts or prefs.pairs):
        raise ConfigError(f"{source}: the preferences stage needs preferences.prompts (to sample responses) "
                          "or preferences.pairs (ready-made pairs), or both")
    _check_sampling(prefs.sampling, f"{source}: preferences")
    judge = prefs.judge
    if judge.type not in JUDGE_TYPES:
        raise ConfigError(f"{source}: preferences.judge.type '{judge.type}' is not one of "
                          f"{', '.join(JUDGE_TYPES)}{suggest(judge.type, JUDGE_TYPES)}")
    for key in JUDGE_REQUIRED.get(judge.type, ()):
        if not getattr(judge, key):
            raise ConfigError(f"{source}: preferences.judge.{key} is required for judge type {judge.type}")
    if judge.rubric and judge.principles:
        raise ConfigError(f"{source}: set preferences.judge.rubric or preferences.judge.principles, not both")
    if judge.batch_size < 1 or judge.max_length < 1:
        raise ConfigError(f"{source}: preferences.judge.batch_size and max_length must be at least 1")
    _check_judge_values(judge, f"{source}: preferences.judge")


def _check_iterative_dpo(config: RunConfig) -> None:
    section, source = config.iterative_dpo, config.source
    where = f"{source}: iterative_dpo"
    if section.enabled and not section.prompts:
        raise ConfigError(f"{where}.prompts (a prompts file to sample each round's pairs for) is required when the "
                          "iterative_dpo stage is enabled")
    if section.rounds < 1:
        raise ConfigError(f"{where}.rounds must be at least 1, got {section.rounds}")
    if section.prompts_per_round is not None and section.prompts_per_round < 1:
        raise ConfigError(f"{where}.prompts_per_round must be at least 1 (or null for every prompt), got "
                          f"{section.prompts_per_round}")
    if section.reference not in REFERENCES:
        raise ConfigError(f"{where}.reference must be previous or start, got {section.reference!r}"
                          f"{suggest(section.reference, REFERENCES)}")
    if not 0 <= section.eval_split < 1:
        raise ConfigError(f"{where}.eval_split must be in [0, 1), got {section.eval_split}")
    if section.win_rate_prompts < 0:
        raise ConfigError(f"{where}.win_rate_prompts must be >= 0, got {section.win_rate_prompts}")
    # Only for a section that runs: a run that leaves iterative_dpo off may leave evaluation.prompts unset.
    if section.enabled and section.win_rate_prompts and not config.evaluation.prompts:
        raise ConfigError(f"{where}.win_rate_prompts compares each round's policy with the start on "
                          "evaluation.prompts, which is not set")
    _check_sampling(section.sampling, where)
    judge = section.judge
    if judge.type in ("human", "human_file"):
        raise ConfigError(
            f"{where}.judge.type '{judge.type}': each round labels pairs sampled from the policy the round before "
            "trained, while the stage runs, so no person (nor a file of their labels) can label them; use an AI "
            "judge (contrastive, llm, api, rule, reward_model). To train on people's labels, label offline with "
            "the preferences stage and train dpo")
    if judge.type not in JUDGE_TYPES:
        raise ConfigError(f"{where}.judge.type '{judge.type}' is not one of "
                          f"{', '.join(t for t in JUDGE_TYPES if t not in ('human', 'human_file'))}"
                          f"{suggest(judge.type, JUDGE_TYPES)}")
    for key in JUDGE_REQUIRED.get(judge.type, ()):
        if not getattr(judge, key):
            raise ConfigError(f"{where}.judge.{key} is required for judge type {judge.type}")
    if judge.rubric and judge.principles:
        raise ConfigError(f"{where}: set judge.rubric or judge.principles, not both")
    if judge.batch_size < 1 or judge.max_length < 1:
        raise ConfigError(f"{where}.judge.batch_size and max_length must be at least 1")
    _check_judge_values(judge, f"{where}.judge")


def _check_prompts_and_reward(config: RunConfig, name: str) -> None:
    """A stage that samples from prompts and learns from `reward:` (ppo, grpo, rloo): its data and its reward."""
    section, source = config.stage(name), config.source
    if section.enabled and not section.data.train:
        raise ConfigError(f"{source}: {name}.data.train (a prompts file) is required when the {name} stage is enabled")
    if section.data.format != "auto" or section.data.delimiters:
        raise ConfigError(f"{source}: {name}.data holds prompts ({{\"prompt\"}} or {{\"messages\"}} per line); its "
                          "format is auto (columns can rename prompt and messages) and delimiters do not apply to it")
    if section.data.general_eval or section.data.probes:
        raise ConfigError(f"{source}: {name}.data: general_eval is cpt's and probes are rm's")
    reward = section.reward
    if reward.type not in REWARD_TYPES:
        raise ConfigError(f"{source}: {name}.reward.type '{reward.type}' is not one of {', '.join(REWARD_TYPES)}"
                          f"{suggest(reward.type, REWARD_TYPES)}")
    if reward.type == "judge":
        _check_reward_judge(reward, name, source)
    if reward.type == "rule" and not reward.function:
        raise ConfigError(f"{source}: {name}.reward.function ('module:function') is required for reward type rule")
    if reward.type == "reward_model" and not reward.model:
        raise ConfigError(f"{source}: {name}.reward.model (rm, or a reward model directory) is required")


def _check_ppo(config: RunConfig) -> None:
    ppo, source = config.ppo, config.source
    _check_prompts_and_reward(config, "ppo")
    t = ppo.trainer
    checks = [
        (t.max_steps >= 1, "max_steps >= 1"), (t.rollout_batch_size >= 1, "rollout_batch_size >= 1"),
        (t.mini_batch_size >= 1 and t.rollout_batch_size % t.mini_batch_size == 0,
         f"mini_batch_size to divide rollout_batch_size ({t.mini_batch_size} into {t.rollout_batch_size})"),
        (t.num_ppo_epochs >= 1, "num_ppo_epochs >= 1"), (t.learning_rate > 0, "learning_rate > 0"),
        (0 <= t.critic_warmup_steps < t.max_steps,
         f"0 <= critic_warmup_steps < max_steps ({t.critic_warmup_steps} of {t.max_steps}: the actor must train)"),
        (t.max_new_tokens >= 1, "max_new_tokens >= 1"), (t.temperature > 0, "temperature > 0"),
        (0 < t.top_p <= 1, "0 < top_p <= 1"), (0 <= t.gamma <= 1 and 0 <= t.lam <= 1, "gamma and lam in [0, 1]"),
        (t.cliprange > 0 and t.cliprange_value > 0, "cliprange and cliprange_value > 0"),
        (t.vf_coef >= 0 and t.kl_coef >= 0, "vf_coef and kl_coef >= 0"),
        (t.vf_coef > 0 or not t.critic_warmup_steps, "vf_coef > 0 for a critic warm-up (critic_warmup_steps)"),
        (t.kl_target is None or t.kl_target > 0, "kl_target > 0 (or unset for a fixed coefficient)"),
        (t.kl_horizon >= 1 and t.max_grad_norm > 0, "kl_horizon >= 1 and max_grad_norm > 0"),
        (min(t.save_steps, t.sample_every, t.logging_steps) >= 1, "save_steps, sample_every, logging_steps >= 1"),
    ]
    for ok, need in checks:
        if not ok:
            raise ConfigError(f"{source}: ppo.trainer needs {need}")


def _check_cls(config: RunConfig) -> None:
    section, where = config.cls, f"{config.source}: cls"
    data = section.data
    if section.enabled and not data.train:
        raise ConfigError(f"{where}.data.train (rows of text and label) is required when the cls stage is enabled")
    if data.format != "auto" or data.delimiters or data.general_eval or data.probes:
        raise ConfigError(f"{where}.data holds rows of text and label (.jsonl, .json, .csv, .parquet); its format is "
                          "auto (columns can rename text and label), and delimiters, general_eval and probes do not "
                          "apply to it")
    for key, value in data.columns.items():
        if key not in ("text", "label") or not isinstance(value, str) or not value:
            raise ConfigError(f"{where}.data.columns.{key}: cls reads the fields text and label; map each to a "
                              f"column name of the file{suggest(key, ('text', 'label'))}")
    labels = section.labels
    if labels and (len(labels) < 2 or not all(isinstance(label, str) and label.strip() for label in labels)
                   or len(set(labels)) < len(labels)):
        raise ConfigError(f"{where}.labels must name at least two distinct labels as non-empty strings, got {labels}")
    if section.max_length < 1:
        raise ConfigError(f"{where}.max_length must be at least 1, got {section.max_length}")


def _check_reward_judge(reward: RewardSourceConfig, name: str, source) -> None:
    judge = reward.judge
    allowed = PAIRWISE_REWARD_JUDGES if reward.pairwise else POINTWISE_REWARD_JUDGES
    if judge.type not in allowed:
        how = "pairwise" if reward.pairwise else "pointwise (each response scored alone)"
        raise ConfigError(f"{source}: {name}.reward.judge.type '{judge.type}' cannot reward {how}; use one of "
                          f"{', '.join(allowed)}" + ("" if reward.pairwise else
                                                    f", or set {name}.reward.pairwise=true to compare with the "
                                                    "reference policy's response"))
    for key in JUDGE_REQUIRED.get(judge.type, ()):
        if not getattr(judge, key):
            raise ConfigError(f"{source}: {name}.reward.judge.{key} is required for judge type {judge.type}")
    if judge.rubric and judge.principles:
        raise ConfigError(f"{source}: set {name}.reward.judge.rubric or {name}.reward.judge.principles, not both")
    _check_judge_values(judge, f"{source}: {name}.reward.judge")


# What the preference is (the labeller's principle) rather than how one judge works: a config states it once for
# whichever judge the `type` key picks, people included, so it is never "unused".
PREFERENCE_KEYS = {"rubric", "principles", "follow", "violation"}


def evaluation_judges(config: RunConfig) -> list[JudgeConfig]:
    """Every judge the evaluation after a policy stage asks: `evaluation.judge`, then `evaluation.judges`."""
    return [config.evaluation.judge, *config.evaluation.judges]


def unused_judge_keys(judge: JudgeConfig) -> list[str]:
    """Keys set for another judge type. Not an error: swapping judges must stay a change of `type` alone."""
    defaults = JudgeConfig()
    optional = {key for keys in JUDGE_KEYS.values() for key in keys} - PREFERENCE_KEYS
    return [key for key in sorted(optional - set(JUDGE_KEYS[judge.type]))
            if getattr(judge, key) != getattr(defaults, key)]


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(choices))})"


def _kind(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else type(value).__name__
