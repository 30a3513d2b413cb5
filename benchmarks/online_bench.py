"""Benchmark the online RL stages side by side: our ppo against the grpo and rloo stages (TRL's GRPOTrainer and
RLOOTrainer), in generated tokens per second and peak memory.

    PIPELINE_CACHE_DIR=/tmp/pc python benchmarks/online_bench.py [--model NAME] [--steps N] [--max-new-tokens T]

Every run is a fresh subprocess with a fresh run directory: `python -m pipeline run --config configs/demo.yaml
--stage <stage>` with --set overrides that give the three stages the same model, LoRA, prompts file, reward rule,
responses per step, max new tokens, temperature, learning rate, KL coefficient and update schedule (one optimiser
step per batch of responses). Peak memory is each child's own peak RSS (and, on CUDA, its peak allocated memory).
The runs of a repeat are back to back, their order rotated every repeat; the table shows medians and each ratio is
the median of the per-repeat ratios. Always exits 0: this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from rich.table import Table

# The other benches' environment, console, statistics and child runner, so all of them measure the same way.
# Imported first: it puts the checkout on sys.path.
from ppo_bench import IMPORTS_ONLY, _list, pipeline_cmd, ppo_throughput, run_child
from sft_bench import ENV, ROOT, _load, console, median, paired_ratio

PROMPTS = "data/preferences/prompts.jsonl"
REWARD = "reward.rules:specificity"
STAGES = ("ppo", "grpo", "rloo")


def overrides(args) -> dict[str, list[str]]:
    """--set overrides per stage: configs/demo.yaml's model dtype and LoRA, from the base model, `responses` responses
    per step of at most `max_new_tokens` tokens at temperature 1, the same rule as the reward, learning rate and KL
    coefficient, one optimiser step per batch of responses, no held-out evaluation (only training is measured), no
    checkpoint inside the run, no tracker."""
    common = [f"model.name_or_path={args.model}", "tracking.report_to=[]", "evaluation.prompts="]
    sets = {"ppo": [
        f"ppo.trainer.rollout_batch_size={args.responses}", f"ppo.trainer.mini_batch_size={args.responses}",
        "ppo.trainer.num_ppo_epochs=1", f"ppo.trainer.max_new_tokens={args.max_new_tokens}",
        f"ppo.trainer.kl_coef={args.kl}", f"ppo.trainer.learning_rate={args.learning_rate}",
        "ppo.trainer.missing_eos_penalty=",  # the rule alone is the reward, as on the TRL side
        f"ppo.trainer.max_steps={args.steps}", f"ppo.trainer.save_steps={args.steps}", "ppo.trainer.logging_steps=1",
    ]}
    for stage in ("grpo", "rloo"):
        sets[stage] = [
            f"{stage}.trainer.per_device_train_batch_size={args.responses}",
            f"{stage}.trainer.num_generations={args.generations}",
            f"{stage}.trainer.max_completion_length={args.max_new_tokens}", f"{stage}.trainer.beta={args.kl}",
            # ppo's learning rate is constant; TRL's decays linearly by default
            f"{stage}.trainer.learning_rate={args.learning_rate}", f"{stage}.trainer.lr_scheduler_type=constant",
            f"{stage}.trainer.max_steps={args.steps}", f"{stage}.trainer.save_steps={args.steps}",
            f"{stage}.trainer.logging_steps=1",
        ]
    for stage in STAGES:
        sets[stage] += [f"{stage}.init_from=base", f"{stage}.data.train={ROOT / PROMPTS}", f"{stage}.data.eval_split=0",
                        f"{stage}.reward.type=rule", f"{stage}.reward.function={REWARD}", *common]
    return sets


def trl_throughput(metrics_file: Path, responses: int) -> dict:
    """Generated tokens and seconds over the steps in <run>/<stage>/metrics.jsonl (logging_steps=1): tokens =
    completions/mean_length (through the first end-of-turn token, as ppo counts) x responses; seconds = TRL's
    step_time, the time of the step's training_step (sampling, scoring, reference and policy passes, backward), the
    window ppo's ppo/tokens_per_s times less the optimiser step of the LoRA weights. train_runtime (the whole of
    trainer.train(): its setup, optimiser steps, logging and the final checkpoint too) is kept for the notes."""
    tokens, seconds, rates, runtime = 0.0, 0.0, [], None
    for line in metrics_file.read_text().splitlines():
        entry = json.loads(line)
        if "step_time" in entry and "completions/mean_length" in entry:
            step_tokens = entry["completions/mean_length"] * responses
            tokens += step_tokens
            seconds += entry["step_time"]
            rates.append(step_tokens / entry["step_time"])
        runtime = entry.get("train_runtime", runtime)
    return {"tokens": tokens, "seconds": seconds, "steps": len(rates), "rates": rates, "runtime": runtime}


def measure(stage: str, out: Path, work: Path, sets: dict, args) -> dict | None:
    log, cuda_file = work / f"{out.name}.log", work / f"{out.name}.cuda.json"
    result = run_child(pipeline_cmd(out, stage, sets[stage], cuda_file), log)
    if result is None:
        return None
    wall, peak = result
    metrics = out / stage / "metrics.jsonl"
    done = (ppo_throughput(metrics, args.responses) if stage == "ppo" else trl_throughput(metrics, args.responses))
    steps = done.get("iterations", done.get("steps"))
    note = (f"{done['tokens']:.0f} tok / {done['seconds']:.1f} s over {steps} steps (per-step tok/s "
            f"{_list(done['rates'])}), mean response {done['tokens'] / max(1, steps * args.responses):.1f} tok")
    if done.get("runtime"):
        note += f", train_runtime {done['runtime']:.1f} s ({done['tokens'] / done['runtime']:.1f} tok/s)"
    return {"rss": peak, "cuda": json.loads(cuda_file.read_text())["cuda_peak"],
            "rate": done["tokens"] / done["seconds"], "completions": steps * args.responses,
            "note": note + f", wall {wall:.1f} s"}


def bench(args, work: Path) -> tuple[list[dict], list[str]]:
    from pipeline.models import resolve_model_path

    resolve_model_path(args.model)  # materialise a built-in model once, outside every timed run
    sets = overrides(args)
    console.print(f"each stage: {args.steps} steps x {args.responses} responses of <= {args.max_new_tokens} tokens "
                  f"(grpo, rloo: {args.responses // args.generations} prompts x {args.generations}), one optimiser "
                  f"step per batch, KL coefficient {args.kl}, LoRA of configs/demo.yaml")
    baseline = run_child([sys.executable, "-c", IMPORTS_ONLY], work / "imports-only.log")
    runs = {stage: [] for stage in STAGES}
    for rep in range(args.repeats):
        order = STAGES[rep % 3:] + STAGES[:rep % 3]
        for stage in order:
            run = measure(stage, work / f"{stage}-{rep}", work, sets, args) or {}
            runs[stage].append(run)
            shown = "failed" if not run else f"{run['rss']:.0f} MiB, {run['rate']:.1f} tok/s"
            console.print(f"  rep {rep + 1}/{args.repeats} {stage:<5} {shown}{_load()}")

    def values(stage: str, key: str) -> list:
        return [run.get(key) for run in runs[stage]]  # None for a failed run keeps the repeats paired

    rows = []
    for stage in ("grpo", "rloo"):
        for what, key in (("generated tok/s", "rate"), ("peak RSS MiB", "rss")):
            ratio, _ = paired_ratio(values(stage, key), values("ppo", key))
            rows.append({"comparison": f"{what}, {stage} vs ppo", "ours": median(values(stage, key)),
                         "reference": median(values("ppo", key)), "ratio": ratio})
    notes = ["peak RSS MiB: " + ", ".join(f"{stage} {_list(values(stage, 'rss'), 0)}" for stage in STAGES)]
    if baseline:
        notes.append(f"a process that only imports the libraries and the pipeline peaks at {baseline[1]:.0f} MiB")
    if any(v is not None for stage in STAGES for v in values(stage, "cuda")):
        notes.append("peak CUDA allocated MiB: " + ", ".join(
            f"{stage} " + " ".join("n/a" if v is None else f"{v / 2**20:.0f}" for v in values(stage, "cuda"))
            for stage in STAGES))
    notes += [f"{stage}: " + "; ".join(run.get("note", "failed") for run in runs[stage]) for stage in STAGES]
    counts = {stage: sorted({run["completions"] for run in runs[stage] if run}) for stage in STAGES}
    notes.append("responses sampled per run: " + ", ".join(f"{stage} {counts[stage]}" for stage in STAGES))
    return rows, notes


def print_table(rows: list[dict], notes: list[str], args) -> None:
    table = Table(title=f"online RL benchmark: {args.model}, {args.steps} steps, median of {args.repeats}")
    for column in ("comparison", "trl stage", "ppo", "ratio"):
        table.add_column(column, justify="left" if column == "comparison" else "right")
    for row in rows:
        cells = ["n/a" if row[key] is None else f"{row[key]:.1f}" for key in ("ours", "reference")]
        table.add_row(row["comparison"], *cells, "n/a" if row["ratio"] is None else f"{row['ratio']:.3f}×")
    console.print(table)
    console.print("  medians over repeats; ratio: median of the per-repeat ratios (see sft_bench.paired_ratio)")
    for note in notes:
        console.print(f"  {note}", soft_wrap=True, markup=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="built-in model name or model dir (smollm2-135m-instruct, tiny-random-smollm2)")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps (ppo iterations) of each stage")
    parser.add_argument("--responses", type=int, default=8, help="responses sampled per step, on every side")
    parser.add_argument("--generations", type=int, default=2, help="grpo and rloo: responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest response, on every side")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--kl", type=float, default=0.05, help="ppo's kl_coef, grpo's and rloo's beta")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int,
                        help="OMP/MKL threads for every run (default: torch's own choice); 1 is steadier on a busy box")
    parser.add_argument("--keep", action="store_true", help="keep the run directories and logs")
    args = parser.parse_args()
    if args.responses % args.generations:
        parser.error("--responses must be a multiple of --generations (whole groups of responses to a prompt)")
    if args.threads:
        ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    work = Path(tempfile.mkdtemp(prefix="online-bench-"))
    console.print(f"[bold]online RL bench[/bold] ({work})")
    try:
        rows, notes = bench(args, work)
        print_table(rows, notes, args)
    except Exception as exc:  # a report, not a gate: say what broke and still exit 0
        console.print(f"[red]benchmark error:[/red] {exc!r}")
    finally:
        if args.keep:
            console.print(f"run directories and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
