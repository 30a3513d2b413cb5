"""Stage preferences: pairs of responses, labelled by the configured judge, become chosen/rejected rows.

1. Pairs: ready-made ones from `preferences.pairs`, and/or `sampling.num_responses` responses sampled from the
   policy for every prompt in `preferences.prompts` (every two responses of a prompt make a pair).
2. Labels: the judge sees only pairs it has not labelled yet; each label is on disk as soon as it is given
   (`<run>/labels/<judge id>.jsonl`, see reward.build), so a crash or a quit loses none and asks none twice.
   People (`judge.type: human`) label in the terminal or on the page of `label --web`, some pairs twice
   (`judge.overlap`, reward.annotators); while pairs wait for them, the stage stops and says how to label.
3. Output: final/preferences.jsonl for rm and dpo; ties and unlabelled pairs are counted, never dropped silently;
   with `compare_with`, how far the judge agrees with those (human) labels; between annotators, their κ.

Layout: pairs.jsonl (what is judged), samples.jsonl (sampling progress),
final/{preferences,agreement,annotators}.jsonl|json.
"""

from __future__ import annotations

import sys

from pipeline.artifacts import write_json_atomic
from pipeline.config import RunConfig
from pipeline.context import StageContext, StageResult
from pipeline.distributed import is_main_process
from pipeline.errors import PipelineError
from pipeline.log import log, warn
from reward.pairs import LabelStore, Pair, label_stats, preference_rows, write_pairs, write_preferences

NAME = "preferences"


class AwaitingLabels(PipelineError):
    """Pairs are waiting for a person; the stage is neither failed nor done."""

    status = "awaiting_labels"


def uses_model(config: RunConfig) -> bool:
    return bool(config.preferences.prompts)  # a policy is needed only to sample responses


def data_files(config: RunConfig) -> dict:
    prefs = config.preferences
    files = {"prompts": prefs.prompts, "pairs": prefs.pairs, "compare_with": prefs.compare_with}
    if prefs.judge.type == "human_file":
        files["judge"] = prefs.judge.path
    return {key: path for key, path in files.items() if path}


def check(config: RunConfig) -> str:
    """Parse every input file and set the judge up as far as it can be without loading a model."""
    from reward.build import check_judge
    from reward.importers import load_pairs, load_prompts
    from reward.judges import HumanFileJudge

    prefs = config.preferences
    prompts = load_prompts(prefs.prompts)[: prefs.max_prompts] if prefs.prompts else []
    pairs = load_pairs(prefs.pairs) if prefs.pairs else []
    judge = prefs.judge
    check_judge(judge, config, "preferences.judge")
    if prefs.compare_with:
        HumanFileJudge(prefs.compare_with)
    return (f"{len(prompts)} prompts x {prefs.sampling.num_responses} samples, {len(pairs)} ready-made pairs, "
            f"judge {judge.type}")


def _sampled_pairs(ctx: StageContext, prompts: list[tuple[list[dict], str]]) -> tuple[list[Pair], dict]:
    from pipeline.models import load_policy, load_tokenizer
    from stages.generate import sample_pairs

    config = ctx.config
    tokenizer = load_tokenizer(config.model, ctx.init.base)
    log(f"{NAME}: sampling {config.preferences.sampling.num_responses} responses for each of {len(prompts)} "
        f"prompts from {ctx.init.description}")
    model = load_policy(ctx.init.base, ctx.init.adapter, config.model, tokenizer)
    sampled = sample_pairs(model, tokenizer, prompts, config.preferences.sampling, config.seed,
                           ctx.stage_dir / "samples.jsonl")
    return sampled.pairs, {"preferences/sampled_responses": sampled.responses,
                           "preferences/truncated_responses": sampled.truncated,
                           "preferences/identical_pairs_skipped": sampled.identical}


def _label(ctx: StageContext, pairs: list[Pair], store: LabelStore) -> None:
    """Put every unlabelled pair to the judge, storing each label as it is given."""
    from reward.build import label_pairs

    judge_cfg = ctx.config.preferences.judge
    if judge_cfg.type == "human":
        _label_by_people(ctx, pairs, store)
        return
    label_pairs(judge_cfg, ctx.config, ctx.run_dir, pairs, store, NAME)


def _judges_in_processes(config: RunConfig) -> bool:
    """With distributed launching, the llm judge (the one judge whose model may need sharding) runs in the launched
    processes; sampling the candidates, and every other judge, stay in the runner's process."""
    return config.distributed.enabled and config.preferences.judge.type == "llm"


