"""Peak RSS of a cpt run on a generated corpus, streamed (cpt.data.streaming) and read into memory.

    python benchmarks/cpt_stream_rss.py --mb 200 --steps 4            # both modes on a 200 MB corpus
    python benchmarks/cpt_stream_rss.py --mb 20 --mb 200 --only streamed

Each run is `python -m pipeline run --config configs/smoke.yaml --stage cpt` (the tiny random model) in a fresh
directory under /usr/bin/time -v, whose "Maximum resident set size" is the number reported. The corpus is .jsonl
of ~1 KB documents made of words from the shipped beekeeping corpus, written once per size under --work.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def corpus(work: Path, mb: int) -> Path:
    path = work / f"corpus-{mb}mb.jsonl"
    if path.exists():
        return path
    words = (REPO / "data/cpt/beekeeping.txt").read_text().split()
    rng = random.Random(0)
    with open(path, "w") as out:
        written = 0
        while written < mb << 20:
            line = json.dumps({"text": " ".join(rng.choices(words, k=170))}) + "\n"
            out.write(line)
            written += len(line)
    return path


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    start = time.time()
    result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "pipeline", *args], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"run failed:\n{result.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return kb / 1024, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, action="append", help="corpus size in MB (repeatable; default 200)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", choices=["streamed", "in-memory"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpt-stream-rss"))
    options = parser.parse_args()
    options.work.mkdir(parents=True, exist_ok=True)
    for mb in options.mb or [200]:
        path = corpus(options.work, mb)
        for mode in ("streamed", "in-memory"):
            if options.only and mode != options.only:
                continue
            run_dir = options.work / f"run-{mb}-{mode}-{time.time_ns()}"
            rss, seconds = peak_rss_mb([
                "run", "--config", "configs/smoke.yaml", "--stage", "cpt", "--run-dir", str(run_dir),
                "--set", f"cpt.data.train={path}", "--set", f"cpt.data.streaming={str(mode == 'streamed').lower()}",
                "--set", "cpt.data.eval_documents=8", "--set", "cpt.data.general_eval=",
                "--set", f"cpt.trainer.max_steps={options.steps}", "--set", f"cpt.trainer.save_steps={options.steps}",
                "--set", f"cpt.trainer.eval_steps={options.steps}"])
            print(f"{mb} MB corpus, {mode}: peak RSS {rss:.0f} MB, {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
