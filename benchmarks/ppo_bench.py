"""Benchmark the ppo stage: its peak memory next to the sft stage's, its generation throughput next to TRL's RLOO.

    PIPELINE_CACHE_DIR=/tmp/pc python benchmarks/ppo_bench.py [--model NAME] [--steps N] [--max-new-tokens T]

Every run is a fresh subprocess with a fresh run directory: the pipeline's sft and ppo stages (configs/demo.yaml
with --set overrides) and benchmarks/bare_trl_rloo.py. Peak memory is each child's own peak RSS. The three runs of
a repeat are back to back (order reversed every other repeat) to expose them to the same background load; the
table shows medians, and each ratio is the median of per-repeat ratios. Always exits 0: this reports, it does not
gate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.markup import escape
from rich.table import Table

# The sft bench's environment, console and statistics, so both benches run and read their numbers the same way.
# Imported first: it puts the checkout on sys.path for the pipeline imports below.
from sft_bench import ENV, ROOT, _fmt_list, _load, console, median, paired_ratio

from pipeline.config import load_config
from pipeline.models import resolve_model_path
from stages.ppo import load as load_ppo_prompts

CONFIG = "configs/demo.yaml"
PROMPTS = "data/preferences/prompts.jsonl"
REWARD = "reward.rules:specificity"
RLOO_SCRIPT = Path(__file__).resolve().parent / "bare_trl_rloo.py"
NUM_GENERATIONS = 2  # RLOO's leave-one-out baseline needs at least two completions per prompt
MEMORY_TARGET = 1.5  # ppo's peak RSS at most 1.5x sft's
# Runs `python -m pipeline ...` in the child itself, then writes the process's peak CUDA allocation (None on a CPU).
PIPELINE_CHILD = (
    "import json, sys, torch; from pipeline.cli import main; rc = main(sys.argv[2:]); "
    "json.dump({'cuda_peak': torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}, "
    "open(sys.argv[1], 'w')); sys.exit(rc)"
)
IMPORTS_ONLY = "import torch, transformers, peft, trl, accelerate, datasets, pipeline.cli, stages.ppo.trainer"


def _list(values: list, digits: int = 1) -> str:
    """_fmt_list escaped for rich, which would otherwise take "[failed]" for a style tag and drop it."""
    return escape(_fmt_list(values, digits))


def run_child(cmd: list[str], log: Path) -> tuple[float, float] | None:
    """(wall seconds, peak RSS in MiB) of one subprocess, or None if it failed. os.wait4 gives that child's own
    rusage; RUSAGE_CHILDREN would give the largest child so far, hiding a smaller run behind an earlier one."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait for it again
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        console.print(f"failed (rc={proc.returncode}): {' '.join(cmd[:8])}...\n" + "\n".join(tail), markup=False)
        return None
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def pipeline_cmd(run_dir: Path, stage: str, sets: list[str], cuda_file: Path) -> list[str]:
    cmd = [sys.executable, "-c", PIPELINE_CHILD, str(cuda_file), "run", "--config", CONFIG, "--stage", stage,
           "--run-dir", str(run_dir)]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def overrides(args) -> dict[str, list[str]]:
    """--set overrides of each stage: same model, same LoRA (demo.yaml's peft), starting from the base model, a few
    steps, no held-out evaluation (only the training loop is measured), no tracker."""
    common = [f"model.name_or_path={args.model}", "tracking.report_to=[]"]
    ppo = [
        "ppo.init_from=base", f"ppo.data.train={ROOT / PROMPTS}", "ppo.data.eval_split=0", "evaluation.prompts=",
        # The rule alone is the reward, as on the RLOO side (ppo's default missing-EOS penalty is not in RLOO).
        "ppo.reward.type=rule", f"ppo.reward.function={REWARD}", "ppo.trainer.missing_eos_penalty=",
        f"ppo.trainer.max_steps={args.steps}", "ppo.trainer.logging_steps=1",  # every iteration's tokens/s
    ]
    if args.max_new_tokens:
        ppo.append(f"ppo.trainer.max_new_tokens={args.max_new_tokens}")
    sft = ["sft.init_from=base", f"sft.trainer.max_steps={args.steps}", "sft.data.eval_split=0"]
    return {"sft": common + sft, "ppo": common + ppo}


