"""Stage iterative_dpo: online RLAIF in rounds. Each round

1. samples `sampling.num_responses` responses from the current policy for the round's prompts (the next
   `prompts_per_round` of the file, wrapping around), seeded by the run's seed and the round; every two different
   responses to a prompt make a pair;
2. labels the pairs with `judge`, any AI judge (a person cannot label pairs that exist only while the stage runs);
   each label is on disk as soon as it is given;
3. writes the labelled pairs as chosen/rejected rows, round_N/pairs.jsonl (the preferences stage's format, which rm
   and dpo read), holding out `eval_split` of the prompts;
4. trains DPO on them (TRL's DPOTrainer through stages.hf_trainer, as the dpo stage), from the policy the round
   before trained, checkpointing in round_N/checkpoints/;
5. with `win_rate_prompts`, asks the judge how often the new policy beats the start on held-out prompts;
and writes round_N/round.json, which marks the round finished: it is never redone and its files never touched again.

The policy is one LoRA adapter that every round continues, on the starting weights (sft's adapter merged in, at
<stage>/base, as dpo keeps them). So final/ (the last round's adapter) is exactly what dpo leaves, which the runner,
the evaluation and later stages load as they load dpo's, every round's policy is a small adapter on one set of
weights, and no round writes a whole model. Merging each round's adapter into the weights instead would give each
round a fresh rank budget, at the price of a full copy of the weights per round. With peft.method full, each round
trains the whole model the round before saved.

The DPO reference (`reference`):
- previous (default): the policy the round starts from. Each round is one DPO problem anchored where the last one
  ended, as in SPIN (Chen et al. 2024) and Self-Rewarding LMs (Yuan et al. 2024), whose every iteration is
  initialised from the one before. TRL keeps a frozen copy of the continued adapter as the reference: no second copy
  of the weights.
- start: the policy round 1 started from, in every round, as in the KL-regularised objective of Xiong et al. 2024
  (online iterative DPO under a KL constraint to the initial policy): however many rounds run, the policy is held
  to one place. From round 2 on this holds a frozen copy of the starting weights beside the policy.

A kill anywhere resumes the unfinished round where it stopped: its samples batch by batch (stages/generate.py), its
labels pair by pair (reward.pairs.LabelStore), its training from the newest complete checkpoint, which the runner
finds in the unfinished round's checkpoints/ (pipeline.artifacts.current_checkpoints_dir); every step is seeded, so
the run ends with the weights an uninterrupted one has.

Layout: base/ (the starting weights with sft's adapter merged in, when it started from an adapter), round_N/
{samples.jsonl, labels.jsonl, pairs.jsonl, checkpoints/, final/, metrics.jsonl, win_samples.jsonl, win_labels.jsonl,
round.json}, win_start_samples.jsonl (the start's answers the win rates compare with), final/ (the last round's
policy), stage.json.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
from pathlib import Path

from pipeline.artifacts import ROUND_DONE, read_json, round_finished, write_json_atomic
from pipeline.config import RunConfig
from pipeline.context import StageContext, StageResult
from pipeline.errors import ConfigError, PipelineError
from pipeline.log import log, warn
from stages import hf_trainer, preference_opt

NAME = "iterative_dpo"
ROUND_SEED = 1_000_000  # round k samples with seed + k * ROUND_SEED (+ the batch index, below a million)


def uses_model(config: RunConfig) -> bool:
    return True


def data_files(config: RunConfig) -> dict:
    section = config.iterative_dpo
    files = {"prompts": section.prompts}
    if section.win_rate_prompts:
        files["win_rate_prompts"] = config.evaluation.prompts
    return {key: path for key, path in files.items() if path}


def check(config: RunConfig) -> str:
    """The prompts parse, the judge can be built, the trainer keys make a DPOConfig; nothing is loaded."""
    from reward.build import check_judge
    from reward.importers import load_prompts

    section = config.iterative_dpo
    if config.distributed.enabled:
        raise ConfigError(f"{NAME} trains in the runner's own process: run it with distributed.num_processes=1, "
                          "num_machines=1 and no distributed.deepspeed (--set distributed.deepspeed=)")
    if config.peft.method not in ("lora", "full"):
        raise ConfigError(f"{NAME} with peft.method={config.peft.method}: the policy continues one LoRA adapter "
                          "from round to round, or trains every weight (full)")
    if not section.prompts:
        raise ConfigError(f"{NAME}.prompts (a prompts file to sample each round's pairs for) is not set")
    prompts = load_prompts(section.prompts)
    if section.prompts_per_round and section.prompts_per_round > len(prompts):
        raise ConfigError(f"{NAME}.prompts_per_round is {section.prompts_per_round}, but {section.prompts} holds "
                          f"{len(prompts)} prompts")
    if section.win_rate_prompts and not config.evaluation.prompts:
        raise ConfigError(f"{NAME}.win_rate_prompts compares each round's policy with the start on "
                          "evaluation.prompts, which is not set (set it, or iterative_dpo.win_rate_prompts=0)")
    if section.win_rate_prompts and section.win_rate_prompts > len(load_prompts(config.evaluation.prompts)):
        raise ConfigError(f"{NAME}.win_rate_prompts is {section.win_rate_prompts}, but evaluation.prompts holds "
                          "fewer prompts")
    judge = section.judge
    check_judge(judge, config, f"{NAME}.judge")
    hf_trainer.check_trainer_keys(config, NAME)
    per_round = section.prompts_per_round or len(prompts)
    return (f"{section.rounds} rounds of {per_round} prompts x {section.sampling.num_responses} samples, judge "
            f"{judge.type}, reference {section.reference}")


def round_prompts(prompts: list, per_round: int | None, k: int) -> list:
    """Round k's prompts (k from 1): the next `per_round` of the file after round k-1's, wrapping at its end."""
    if not per_round:
        return list(prompts)
    start = (k - 1) * per_round
    return [prompts[(start + i) % len(prompts)] for i in range(per_round)]


def _weights_dir(ctx: StageContext) -> Path:
    """The starting weights, with the start's own adapter merged in (dpo's base): what every round's LoRA adapter sits
    on, and under full fine-tuning the start the evaluation compares with."""
    return ctx.stage_dir / "base" if ctx.init.adapter is not None else ctx.init.base


def _policy(ctx: StageContext, k: int) -> tuple[Path, Path | None]:
    """(weights, adapter) of the policy after round k; k = 0 is the start."""
    if k == 0:
        return ctx.init.base, ctx.init.adapter
    final = ctx.stage_dir / f"round_{k}" / "final"
    if ctx.config.peft.method == "full":
        return final, None
    return _weights_dir(ctx), final


def _sample(ctx: StageContext, k: int, prompts: list, sampling, seed: int, progress_file: Path):
    """Pairs (or, with num_responses 1, single answers) from policy k; the model is freed on return."""
    from pipeline.models import load_policy, load_tokenizer
    from stages.generate import sample_pairs, sample_responses

    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    model = load_policy(*_policy(ctx, k), ctx.config.model, tokenizer)
    if sampling.num_responses == 1:
        return [r[0] for r in sample_responses(model, tokenizer, [p for p, _ in prompts], sampling, seed,
                                               progress_file).responses]
    return sample_pairs(model, tokenizer, prompts, sampling, seed, progress_file)


def _models(ctx: StageContext, k: int, tokenizer):
    """(the model round k trains, its reference model or None, the weights final/ applies to)."""
    from peft import PeftModel

    from pipeline.models import load_causal_lm

    reference = ctx.config.iterative_dpo.reference
    if k == 1:
        # The start itself, as dpo trains it: a fresh adapter (whose frozen copy, TRL's reference, is the start) or
        # the whole model.
        model, weights, extra = preference_opt.policy(ctx, tokenizer, reference=True)
        if "peft_config" in extra:
            # Wrapped here rather than by TRL: later rounds hand the trainer a PeftModel too (the round before's adapter).
            from peft import get_peft_model

            model = get_peft_model(model, extra["peft_config"])
        # Under full fine-tuning the reference is given (the merged start), not left to TRL, which would load it from
        # the model's config, the base it was first read from.
        return model, extra.get("ref_model"), weights
    previous = ctx.stage_dir / f"round_{k - 1}" / "final"
    weights = _weights_dir(ctx)
    if ctx.config.peft.method == "full":
        model = load_causal_lm(previous, ctx.config.model, tokenizer)
        ref = load_causal_lm(weights if reference == "start" else previous, ctx.config.model, tokenizer)
        return model, ref, weights
    model = PeftModel.from_pretrained(load_causal_lm(weights, ctx.config.model, tokenizer), previous,
                                      is_trainable=True)
    # reference: previous needs nothing: TRL freezes a copy of the adapter as it enters the round.
    ref = load_causal_lm(weights, ctx.config.model, tokenizer) if reference == "start" else None
    return model, ref, weights


def _train_rewards(trainer) -> dict:
    """TRL's implicit-reward accuracy and margin on the round's training batches, averaged over its logged steps
    (from the log a checkpoint carries, so a resumed round reports the same)."""
    logged = [entry for entry in trainer.state.log_history if "rewards/accuracies" in entry and "loss" in entry]
    if not logged:
        return {}
    return {"dpo/train_accuracy": sum(e["rewards/accuracies"] for e in logged) / len(logged),
            "dpo/train_margin": sum(e["rewards/margins"] for e in logged) / len(logged)}


def _train(ctx: StageContext, k: int, round_dir: Path, rows: list) -> dict:
    """DPO on round k's rows, from the policy of round k-1, checkpointed in round_dir; final/ there."""
    from datasets import Dataset
    from trl import DPOTrainer

    from pipeline.models import load_tokenizer
    from stages.preference_data import split_by_prompt

    section = ctx.config.iterative_dpo
    train_rows, eval_rows = split_by_prompt(rows, section.eval_split, ctx.config.seed + k)
    tokenizer = load_tokenizer(ctx.config.model, ctx.init.base)
    limit = hf_trainer.max_length(NAME, section.trainer)
    train, dropped_train = preference_opt.pair_rows(tokenizer, train_rows, limit)
    held_out, dropped_eval = preference_opt.pair_rows(tokenizer, eval_rows, limit)
    if dropped_train + dropped_eval:
        warn(f"{NAME} round {k}: {dropped_train + dropped_eval} pairs are longer than max_length={limit} tokens and "
             "were left out")
    if not train:
        raise PipelineError(f"{NAME} round {k}: no decided pair to train on fits in max_length={limit}")
    resume = ctx.resume_from if ctx.resume_from and ctx.resume_from.parent == round_dir / "checkpoints" else None
    round_ctx = dataclasses.replace(ctx, stage_dir=round_dir, resume_from=resume)
    model, ref_model, weights = _models(ctx, k, tokenizer)
    log(f"{NAME} round {k}: DPO on {len(train)} pairs ({len(held_out)} held out), reference: "
        f"{'the start' if section.reference == 'start' or k == 1 else f'round {k - 1} policy'}")

    def after(trainer) -> dict:
        return {**_train_rewards(trainer), **(preference_opt.held_out_metrics("dpo", trainer) if held_out else {})}

    result = hf_trainer.fit(round_ctx, DPOTrainer, model, tokenizer, weights, Dataset.from_list(train),
                            Dataset.from_list(held_out) if held_out else None, ref_model=ref_model,
                            trainer_evaluates=bool(held_out), after=after)
    del model, ref_model
    gc.collect()  # the trainer holds the models in reference cycles: free them before the next model loads
    return {"data/train_pairs": len(train), "data/eval_pairs": len(held_out),
            "data/dropped_too_long": dropped_train + dropped_eval, **result.metrics}


