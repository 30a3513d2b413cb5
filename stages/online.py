"""What the stages that learn online from a reward share (ppo, and grpo and rloo through TRL): their prompts, and the
one builder of their reward from the stage's `reward:` section (RewardSourceConfig), so that every such stage is
rewarded by exactly the same code.

The reward is a function (prompt messages, response texts) -> one float per response:
- reward_model: a Bradley-Terry model (this run's rm stage, or a directory) scores the conversation, on exactly the
  text the rm stage trained on;
- rule: a Python function (prompt messages, response text) -> float;
- judge: any AI judge (online RLAIF). Pointwise, the judge's score of each response alone, for judges that score
  one response (contrastive, reward_model, rule): the contrastive judge's log-likelihood ratio is a reward in nats.
  Pairwise (`reward.pairwise: true`), the judge compares each response with the reference policy's response to the
  same prompt, and the reward is 2 p(win) - 1 in [-1, 1], where p(win) is the judge's confidence in its verdict for
  the policy (1 for a judge that gives no confidence; a tie is 0). Any AI judge can do this, the A/B-reading llm
  judge and an API judge too. The reference responses are sampled once, before training, from the starting policy
  (the reference the stage holds its policy to) with the stage's sampling settings: one per distinct prompt, seeded,
  and kept in <stage>/reference_responses.jsonl batch by batch, so a resumed stage compares against the same ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from pipeline.config import REGISTRY, RunConfig, SamplingConfig
from pipeline.context import StageContext
from pipeline.data import Split
from pipeline.errors import ConfigError, PipelineError
from pipeline.log import log
from reward.pairs import Label, Pair

REFERENCE_FILE = "reference_responses.jsonl"
# (prompt messages, response texts) -> one score per response
RewardFunction = Callable[[list[list[dict]], list[str]], list[float]]


def data_files(config: RunConfig, stage: str) -> dict:
    data = config.stage(stage).data
    return {key: getattr(data, key) for key in ("train", "eval") if getattr(data, key)}


def load_prompts(config: RunConfig, stage: str) -> Split:
    """(training prompts, held-out prompts) of `stage`, as message lists ending with the user's turn, read from any
    source pipeline/sources.py reads, `columns` renaming prompt and messages; bad rows under data.bad_rows."""
    from pipeline.records import BadRows
    from pipeline.sources import read_all
    from reward.importers import load_prompts as read_prompts
    from stages.lm import config_key, split_eval

    data = config.stage(stage).data
    bad = BadRows()

    def read(key: str) -> list[list[dict]]:
        with config_key(f"{stage}.data"):
            return read_all(getattr(data, key), f"{stage}.data.{key}", lambda source: [
                messages for messages, _ in read_prompts(source, data.columns, bad)], config.seed)

    train, held_out = (read("train"), read("eval")) if data.eval else \
        split_eval(read("train"), data.eval_split, config.seed)
    return Split(train, held_out, {"data/dropped_bad_rows": bad.settle(data.bad_rows, f"{stage}.data")})


def summarise_prompts(config: RunConfig, stage: str, tokenizer, summary: str, max_new_tokens: int) -> str:
    """validate's account of a stage's prompts: `summary` (its check), the longest prompt and the response budget."""
    from pipeline.render import prompt_ids
    from stages.lm import dropped_note

    split = load_prompts(config, stage)
    longest = max((len(prompt_ids(tokenizer, p)) for p in split.train + split.held_out), default=0)
    return (f"{summary}; longest prompt {longest} tokens, + up to {max_new_tokens} response tokens"
            f"{dropped_note(split.dropped)}")


def check_reward(config: RunConfig, stage: str) -> str:
    """Before any compute: what `<stage>.reward` names can reward (the config schema has checked its keys); returns
    where the reward comes from, in words."""
    from reward.judges import load_callable

    reward = config.stage(stage).reward
    if reward.type == "rule":
        load_callable(reward.function)
    elif reward.type == "judge":
        if reward.judge.type == "rule":
            load_callable(reward.judge.function)
        if reward.judge.type == "api":
            from reward.build import build_judge

            build_judge(reward.judge, config, Path("."))  # fails now if the key's variable is unset
    elif reward.model in REGISTRY and REGISTRY[reward.model].output != "reward_model":
        raise ConfigError(f"{stage}.reward.model '{reward.model}': of this run's stages only rm makes a reward model")
    elif reward.model != "rm" and not any((Path(reward.model) / name).exists()
                                          for name in ("config.json", "adapter_config.json")):
        raise ConfigError(f"{stage}.reward.model '{reward.model}' is neither rm (this run's rm stage) nor a reward "
                          "model or adapter directory")
    source = {"rule": reward.function, "judge": f"{'pairwise' if reward.pairwise else 'pointwise'} "
                                               f"{reward.judge.type}"}.get(reward.type, reward.model)
    return f"reward from {reward.type} {source}"


def build_reward(ctx: StageContext, prompts: list[list[dict]], sampling: SamplingConfig, max_length: int,
                 batch_size: int) -> RewardFunction:
    """The reward of `ctx.section.reward`. `prompts`: every prompt the stage will score responses to (a pairwise
    judge's reference responses are sampled for them, with `sampling`); `max_length`: the reward model's length
    limit, which the caller sizes so that no response is ever too long to score; `batch_size`: its batch."""
    reward = ctx.section.reward
    if reward.type == "judge":
        return judge_reward(ctx, prompts, sampling)
    if reward.type == "rule":
        from reward.judges import load_callable

        rule = load_callable(reward.function)
        return lambda prompts, responses: [float(rule(p, r)) for p, r in zip(prompts, responses)]
    from pipeline.artifacts import completed, read_manifest
    from pipeline.context import ModelSource
    from reward.rm_judge import RewardModelJudge

    if reward.model == "rm" and not completed(read_manifest(ctx.run_dir / "rm")):
        raise PipelineError(f"{ctx.name}.reward.model is rm, but the rm stage has not completed in {ctx.run_dir}: run "
                            f"it first (--stage rm), or point {ctx.name}.reward.model at a reward model directory")
    source = ModelSource.named(reward.model, ctx.run_dir)
    log(f"{ctx.name}: rewards from {source.description}")
    judge = RewardModelJudge.from_path(source.base, ctx.config.model, adapter=source.adapter, batch_size=batch_size,
                                       max_length=max_length)
    return judge.score


def judge_reward(ctx: StageContext, prompts: list[list[dict]], sampling: SamplingConfig) -> RewardFunction:
    from reward.build import build_judge

    reward = ctx.section.reward
    judge = build_judge(reward.judge, ctx.config, ctx.run_dir)
    if not reward.pairwise:
        log(f"{ctx.name}: rewards are {judge.name}'s score of each response")
        return judge.score
    references = reference_responses(ctx, prompts, sampling)
    log(f"{ctx.name}: rewards are {judge.name}'s verdicts against the reference policy's responses "
        f"({len(references)} prompts, {ctx.stage_dir / REFERENCE_FILE})")
    return lambda batch, responses: pairwise_rewards(ctx.name, judge, references, batch, responses)


def prompt_key(prompt: list[dict]) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def reference_responses(ctx: StageContext, prompts: list[list[dict]], sampling: SamplingConfig) -> dict[str, str]:
    """The starting policy's response to each distinct prompt, by prompt_key. (Its model is freed on return.) In
    launched processes the main one samples them into the file first; the others then find every batch there."""
    from pipeline.distributed import main_process_first
    from pipeline.models import load_policy, load_tokenizer
    from stages.generate import sample_responses

    unique = list({prompt_key(prompt): prompt for prompt in prompts}.values())
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    model = load_policy(ctx.init.base, ctx.init.adapter, ctx.config.model, tokenizer)
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    with main_process_first():
        samples = sample_responses(model, tokenizer, unique, sampling, ctx.config.seed, ctx.stage_dir / REFERENCE_FILE)
    return {prompt_key(prompt): responses[0] for prompt, responses in zip(unique, samples.responses)}


def win_reward(label: Label) -> float:
    """2 p(win) - 1 for response_a (the policy's): +1 a sure win, -1 a sure loss, 0 a tie or a coin flip."""
    if label.winner == "tie":
        return 0.0
    confidence = 1.0 if label.confidence is None else label.confidence
    p_win = confidence if label.winner == "a" else 1 - confidence
    return 2 * p_win - 1


def pairwise_rewards(stage: str, judge, references: dict[str, str], prompts: list[list[dict]],
                     responses: list[str]) -> list[float]:
    """The judge's verdict on each (policy response, reference response) pair, as win_reward. The policy's
    response is always response_a: the judges that read positions see both orders and remove the bias."""
    pairs = [Pair.create(prompt, response, references[prompt_key(prompt)], f"{stage} rollout")
             for prompt, response in zip(prompts, responses)]
    labels = {label.pair_id: label for label in judge.judge(pairs)}
    missing = [pair for pair in pairs if pair.id not in labels]
    if missing:
        raise PipelineError(f"{stage}: the judge {judge.name} left {len(missing)} of {len(pairs)} responses unjudged "
                            f"(a conversation over its max_length?); raise {stage}.reward.judge.max_length")
    return [win_reward(labels[pair.id]) for pair in pairs]
