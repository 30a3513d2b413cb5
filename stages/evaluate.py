"""After a policy stage (dpo, kto, orpo, simpo, ppo): the new policy against the one it started from, on held-out
prompts (`evaluation:`).

1. Sample one response per prompt from each policy (seeded, resumable: stages/generate.py). The starting policy's
   responses are sampled once per run and shared by every stage that starts from it (start_samples_file).
2. Win rate: the configured judge (default: this run's reward model), and each of `evaluation.judges`, compares
   each new response with the starting policy's response to the same prompt; a tie counts half; 95% Wilson interval.
3. KL to the start: the mean over the new policy's own responses of sum_t log pi_new(y_t) - log pi_start(y_t), a
   Monte-Carlo estimate of KL(pi_new || pi_start) per response.
4. A held-out measure never trained on (`evaluation.measure`, e.g. how often answers are specific), before and after,
   and how many responses repeat themselves (stages.metrics.is_degenerate), before and after.

The runner runs this on the saved result once the stage has returned (compare_saved), the same with or without
DeepSpeed; it also answers sft's held-out prompts there (answer_references). With an adapter, the starting policy is
the base the adapter was trained on, which is exactly what dpo and ppo were held to. Samples go to
<stage>/eval_samples.jsonl for reading.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pipeline.config import SamplingConfig, evaluation_judges
from pipeline.context import StageContext
from pipeline.log import log, track
from pipeline.render import prompt_ids, response_ids
from reward.pairs import Pair
from stages.metrics import is_degenerate, wilson_interval


@torch.inference_mode()
def response_logprobs(model, tokenizer, prompts: list[list[dict]], responses: list[str],
                      batch_size: int = 8) -> list[float]:
    """sum_t log p(response token t | prompt, earlier tokens) for each (prompt, response), end-of-turn included."""
    totals = []
    for start in track(range(0, len(prompts), batch_size), "log-probabilities of the responses"):
        rows = []
        for prompt, response in zip(prompts[start:start + batch_size], responses[start:start + batch_size]):
            context = prompt_ids(tokenizer, prompt)
            full = response_ids(tokenizer, prompt, response)
            rows.append((full, len(context)))
        width = max(len(full) for full, _ in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (full, _) in enumerate(rows):
            input_ids[i, :len(full)] = torch.tensor(full)
            attention[i, :len(full)] = 1
        device = next(model.parameters()).device
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None].to(device))[..., 0]
        for i, (full, context) in enumerate(rows):
            # Position j predicts token j + 1: the response tokens are context .. len(full) - 1.
            totals.append(logprobs[i, context - 1:len(full) - 1].sum().item())
    return totals


def _sampling(ctx: StageContext) -> SamplingConfig:
    evaluation = ctx.config.evaluation
    return SamplingConfig(num_responses=1, max_new_tokens=evaluation.max_new_tokens,
                          temperature=evaluation.temperature, batch_size=evaluation.batch_size)


def _sample(model, tokenizer, prompts, ctx: StageContext, progress_file: Path) -> list[str]:
    from stages.generate import sample_responses

    samples = sample_responses(model, tokenizer, prompts, _sampling(ctx), ctx.config.seed, progress_file)
    return [responses[0] for responses in samples.responses]


def start_samples_file(ctx: StageContext, prompts: list[list[dict]]) -> Path:
    """Where the starting policy's responses to the evaluation prompts are kept. Every stage that starts from the
    same policy (dpo, ppo and the other policy stages all start from sft) and is evaluated on the same prompts with
    the same settings shares one file in the run directory: each is compared with the very same responses, and only
    the first samples them. The key holds everything the responses depend on, so a retrained start, other prompts
    or other settings sample afresh."""
    from pipeline.artifacts import hash_config, hash_path

    start = [str(ctx.init.base), hash_path(ctx.init.adapter) if ctx.init.adapter else None]
    key = hash_config({"start": start, "prompts": prompts, "sampling": dataclasses.asdict(_sampling(ctx)),
                       "seed": ctx.config.seed, "model": dataclasses.asdict(ctx.config.model)})
    folder = (ctx.run_dir or ctx.stage_dir) / "eval_start_samples"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.progress.jsonl"


def compare_with_start(ctx: StageContext, model, tokenizer, start) -> dict:
    """Metrics of the policy `model` against the policy `start` it started from."""
    from reward.build import build_judge
    from reward.importers import load_prompts
    from reward.judges import load_callable

    evaluation = ctx.config.evaluation
    if not evaluation.prompts:
        return {}
    loaded = load_prompts(evaluation.prompts)[: evaluation.max_prompts]
    prompts = [messages for messages, _ in loaded]
    model.eval()

    # 1. Responses from both policies.
    log(f"{ctx.name}: evaluating on {len(prompts)} held-out prompts from {evaluation.prompts}")
    new = _sample(model, tokenizer, prompts, ctx, ctx.stage_dir / "eval_policy_samples.progress.jsonl")
    old = _sample(start, tokenizer, prompts, ctx, start_samples_file(ctx, prompts))
    # 3. KL(new || start), estimated on the new policy's own responses.
    start_logp = response_logprobs(start, tokenizer, prompts, new, evaluation.batch_size)
    new_logp = response_logprobs(model, tokenizer, prompts, new, evaluation.batch_size)
    kl = sum(n - s for n, s in zip(new_logp, start_logp)) / len(prompts)

    # 2. Win rate of the new response (shown as a) over the starting policy's (b), under every judge: eval/ for
    #    evaluation.judge, eval/<type>/ for each of evaluation.judges.
    pairs = [Pair.create(p, a, b, source) for p, a, b, (_, source) in zip(prompts, new, old, loaded)]
    metrics, names = {}, []
    for index, judge_cfg in enumerate(evaluation_judges(ctx.config)):
        judge = build_judge(judge_cfg, ctx.config, ctx.run_dir)
        labels = {label.pair_id: label.winner for label in judge.judge(pairs)}
        judged_winners = [labels.get(pair.id) for pair in pairs]
        if index == 0:
            prefix, winners = "eval/", judged_winners
        else:  # named by type, numbered when a type comes twice: eval/contrastive/, eval/contrastive2/
            same = sum(other.type == judge_cfg.type for other in ctx.config.evaluation.judges[:index - 1])
            prefix = f"eval/{judge_cfg.type}{same + 1 if same else ''}/"
        metrics.update(win_rate(judged_winners, prefix))
        names.append(judge.name)
    metrics.update({
        "eval/kl_to_start": kl,
        "eval/response_words_before": sum(len(r.split()) for r in old) / len(old),
        "eval/response_words_after": sum(len(r.split()) for r in new) / len(new),
        # Repeated n-grams: the loops a policy falls into when it hacks its reward.
        "eval/degenerate_before": sum(map(is_degenerate, old)) / len(old),
        "eval/degenerate_after": sum(map(is_degenerate, new)) / len(new),
    })
    wins, ties, losses = metrics["eval/wins"], metrics["eval/ties"], metrics["eval/losses"]
    # 4. The held-out measure.
    scores_old = scores_new = [None] * len(prompts)
    if evaluation.measure:
        measure = load_callable(evaluation.measure)
        scores_old = [float(measure(p, r)) for p, r in zip(prompts, old)]
        scores_new = [float(measure(p, r)) for p, r in zip(prompts, new)]
        metrics["eval/measure_before"] = sum(scores_old) / len(prompts)
        metrics["eval/measure_after"] = sum(scores_new) / len(prompts)
    samples = _write_samples(ctx.stage_dir / "eval_samples.jsonl", prompts, old, new, winners, scores_old, scores_new)
    ctx.tracker.log_table("eval/samples", list(samples[0]), [list(sample.values()) for sample in samples])
    log(f"{ctx.name}: win rate over the starting policy {_pct(metrics['eval/win_rate'])} "
        f"({wins} wins, {ties} ties, {losses} losses, judge {names[0]}); KL to it {kl:.3f} nats per response"
        + (f"; {evaluation.measure} {metrics['eval/measure_before']:.3f} → {metrics['eval/measure_after']:.3f}"
           if evaluation.measure else ""))
    return metrics


def win_rate(winners: list[str | None], prefix: str) -> dict:
    """Win rate (a tie counts half) with its 95% Wilson interval, and the counts; None marks an unjudged pair."""
    wins, ties, losses = winners.count("a"), winners.count("tie"), winners.count("b")
    judged = wins + ties + losses
    interval = wilson_interval(wins + ties / 2, judged)
    return {f"{prefix}win_rate": (wins + ties / 2) / judged if judged else None,
            f"{prefix}win_rate_low": interval[0] if interval else None,
            f"{prefix}win_rate_high": interval[1] if interval else None,
            f"{prefix}wins": wins, f"{prefix}ties": ties, f"{prefix}losses": losses,
            f"{prefix}unjudged": len(winners) - judged}


def answer_references(ctx: StageContext, base_model: Path, conversations: list) -> dict:
    """sft's held-out conversations answered by its saved policy (final/ on `base_model`): each conversation up to its
    last (assistant) turn is the prompt and that turn the reference; BLEU and ROUGE of the answers against the
    references."""
    from stages.metrics import text_overlap

    # A conversation with tools is left out: its prompt would need the tool definitions rendered with it.
    held_out = [c for c in conversations if not c.tools and not any("tool_calls" in m for m in c.messages)]
    held_out = held_out[: ctx.config.evaluation.max_references]
    if not held_out:
        return {}
    prompts = [list(c.messages[:-1]) for c in held_out]
    references = [c.messages[-1]["content"] for c in held_out]
    log(f"{ctx.name}: answering {len(prompts)} held-out prompts to compare with their reference answers")
    model, tokenizer = _saved_policy(ctx, base_model)
    answers = _sample(model, tokenizer, prompts, ctx, ctx.stage_dir / "eval_references_samples.progress.jsonl")
    overlap = text_overlap(answers, references)
    ctx.tracker.log_table("eval/samples", ["prompt", "reference", "answer"],
                          [[p[-1]["content"], r, a] for p, r, a in zip(prompts, references, answers)])
    log(f"{ctx.name}: against the reference answers BLEU {overlap['bleu']:.3f}, ROUGE-1 {overlap['rouge1']:.3f}, "
        f"ROUGE-L {overlap['rougeL']:.3f}")
    return {"eval/references": len(prompts), **{f"eval/{name}": value for name, value in overlap.items()}}


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _write_samples(path: Path, prompts, old, new, winners, scores_old, scores_new) -> list[dict]:
    samples = [{"prompt": prompt[-1]["content"], "start": before, "policy": after, "winner": winner,
                "measure_start": s_old, "measure_policy": s_new}
               for prompt, before, after, winner, s_old, s_new in zip(prompts, old, new, winners, scores_old, scores_new)]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
    return samples


def compare_saved(ctx: StageContext, base_model: Path) -> dict:
    """compare_with_start on a saved dpo or ppo result, loaded as a user would (final/ on `base_model`, the base it
    was trained on), against the policy the stage started from. The runner runs this once the stage has returned,
    in its own process, with or without DeepSpeed: sampling from a model sharded over processes is slow and
    hang-prone."""
    from pipeline.models import load_policy

    if not ctx.config.evaluation.prompts:
        return {}
    model, tokenizer = _saved_policy(ctx, base_model)
    if (ctx.final_dir / "adapter_config.json").exists():
        start = load_policy(base_model, None, ctx.config.model, tokenizer)  # the starting policy, merged in
    else:
        start = load_policy(ctx.init.base, ctx.init.adapter, ctx.config.model, tokenizer)
    return compare_with_start(ctx, model, tokenizer, start)


def _saved_policy(ctx: StageContext, base_model: Path):
    """(model, tokenizer) of a stage's final/: an adapter on `base_model`, or a whole model."""
    import gc

    from pipeline.models import load_policy, load_tokenizer

    gc.collect()  # the trainer that just returned holds its model in reference cycles: free it before loading more
    tokenizer = load_tokenizer(ctx.config.model, ctx.final_dir)
    if (ctx.final_dir / "adapter_config.json").exists():
        return load_policy(base_model, ctx.final_dir, ctx.config.model, tokenizer), tokenizer
    return load_policy(ctx.final_dir, None, ctx.config.model, tokenizer), tokenizer