def _win_rate(ctx: StageContext, k: int, round_dir: Path) -> dict:
    """The judge's verdicts on round k's policy against the start, one sampled answer each on held-out prompts."""
    from reward.build import label_pairs
    from reward.importers import load_prompts
    from reward.pairs import LabelStore, Pair
    from stages.evaluate import win_rate

    section, config = ctx.config.iterative_dpo, ctx.config
    prompts = load_prompts(config.evaluation.prompts)[: section.win_rate_prompts]
    sampling = dataclasses.replace(section.sampling, num_responses=1)
    # The same seed for both policies: their answers differ by the policy alone, not by the draw.
    start = _sample(ctx, 0, prompts, sampling, config.seed, ctx.stage_dir / "win_start_samples.jsonl")
    new = _sample(ctx, k, prompts, sampling, config.seed, round_dir / "win_samples.jsonl")
    gc.collect()
    pairs = [Pair.create(p, a, b, source) for (p, source), a, b in zip(prompts, new, start)]
    with LabelStore(round_dir / "win_labels.jsonl") as store:
        label_pairs(section.judge, config, ctx.run_dir, pairs, store, f"{NAME} round {k} (win rate)")
        winners = [store.get(pair.id).winner if store.is_labelled(pair.id) else None for pair in pairs]
    result = win_rate(winners, "win/")
    log(f"{NAME} round {k}: the judge prefers it to the start on {result['win/win_rate']:.1%} of "
        f"{len(pairs)} held-out prompts ({result['win/wins']} wins, {result['win/ties']} ties)")
    return result


