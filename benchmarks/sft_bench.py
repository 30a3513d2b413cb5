"""Benchmark the sft stage: pipeline overhead against a bare TRL script, and packed against padded throughput.

    PIPELINE_CACHE_DIR=/tmp/pc python benchmarks/sft_bench.py [--model NAME] [--steps N] [--repeats R]

Every measurement is a fresh subprocess with a fresh run directory, repeated --repeats times; the table shows
medians, and each ratio is the median of per-repeat ratios. The machine may be shared, so the two sides of a
comparison run back to back in each repeat (order alternated) to expose both to the same background load.
Always exits 0: this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
BARE_SCRIPT = Path(__file__).resolve().parent / "bare_trl_sft.py"
sys.path.insert(0, str(ROOT))  # run from a checkout even when the package is not installed

from pipeline.config import load_config  # noqa: E402
from pipeline.models import resolve_model_path  # noqa: E402

console = Console(highlight=False)
# Same environment for both sides; the pipeline's CLI sets these itself, the bare script would not.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_timed(cmd: list[str], log: Path, cpu: list | None = None) -> float | None:
    """Wall seconds of a whole subprocess (interpreter start and imports included), or None if it failed.

    Appends the child's CPU seconds (user + sys) to `cpu`: less sensitive than wall time to other processes
    competing for the cores, so it helps read a noisy wall-time ratio."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w") as handle:
        rc = subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=handle, stderr=subprocess.STDOUT).returncode
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime if rc == 0 else None)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        console.print(f"failed (rc={rc}): {' '.join(cmd[:6])}...\n" + "\n".join(tail), markup=False)
    return elapsed if rc == 0 else None


def read_metrics(path: Path) -> dict:
    """The last num_tokens and the train_runtime that TRL logged (metrics.jsonl: one log event per line)."""
    found = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        for key in ("num_tokens", "train_runtime"):
            if key in entry:
                found[key] = entry[key]
    return found


def pipeline_cmd(run_dir: Path, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", "configs/smoke.yaml", "--stage", "sft",
           "--run-dir", str(run_dir)]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(ours: list, reference: list) -> tuple[float | None, list]:
    """Median of the per-repeat ratios. The two runs of a repeat are adjacent in time, so background load that
    drifts over minutes (3x swings seen on a shared 2-core box) mostly cancels within a pair; a ratio of the two
    medians would mix runs from quiet and busy periods."""
    ratios = [o / r for o, r in zip(ours, reference) if o is not None and r]
    return median(ratios), ratios


def overhead(args, work: Path) -> tuple[dict, list[str]]:
    """Pipeline sft stage vs bare TRL doing the same training, both timed as whole subprocesses."""
    sets = [f"model.name_or_path={args.model}", f"sft.trainer.max_steps={args.steps}", "sft.data.eval_split=0"]
    config = load_config(str(ROOT / "configs/smoke.yaml"), sets)  # the pipeline's own view of the settings
    sft = config.sft
    # Materialise a built-in model now, so a one-off conversion is never timed on either side.
    model_dir = resolve_model_path(config.model.name_or_path)
    spec = {
        "model_dir": str(model_dir), "data": str(ROOT / sft.data.train), "seed": config.seed,
        "lora": config.peft.options, "trainer": dict(sft.trainer),  # max_steps, batch size, lr, max_length, saves...
    }
    assert config.peft.method == "lora", "the bare script builds a LoraConfig"
    times = {"pipeline": [], "bare": []}
    cpu = {"pipeline": [], "bare": []}
    inner = {"pipeline": [], "bare": []}  # train_runtime: where the overhead is (inside or outside trainer.train)
    tokens = {"pipeline": set(), "bare": set()}
    for rep in range(args.repeats):
        order = ["pipeline", "bare"] if rep % 2 == 0 else ["bare", "pipeline"]
        for side in order:
            out = work / f"overhead-{side}-{rep}"
            if side == "pipeline":
                wall = run_timed(pipeline_cmd(out, sets), work / f"{out.name}.log", cpu[side])
                metrics_file = out / "sft" / "metrics.jsonl"
            else:
                cmd = [sys.executable, str(BARE_SCRIPT), json.dumps({**spec, "output_dir": str(out)})]
                wall = run_timed(cmd, work / f"{out.name}.log", cpu[side])
                metrics_file = out / "metrics.jsonl"
            times[side].append(wall)
            metrics = read_metrics(metrics_file) if wall is not None else {}
            inner[side].append(metrics.get("train_runtime"))  # None on failure keeps the repeats paired
            if metrics:
                tokens[side].add(metrics.get("num_tokens"))
            console.print(f"  overhead rep {rep + 1}/{args.repeats} {side:<8} "
                          f"{'failed' if wall is None else f'{wall:.1f} s'}{_load()}")
    notes = [
        f"overhead walls (s): pipeline {_fmt_list(times['pipeline'])}, bare {_fmt_list(times['bare'])}",
        f"overhead CPU s (user+sys): pipeline {_fmt_list(cpu['pipeline'])}, bare {_fmt_list(cpu['bare'])}; "
        f"median ratio {_ratio(cpu)}",
        f"overhead train_runtime (s, inside trainer.train): pipeline {_fmt_list(inner['pipeline'])}, "
        f"bare {_fmt_list(inner['bare'])}; median ratio {_ratio(inner)}",
        f"tokens trained (num_tokens): pipeline {sorted(tokens['pipeline'], key=str)}, "
        f"bare {sorted(tokens['bare'], key=str)}  "
        + ("(same batches)" if tokens["pipeline"] == tokens["bare"] else "[red](DIFFERENT: not the same work)[/red]"),
    ]
    ratio, ratios = paired_ratio(times["pipeline"], times["bare"])
    notes.insert(1, f"overhead per-repeat wall ratios: {_fmt_list(ratios, 3)}")
    row = {"comparison": f"overhead: wall s, {args.steps} steps", "ours": median(times["pipeline"]),
           "reference": median(times["bare"]), "ratio": ratio, "lower_is_better": True, "target": 1.05}
    return row, notes