def label_launched(ctx: StageContext) -> None:
    """In each process `accelerate launch` started: the llm judge on the pairs (pairs.jsonl) it has not labelled
    yet, shared by the processes; the main process stores each label as soon as both orders are read, so a kill
    loses none."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from reward.build import build_judge, labels_path
    from reward.importers import load_pairs

    state = PartialState()
    pairs = load_pairs(ctx.stage_dir / "pairs.jsonl")
    store = LabelStore(labels_path(ctx.config, ctx.run_dir)) if is_main_process() else None
    # What is left to label, as the one process that reads and writes the label file sees it.
    left = [[pair.id for pair in pairs if not store.is_labelled(pair.id)] if store is not None else None]
    broadcast_object_list(left)
    left = set(left[0])
    todo = [pair for pair in pairs if pair.id in left]
    log(f"{NAME}: {len(pairs) - len(todo)} of {len(pairs)} pairs already labelled by this judge; {len(todo)} to "
        f"label in {state.num_processes} processes")
    judge = build_judge(ctx.config.preferences.judge, ctx.config, ctx.run_dir,
                        store.add if store is not None else None)
    judge.model = _on_processes(ctx, judge.model)
    try:
        judge.judge_in_processes(todo)
    finally:
        if store is not None:
            store.close()


def _on_processes(ctx: StageContext, model):
    """The judge model on this process's device: under ZeRO-3 sharded over the processes (TRL's prepare_deepspeed,
    which TRL uses for its reference models), otherwise a whole copy in each."""
    from accelerate import Accelerator, PartialState

    from pipeline.distributed import deepspeed_plugin

    plugin = deepspeed_plugin(ctx.config.distributed, ctx.config.preferences.judge.batch_size,
                              model.config.hidden_size)
    if plugin is None:
        return model.to(PartialState().device)
    from trl.models.utils import prepare_deepspeed

    return prepare_deepspeed(model, Accelerator(deepspeed_plugin=plugin))


def _label_by_people(ctx: StageContext, pairs: list[Pair], store: LabelStore) -> None:
    """Wait for people: in a terminal, ask about the pairs still waiting; otherwise stop, saying how to label."""
    from reward.annotators import consensus, read_votes, settled_for
    from reward.build import HUMAN

    judge = ctx.config.preferences.judge
    resume = f"python -m pipeline label --run-dir {ctx.run_dir}"
    waiting = consensus(pairs, read_votes(ctx.run_dir), judge.overlap, judge.disagreement).pending
    log(f"{NAME}: {len(pairs)} pairs, {len(pairs) - len(waiting)} settled by people's labels, {len(waiting)} waiting")
    if not waiting:
        return
    if not sys.stdin.isatty():
        raise AwaitingLabels(f"{len(waiting)} pairs wait for people's labels: run `{resume}` (in the terminal) or "
                             f"`{resume} --web` (a page for several annotators), then run the pipeline again (or "
                             "set preferences.judge.type to an AI judge)")
    from reward.interactive import label_interactively

    votes = read_votes(ctx.run_dir)
    label_interactively(pairs, store, settled=settled_for(HUMAN, pairs, votes, judge.overlap, judge.disagreement))
    waiting = consensus(pairs, read_votes(ctx.run_dir), judge.overlap, judge.disagreement).pending
    if waiting:
        raise AwaitingLabels(f"{len(waiting)} pairs still wait for labels (a pair in preferences.judge.overlap "
                             f"needs a second person); continue with `{resume}` or `{resume} --web`, then run the "
                             "pipeline again")


def _people(ctx: StageContext, pairs: list[Pair]) -> tuple[list, dict]:
    """One label per pair from people's votes (reward.annotators), and how far the annotators agree."""
    from reward.annotators import annotator_agreement, consensus, read_votes

    judge = ctx.config.preferences.judge
    votes = read_votes(ctx.run_dir)
    result = consensus(pairs, votes, judge.overlap, judge.disagreement)
    ids = {pair.id for pair in pairs}
    agreement = annotator_agreement({pid: by_name for pid, by_name in votes.items() if pid in ids})
    metrics = {"annotators/count": len({name for pid in ids for name in votes.get(pid, {})}),
               "annotators/dropped_disagreements": result.dropped}
    if agreement:
        write_json_atomic(ctx.final_dir / "annotators.json", {**agreement, "overlap": judge.overlap,
                                                             "disagreement": judge.disagreement})
        metrics.update({"annotators/shared_pairs": agreement["pairs"], "annotators/raw": agreement["raw"],
                        "annotators/kappa": agreement["kappa"]})
        kappa = agreement["kappa"]
        log(f"{NAME}: {len(agreement['annotators'])} annotators agree on {agreement['raw']:.1%} of the "
            f"{agreement['pairs']} pairs several labelled (Fleiss' kappa "
            f"{kappa if kappa is None else round(kappa, 3)})")
    if result.dropped:
        warn(f"{NAME}: {result.dropped} pairs whose annotators disagreed are left out "
             "(preferences.judge.disagreement: drop)")
    return result.labels, metrics