def _round(ctx: StageContext, k: int, prompts: list) -> dict:
    """One round, from what earlier attempts at it left; its metrics."""
    from reward.build import label_pairs
    from reward.pairs import LabelStore, label_stats, preference_rows, write_preferences

    section, config = ctx.config.iterative_dpo, ctx.config
    round_dir = ctx.stage_dir / f"round_{k}"
    round_dir.mkdir(parents=True, exist_ok=True)
    chosen = round_prompts(prompts, section.prompts_per_round, k)

    # 1. Pairs from the policy round k-1 trained.
    log(f"{NAME} round {k}: sampling {section.sampling.num_responses} responses for each of {len(chosen)} prompts")
    sampled = _sample(ctx, k - 1, chosen, section.sampling, config.seed + k * ROUND_SEED, round_dir / "samples.jsonl")
    gc.collect()
    pairs = list({pair.id: pair for pair in sampled.pairs}.values())

    # 2. Labels, each stored as it is given.
    with LabelStore(round_dir / "labels.jsonl") as store:
        label_pairs(section.judge, config, ctx.run_dir, pairs, store, f"{NAME} round {k}")
        labels = [store.get(pair.id) for pair in pairs if store.is_labelled(pair.id)]

    # 3. The labelled pairs, as the rest of the pipeline reads preferences.
    rows, counts = preference_rows(pairs, labels)
    write_preferences(round_dir / "pairs.jsonl", rows)
    metrics = {"round": k, "prompts": len(chosen), "pairs/sampled_responses": sampled.responses,
               "pairs/truncated_responses": sampled.truncated, "pairs/identical_skipped": sampled.identical,
               "pairs/judged": len(pairs), "pairs/decided": counts.rows, "pairs/ties": counts.ties,
               "pairs/unlabelled": counts.unlabelled,
               **{f"judge/{key}": value for key, value in label_stats(labels).items()}}
    log(f"{NAME} round {k}: {counts.rows} decided pairs, {counts.ties} ties, {counts.unlabelled} unlabelled, in "
        f"{round_dir / 'pairs.jsonl'}")
    if not rows:
        raise PipelineError(f"{NAME} round {k}: the judge decided none of the {len(pairs)} pairs ({counts.ties} ties, "
                            f"{counts.unlabelled} unlabelled; {sampled.identical} pairs of identical responses "
                            "skipped): nothing to train on. Sample more varied responses (sampling.temperature, "
                            "num_responses) or use a judge that tells these responses apart")

    # 4. DPO from the policy of round k-1.
    metrics.update(_train(ctx, k, round_dir, rows))

    # 5. How the judge sees the new policy against the start.
    if section.win_rate_prompts:
        metrics.update(_win_rate(ctx, k, round_dir))
    return metrics