def packing(args, work: Path) -> tuple[dict, list[str]]:
    """Trained tokens per second of the pipeline's sft stage, packed vs padded, on the variable-length QA set."""
    base = [f"model.name_or_path={args.model}", f"sft.trainer.max_steps={args.pack_steps}", "sft.data.eval_split=0",
            "sft.trainer.per_device_train_batch_size=8", "sft.trainer.max_length=512",
            # No checkpoint inside the run: train_runtime then measures training, not disk writes.
            "sft.trainer.save_steps=1000000"]
    rates = {"packed": [], "padded": []}
    detail = {"packed": [], "padded": []}
    for rep in range(args.repeats):
        order = ["packed", "padded"] if rep % 2 == 0 else ["padded", "packed"]
        for side in order:
            out = work / f"packing-{side}-{rep}"
            sets = base + [f"sft.trainer.packing={'true' if side == 'packed' else 'false'}"]
            wall = run_timed(pipeline_cmd(out, sets), work / f"{out.name}.log")
            rate = None
            if wall is not None:
                metrics = read_metrics(out / "sft" / "metrics.jsonl")
                # num_tokens is TRL's cumulative count of real tokens: attention_mask.sum() when padded, the length
                # of the flattened padding-free row when packed (no pad there). train_runtime is trainer.train's wall.
                rate = metrics["num_tokens"] / metrics["train_runtime"]
                detail[side].append(f"{metrics['num_tokens']:.0f} tok / {metrics['train_runtime']:.1f} s")
            rates[side].append(rate)
            console.print(f"  packing rep {rep + 1}/{args.repeats} {side:<8} "
                          f"{'failed' if rate is None else f'{rate:.1f} tok/s'}{_load()}")
    notes = [f"packing {side}: {', '.join(detail[side]) or 'failed'}" for side in ("packed", "padded")]
    ratio, ratios = paired_ratio(rates["packed"], rates["padded"])
    notes.append(f"packing per-repeat tok/s ratios: {_fmt_list(ratios, 3)}")
    row = {"comparison": f"packing: trained tok/s, {args.pack_steps} steps", "ours": median(rates["packed"]),
           "reference": median(rates["padded"]), "ratio": ratio, "lower_is_better": False, "target": 1.5}
    return row, notes


def _load() -> str:
    # Another process on a 2-core box can slow torch's threads down 10x (seen here); the load says when it happened.
    return f"   (load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"


def _ratio(pair: dict) -> str:
    ratio = paired_ratio(pair["pipeline"], pair["bare"])[0]
    return "n/a" if ratio is None else f"{ratio:.3f}x"


def _fmt_list(values: list, digits: int = 1) -> str:
    return "[" + ", ".join("failed" if v is None else f"{v:.{digits}f}" for v in values) + "]"


def print_table(rows: list[dict], notes: list[str], args) -> None:
    table = Table(title=f"sft benchmark: {args.model}, median of {args.repeats}")
    for column in ("comparison", "ours", "reference", "ratio", "target", "met"):
        table.add_column(column, justify="left" if column == "comparison" else "right")
    for row in rows:
        ours, ref, ratio = row["ours"], row["reference"], row["ratio"]
        if row["lower_is_better"]:
            target, met = f"≤ {row['target']:.2f}×", ratio is not None and ratio <= row["target"]
        else:
            target, met = f"≥ {row['target']:.2f}×", ratio is not None and ratio >= row["target"]
        table.add_row(row["comparison"], "n/a" if ours is None else f"{ours:.1f}",
                      "n/a" if ref is None else f"{ref:.1f}", "n/a" if ratio is None else f"{ratio:.3f}×",
                      target, "[green]yes[/green]" if met else "[red]no[/red]")
    console.print(table)
    console.print("  ours/reference: medians over repeats; ratio: median of the per-repeat ratios (see paired_ratio)")
    for note in notes:
        console.print(f"  {note}", soft_wrap=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random-smollm2",
                        help="built-in model name or model dir (tiny-random-smollm2, smollm2-135m-instruct)")
    parser.add_argument("--steps", type=int, default=30, help="max_steps of the overhead comparison")
    parser.add_argument("--pack-steps", type=int, default=None,
                        help="max_steps of both packing runs (default: 8 on the tiny model, about one epoch of the "
                             "QA set in 8x512-token packs; 2 on a real model, where one packed step takes minutes "
                             "on a CPU and the first-step warm-up is negligible)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int,
                        help="OMP/MKL threads for every run (default: torch's own choice); 1 is steadier on a busy box")
    parser.add_argument("--only", choices=("overhead", "packing"), help="run one comparison only")
    parser.add_argument("--keep", action="store_true", help="keep the run directories and logs")
    args = parser.parse_args()
    if args.threads:
        ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    args.pack_steps = args.pack_steps or (8 if args.model == "tiny-random-smollm2" else 2)

    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    rows, notes = [], []
    try:
        for name, compare in (("overhead", overhead), ("packing", packing)):
            if args.only in (None, name):
                console.print(f"[bold]{name}[/bold] ({work})")
                row, more = compare(args, work)
                rows.append(row)
                notes += more
        print_table(rows, notes, args)
    except Exception as exc:  # a report, not a gate: say what broke and still exit 0
        console.print(f"[red]benchmark error:[/red] {exc!r}")
        if rows:
            print_table(rows, notes, args)
    finally:
        if args.keep:
            console.print(f"run directories and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
