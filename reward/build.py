"""From `preferences.judge` in the config to a judge object, and to the label file that judge's labels live in.

Labels are kept per judge at `<run>/labels/<judge id>.jsonl`, outside any stage directory: a stage that runs again
(a new prompt file, more samples) moves its own directory to .history/, but a judge's labels stay where they are,
so no pair a judge has labelled is ever put to it again. The id covers what changes a judge's verdicts (its type,
model, rubric, label file...), not how it is run (batch size, retries), so swapping judges back and forth reuses
each one's labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.artifacts import hash_config, hash_path
from pipeline.config import JUDGE_KEYS, JudgeConfig, RunConfig, unused_judge_keys
from pipeline.context import ModelSource
from pipeline.errors import ConfigError
from pipeline.log import log, progress, warn
from pipeline.signals import Interrupted, requested
from pipeline.signals import name as signal_name
from reward.pairs import Label, LabelStore, Pair

# Keys that say how a judge runs rather than what it decides: left out of its identity.
_RUNTIME_KEYS = {"batch_size", "max_concurrency", "max_retries", "timeout", "api_key_env"}


def rubric_text(judge: JudgeConfig) -> str | None:
    """The rubric, or the principles written out as a numbered constitution."""
    from reward.judges import constitution

    return constitution(judge.principles) if judge.principles else judge.rubric


HUMAN = "human"  # one person (or team) labelling a run: `python -m pipeline label` writes these labels


def human_labels_path(run_dir: Path) -> Path:
    return run_dir / "labels" / f"{HUMAN}.jsonl"


def judge_id(config: RunConfig, run_dir: Path) -> str:
    judge = config.preferences.judge
    if judge.type == "human":
        return HUMAN
    keys = {key: getattr(judge, key) for key in JUDGE_KEYS[judge.type] if key not in _RUNTIME_KEYS}
    if judge.type == "human_file":
        keys["content"] = hash_path(Path(judge.path))
    if judge.type in ("llm", "contrastive", "reward_model"):
        source = ModelSource.named(judge.model or config.model.name_or_path, run_dir)
        keys["model"] = [str(source.base), hash_path(source.adapter) if source.adapter else None]
    return f"{judge.type}-{hash_config(keys)[:10]}"


def labels_path(config: RunConfig, run_dir: Path) -> Path:
    return run_dir / "labels" / f"{judge_id(config, run_dir)}.jsonl"


def build_judge(judge: JudgeConfig, config: RunConfig, run_dir: Path, on_label: Callable[[Label], None] | None = None):
    """The judge `judge` describes (not `human`, which the stage drives in the terminal). Judges that label pairs
    one at a time as answers arrive (api, llm, reward_model) call `on_label` themselves; for the others the caller
    stores each batch's labels."""
    if judge.type == "human_file":
        from reward.judges import HumanFileJudge

        return HumanFileJudge(judge.path)
    if judge.type == "rule":
        from reward.judges import RuleJudge

        return RuleJudge(judge.function)
    if judge.type == "api":
        from reward.api_judge import DEFAULT_RUBRIC, ApiJudge, ApiJudgeConfig

        return ApiJudge(ApiJudgeConfig(
            base_url=judge.base_url, model=judge.model, api_key_env=judge.api_key_env,
            rubric=rubric_text(judge) or DEFAULT_RUBRIC, max_concurrency=judge.max_concurrency,
            max_retries=judge.max_retries, timeout=judge.timeout,
        ), on_label=on_label)
    if judge.type == "llm":
        from reward.llm_judge import LlmJudge

        source = ModelSource.named(judge.model or config.model.name_or_path, run_dir)
        name = f"llm:{judge.model or config.model.name_or_path}"
        return LlmJudge.from_path(source.base, config.model, adapter=source.adapter, rubric=judge.rubric,
                                  principles=judge.principles or None, batch_size=judge.batch_size,
                                  max_length=judge.max_length, tie_margin=judge.tie_margin, name=name,
                                  on_label=on_label)
    if judge.type == "contrastive":
        from reward.contrastive_judge import ContrastiveJudge

        source = ModelSource.named(judge.model or config.model.name_or_path, run_dir)
        return ContrastiveJudge.from_path(
            source.base, config.model, adapter=source.adapter, rubric=judge.rubric,
            principles=judge.principles or None, follow=judge.follow, violation=judge.violation,
            length_norm=judge.length_norm, batch_size=judge.batch_size, max_length=judge.max_length,
            tie_margin=judge.tie_margin,
            name=f"contrastive:{judge.model or config.model.name_or_path}", on_label=on_label)
    if judge.type == "reward_model":
        from reward.rm_judge import RewardModelJudge

        source = ModelSource.named(judge.model, run_dir)
        return RewardModelJudge.from_path(source.base, config.model, adapter=source.adapter,
                                          batch_size=judge.batch_size, max_length=judge.max_length,
                                          tie_margin=judge.tie_margin, name=f"reward_model:{judge.model}",
                                          on_label=on_label)
    raise ConfigError(f"judge type {judge.type} has no builder")


def check_judge(judge: JudgeConfig, config: RunConfig, where: str) -> None:
    """Before any compute: warn of keys the judge type does not read, and fail now on what would fail at labelling
    (a label file that does not read, a rule that does not import, an API key variable that is unset)."""
    from reward.judges import HumanFileJudge, load_callable

    unused = unused_judge_keys(judge)
    if unused:
        warn(f"{where}: {', '.join(unused)} set but not used by judge type {judge.type}")
    if judge.type == "human_file":
        HumanFileJudge(judge.path)
    elif judge.type == "rule":
        load_callable(judge.function)
    elif judge.type == "api":
        build_judge(judge, config, Path("."))  # fails now if the key's variable is unset


def label_pairs(judge: JudgeConfig, config: RunConfig, run_dir: Path, pairs: list[Pair], store: LabelStore,
                who: str) -> None:
    """Put every pair `store` has no label for to the AI judge `judge`, a batch at a time, storing each label as it
    is given: a kill loses none, and a re-run asks none twice. `who` (the stage) starts the log line."""
    todo = [pair for pair in pairs if not store.is_labelled(pair.id)]
    log(f"{who}: {len(pairs)} pairs, {len(pairs) - len(todo)} already labelled by this judge, {len(todo)} to label")
    if not todo:
        return

    def on_label(label):
        if not store.is_labelled(label.pair_id):
            store.add(label)

    built = build_judge(judge, config, run_dir, on_label)
    with progress() as bar:
        task = bar.add_task(f"judging ({built.name})", total=len(todo))
        for start in range(0, len(todo), judge.batch_size):
            if requested():  # every label given so far is on disk; the re-run asks only for the rest
                raise Interrupted(requested(), f"{who} stopped for {signal_name(requested())} with {start} of "
                                               f"{len(todo)} pairs judged; run the same command again to continue")
            batch = todo[start:start + judge.batch_size]
            for label in built.judge(batch):
                on_label(label)
            bar.advance(task, len(batch))