def run(ctx: StageContext) -> StageResult:
    from reward.importers import load_prompts

    section = ctx.config.iterative_dpo
    prompts = load_prompts(section.prompts)
    rounds = []
    for k in range(1, section.rounds + 1):
        round_dir = ctx.stage_dir / f"round_{k}"
        if round_finished(round_dir):
            log(f"{NAME}: round {k} of {section.rounds} finished in an earlier attempt; kept as it is")
            rounds.append(read_json(round_dir / ROUND_DONE))
            continue
        metrics = _round(ctx, k, prompts)
        write_json_atomic(round_dir / ROUND_DONE, metrics)  # last: only now is the round finished
        rounds.append(metrics)
        # Against the training steps of all rounds so far (each round's trainer counts its own from 1).
        steps = sum(r.get("train/steps", 0) for r in rounds)
        ctx.tracker.log({f"rounds/{key}": value for key, value in metrics.items()}, step=steps)

    # The last round's policy is the stage's result, in final/ as dpo's (hard links: a finished round never changes).
    last = ctx.stage_dir / f"round_{section.rounds}" / "final"
    hf_trainer.save_atomic(lambda out: shutil.copytree(last, out, copy_function=os.link), ctx.final_dir)
    return StageResult(summary(rounds), {"base_model": str(_weights_dir(ctx))})


def summary(rounds: list[dict]) -> dict:
    """The stage's metrics: the last round's training and held-out numbers under their dpo names (so the headline
    and the report read them as dpo's), and totals over the rounds."""
    last = rounds[-1]
    metrics = {key: value for key, value in last.items() if key.startswith(("dpo/", "eval/", "train/loss"))}
    metrics.update({
        "rounds/count": len(rounds), "train/steps": sum(r.get("train/steps", 0) for r in rounds),
        "rounds/decided_pairs": sum(r["pairs/decided"] for r in rounds),
        "rounds/ties": sum(r["pairs/ties"] for r in rounds),
    })
    rates = [r["win/win_rate"] for r in rounds if r.get("win/win_rate") is not None]
    if rates:
        metrics.update({"rounds/win_rate_first": rates[0], "rounds/win_rate_last": rates[-1]})
    return metrics


def evaluate_saved(ctx: StageContext, result: StageResult) -> dict:
    """The final policy against the one round 1 started from, on evaluation.prompts (as dpo's)."""
    from stages.evaluate import compare_saved

    return compare_saved(ctx, Path(result.manifest["base_model"]))