def _agreement(ctx: StageContext, pairs: list[Pair], labels: list) -> dict:
    from reward.agreement import agreement, judge_reliability
    from reward.judges import HumanFileJudge

    reference = HumanFileJudge(ctx.config.preferences.compare_with).judge(pairs)
    if not reference:
        warn(f"{NAME}: compare_with labels none of these pairs; no agreement to report")
        return {}
    result = agreement(labels, reference)
    # Does the judge's confidence come true against the reference? (Only judges that give one.)
    calibration = judge_reliability(labels, reference)
    write_json_atomic(ctx.final_dir / "agreement.json", {
        **result.to_dict(), "calibration": calibration[0] if calibration else None,
        "ece": calibration[1] if calibration else None})
    log(f"{NAME}: agreement with {ctx.config.preferences.compare_with} on {result.pairs} pairs: "
        f"{result.raw:.1%} (Cohen's kappa {result.kappa if result.kappa is None else round(result.kappa, 3)})"
        + (f", expected calibration error {calibration[1]:.3f}" if calibration else ""))
    metrics = {"agreement/pairs": result.pairs, "agreement/raw": result.raw, "agreement/kappa": result.kappa,
               "agreement/reference_tie_rate": result.tie_rates[1]}
    if calibration:
        metrics["agreement/ece"] = calibration[1]
    return metrics


def run(ctx: StageContext) -> StageResult:
    from reward.build import labels_path
    from reward.importers import load_pairs, load_prompts

    prefs = ctx.config.preferences
    metrics = {}
    # 1. The pairs to judge.
    pairs = load_pairs(prefs.pairs) if prefs.pairs else []
    if prefs.prompts:
        prompts = load_prompts(prefs.prompts)[: prefs.max_prompts]
        sampled, sample_metrics = _sampled_pairs(ctx, prompts)
        pairs += sampled
        metrics.update(sample_metrics)
    unique = list({pair.id: pair for pair in pairs}.values())
    if len(unique) < len(pairs):
        warn(f"{NAME}: {len(pairs) - len(unique)} pairs appear twice; each is judged once")
    pairs = unique
    if not pairs:
        raise PipelineError(f"{NAME}: there are no pairs to judge")
    write_pairs(ctx.stage_dir / "pairs.jsonl", pairs)

    # 2. Labels, kept per judge across re-runs.
    in_processes = _judges_in_processes(ctx.config)
    if in_processes:
        log(f"{NAME}: the llm judge runs in the launched processes; they store its labels")
        ctx.launcher(ctx, entry="stages.preferences:label_launched")
    with LabelStore(labels_path(ctx.config, ctx.run_dir)) as store:
        labels_file = str(store.path)
        if not in_processes:
            _label(ctx, pairs, store)
        labels = [store.get(pair.id) for pair in pairs if store.is_labelled(pair.id)]
    ctx.final_dir.mkdir(parents=True, exist_ok=True)
    if prefs.judge.type == "human":  # people's votes, the terminal's among them, become one label per pair
        labels, people_metrics = _people(ctx, pairs)
        metrics.update(people_metrics)

    # 3. Chosen/rejected rows, counts, agreement.
    rows, counts = preference_rows(pairs, labels)
    if counts.unlabelled:
        warn(f"{NAME}: {counts.unlabelled} of {len(pairs)} pairs have no label (the judge could not decide); "
             "they are left out of the preference data and asked again if the stage runs again")
    if not rows:
        warn(f"{NAME}: no pair got a winner ({counts.ties} ties, {counts.unlabelled} unlabelled): a judge that "
             "answers by position ties on every pair; there is nothing for rm or dpo to train on")
    write_preferences(ctx.final_dir / "preferences.jsonl", rows)
    metrics.update({
        "preferences/pairs": len(pairs), "preferences/labelled": len(labels), "preferences/rows": counts.rows,
        "preferences/ties": counts.ties, "preferences/unlabelled": counts.unlabelled,
        **{f"preferences/{key}": value for key, value in label_stats(labels).items()},
    })
    if prefs.compare_with:
        metrics.update(_agreement(ctx, pairs, labels))
    log(f"{NAME}: {counts.rows} preference rows ({counts.ties} ties, {counts.unlabelled} unlabelled) in "
        f"{ctx.final_dir / 'preferences.jsonl'}")
    return StageResult(metrics, {"labels_file": labels_file})