def rloo_spec(config, work: Path) -> dict:
    """RLOOTrainer set up like the ppo stage's config: the same prompts (written out as the stage loads them),
    model dir, dtype, LoRA, sampling, learning rate, KL coefficient and clip range, and the same optimiser steps per
    generated batch: rollout_batch_size completions (rollout_batch_size / 2 prompts x 2), reused for num_ppo_epochs
    passes in mini-batches of mini_batch_size."""
    cfg = config.ppo.trainer
    prompts, _ = load_ppo_prompts(config)
    prompts_file = work / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": messages}) + "\n" for messages in prompts))
    assert config.peft.method == "lora", "the RLOO script builds a LoraConfig"
    updates_per_rollout = cfg.num_ppo_epochs * -(-cfg.rollout_batch_size // cfg.mini_batch_size)
    return {
        "root": str(ROOT), "model_dir": str(resolve_model_path(config.model.name_or_path)),
        "dtype": config.model.dtype, "chat_template": config.model.chat_template, "lora": config.peft.options,
        "prompts": str(prompts_file), "seed": config.seed, "reward": REWARD,
        "trainer": {
            "max_steps": cfg.max_steps * updates_per_rollout, "per_device_train_batch_size": cfg.mini_batch_size,
            "generation_batch_size": cfg.rollout_batch_size, "num_generations": NUM_GENERATIONS,
            "num_iterations": cfg.num_ppo_epochs, "max_completion_length": cfg.max_new_tokens,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0, "learning_rate": cfg.learning_rate,
            "max_grad_norm": cfg.max_grad_norm, "beta": cfg.kl_coef, "epsilon": cfg.cliprange,
        },
    }


def ppo_throughput(metrics_file: Path, rollout_batch_size: int) -> dict:
    """Generated tokens and seconds summed over the iterations in <run>/ppo/metrics.jsonl. Each line holds one
    iteration's mean response length (tokens through the end-of-turn token) and ppo/tokens_per_s, timed from the
    rollout through the KL update and the metric reduction (the metrics file, sample tables and checkpoints are
    outside it): tokens = length x rollout_batch_size and seconds = tokens / tokens_per_s."""
    tokens, seconds, rates = 0.0, 0.0, []
    for line in metrics_file.read_text().splitlines():
        entry = json.loads(line)
        if "ppo/tokens_per_s" in entry:
            step_tokens = entry["ppo/response_length"] * rollout_batch_size
            tokens += step_tokens
            seconds += step_tokens / entry["ppo/tokens_per_s"]
            rates.append(entry["ppo/tokens_per_s"])
    return {"tokens": tokens, "seconds": seconds, "iterations": len(rates), "rates": rates}


def train_runtime(log: list[dict]) -> float | None:
    """The train_runtime (wall of trainer.train()) that TRL logs on its last line."""
    return next((entry["train_runtime"] for entry in reversed(log) if "train_runtime" in entry), None)


def measure(side: str, out: Path, work: Path, sets: dict, spec: dict, cfg) -> dict | None:
    """One run of `side` (sft, ppo or rloo) in `out`: its peak RSS and CUDA peak, and for ppo and rloo the
    generated tokens per second of the training loop; None if it failed."""
    log, cuda_file = work / f"{out.name}.log", work / f"{out.name}.cuda.json"
    if side == "rloo":
        out.mkdir()
        result = run_child([sys.executable, str(RLOO_SCRIPT), json.dumps({**spec, "output_dir": str(out)})], log)
    else:
        result = run_child(pipeline_cmd(out, side, sets[side], cuda_file), log)
    if result is None:
        return None
    wall, peak = result
    if side == "sft":
        runtime = train_runtime([json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()])
        return {"rss": peak, "cuda": json.loads(cuda_file.read_text())["cuda_peak"],
                "note": f"wall {wall:.1f} s, train_runtime {runtime} s"}
    if side == "ppo":
        done = ppo_throughput(out / "ppo" / "metrics.jsonl", cfg.rollout_batch_size)
        return {"rss": peak, "cuda": json.loads(cuda_file.read_text())["cuda_peak"],
                "rate": done["tokens"] / done["seconds"], "completions": done["iterations"] * cfg.rollout_batch_size,
                "note": f"{done['tokens']:.0f} tok / {done['seconds']:.1f} s over {done['iterations']} iterations "
                        f"(per-iteration tok/s {_list(done['rates'])}), mean response "
                        f"{done['tokens'] / (done['iterations'] * cfg.rollout_batch_size):.1f} tok, wall {wall:.1f} s"}
    done = json.loads((out / "result.json").read_text())
    return {"rss": peak, "cuda": done["cuda_peak"], "rate": done["tokens"] / done["train_wall"],
            "completions": done["completions"],
            "note": f"{done['tokens']} tok / {done['train_wall']:.1f} s of trainer.train() (train_runtime "
                    f"{train_runtime(done['log_history'])} s), {done['completions']} completions in {done['calls']} "
                    f"generation batches, mean response {done['tokens'] / done['completions']:.1f} tok, "
                    f"wall {wall:.1f} s"
                    + ("" if done["same_prompt_ids"] else " [red](prompt ids differ from the ppo stage's)[/red]")}


def bench(args, work: Path) -> tuple[list[dict], list[str]]:
    sets = overrides(args)
    config = load_config(str(ROOT / CONFIG), sets["ppo"])  # the ppo stage's own view of its settings
    cfg = config.ppo.trainer
    spec = rloo_spec(config, work)  # also materialises a built-in model, so no run times a one-off conversion
    console.print(f"ppo: {cfg.max_steps} iterations x {cfg.rollout_batch_size} responses of <= {cfg.max_new_tokens} "
                  f"tokens, {cfg.num_ppo_epochs} epochs of mini-batches of {cfg.mini_batch_size}; rloo: "
                  f"{spec['trainer']['max_steps']} optimiser steps, {NUM_GENERATIONS} completions per prompt")
    baseline = run_child([sys.executable, "-c", IMPORTS_ONLY], work / "imports-only.log")
    runs = {"sft": [], "ppo": [], "rloo": []}  # per repeat: measure()'s dict, or {} for a failed run
    for rep in range(args.repeats):
        for side in ["sft", "ppo", "rloo"] if rep % 2 == 0 else ["rloo", "ppo", "sft"]:
            run = measure(side, work / f"{side}-{rep}", work, sets, spec, cfg) or {}
            runs[side].append(run)
            shown = "failed" if not run else f"{run['rss']:.0f} MiB" + (
                f", {run['rate']:.1f} tok/s" if "rate" in run else "")
            console.print(f"  rep {rep + 1}/{args.repeats} {side:<5} {shown}{_load()}")

    def values(side: str, key: str) -> list:
        return [run.get(key) for run in runs[side]]  # None for a failed run keeps the repeats paired

    rss = {side: values(side, "rss") for side in runs}
    memory_ratio, memory_ratios = paired_ratio(rss["ppo"], rss["sft"])
    speed_ratio, speed_ratios = paired_ratio(values("ppo", "rate"), values("rloo", "rate"))
    rows = [
        {"comparison": "memory: peak RSS MiB, ppo vs sft", "ours": median(rss["ppo"]), "reference": median(rss["sft"]),
         "ratio": memory_ratio, "target": MEMORY_TARGET},
        {"comparison": "throughput: generated tok/s, ppo vs rloo", "ours": median(values("ppo", "rate")),
         "reference": median(values("rloo", "rate")), "ratio": speed_ratio, "target": None},
    ]
    notes = ["peak RSS MiB: " + ", ".join(f"{side} {_list(rss[side], 0)}" for side in runs)
             + f"; per-repeat ppo/sft {_list(memory_ratios, 3)}"]
    if baseline:
        base = baseline[1]
        above = paired_ratio(*[[None if v is None else v - base for v in rss[side]] for side in ("ppo", "sft")])[0]
        notes.append(f"a process that only imports torch, transformers, peft, trl, accelerate, datasets and the "
                     f"pipeline peaks at {base:.0f} MiB; above that, ppo/sft = "
                     + ("n/a" if above is None else f"{above:.3f}x"))
    if any(v is not None for side in runs for v in values(side, "cuda")):
        mib = {side: " ".join("n/a" if v is None else f"{v / 2**20:.0f}" for v in values(side, "cuda"))
               for side in runs}
        notes.append("peak CUDA allocated MiB (n/a: not measured): "
                     + ", ".join(f"{side} {mib[side]}" for side in runs))
    notes += [f"{side}: " + "; ".join(run.get("note", "failed") for run in runs[side]) for side in runs]
    counts = {side: sorted({run["completions"] for run in runs[side] if run}) for side in ("ppo", "rloo")}
    notes += [f"per-repeat tok/s ratios ppo/rloo: {_list(speed_ratios, 3)}",
              f"completions sampled per run: ppo {escape(str(counts['ppo']))}, rloo {escape(str(counts['rloo']))}  "
              + ("(same number)" if counts["ppo"] == counts["rloo"]
                 else "[red](DIFFERENT: not the same amount of sampling)[/red]")]
    return rows, notes


def print_table(rows: list[dict], notes: list[str], args) -> None:
    table = Table(title=f"ppo benchmark: {args.model}, {args.steps} iterations, median of {args.repeats}")
    for column in ("comparison", "ours", "reference", "ratio", "target", "met"):
        table.add_column(column, justify="left" if column == "comparison" else "right")
    for row in rows:
        ours, ref, ratio, target = row["ours"], row["reference"], row["ratio"], row["target"]
        met = "-" if target is None else (
            "[green]yes[/green]" if ratio is not None and ratio <= target else "[red]no[/red]")
        table.add_row(row["comparison"], "n/a" if ours is None else f"{ours:.1f}",
                      "n/a" if ref is None else f"{ref:.1f}", "n/a" if ratio is None else f"{ratio:.3f}×",
                      "-" if target is None else f"≤ {target:.2f}×", met)
    console.print(table)
    console.print("  ours/reference: medians over repeats; ratio: median of the per-repeat ratios (see paired_ratio)")
    for note in notes:
        console.print(f"  {note}", soft_wrap=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="built-in model name or model dir (smollm2-135m-instruct, tiny-random-smollm2)")
    parser.add_argument("--steps", type=int, default=4,
                        help="ppo iterations and sft steps; rloo runs the same number of generation batches")
    parser.add_argument("--max-new-tokens", type=int,
                        help="longest response on both sides (default: ppo.trainer.max_new_tokens of demo.yaml)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int,
                        help="OMP/MKL threads for every run (default: torch's own choice); 1 is steadier on a busy box")
    parser.add_argument("--keep", action="store_true", help="keep the run directories and logs")
    args = parser.parse_args()
    if args.threads:
        ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    work = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    console.print(f"[bold]ppo bench[/bold] ({work})")
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
