"""python -m pipeline: run, plan, status, validate, label (people label preference pairs, in the terminal or on a
web page), report, join (the other machines of a multi-machine run), export, generate and chat (a stage's result
outside the pipeline)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# A Hub model or dataset a config names is fetched into the Hugging Face cache on first use, as transformers and
# datasets do; HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 keep every run to what is cached.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.markup import escape  # noqa: E402

from pipeline.artifacts import completed  # noqa: E402
from pipeline.config import STAGE_ORDER, load_config  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.log import console, out  # noqa: E402


def _config_args(parser: argparse.ArgumentParser, stages: bool = True) -> None:
    parser.add_argument("--config", help="YAML run config (default: configs/demo.yaml)")
    parser.add_argument("--run-dir", help="run directory (default: the config's run_dir, else runs/<config name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set sft.trainer.learning_rate=1e-4 (repeatable)")
    if stages:
        parser.add_argument("--stage", action="append", choices=STAGE_ORDER,
                            help="run only this stage (repeatable); default: every enabled stage in order")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="A staged RLHF / RLAIF training pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run stages, resuming interrupted ones and skipping finished ones")
    _config_args(run)
    run.add_argument("--fresh", action="store_true",
                     help="discard the selected stages' earlier progress (moved to <run-dir>/.history/)")
    plan = commands.add_parser("plan", help="show which stages would run, resume or be skipped, and why")
    _config_args(plan)
    status = commands.add_parser("status", help="per-stage status, newest complete checkpoint, headline metrics")
    status.add_argument("--run-dir", required=True)
    status.add_argument("--json", action="store_true", help='print {"stages": {name: {...}}}')
    validate = commands.add_parser("validate", help="preflight without training: data, tokenizer, lengths, PEFT")
    _config_args(validate)
    label = commands.add_parser("label", help="label the preferences stage's pairs yourself, in the terminal, or "
                                              "several people on a web page (--web)")
    label.add_argument("--run-dir", required=True)
    label.add_argument("--judge-name", default="human", help="recorded in every label as its judge (default: human)")
    label.add_argument("--web", action="store_true", help="serve a labelling page for several annotators instead "
                                                          "(until Ctrl-C)")
    label.add_argument("--host", default="127.0.0.1", help="--web: the address to listen on (default: 127.0.0.1, "
                                                           "this machine only; any other needs the printed token)")
    label.add_argument("--port", type=int, default=8765, help="--web: the port (default: 8765; 0: any free port)")
    report = commands.add_parser("report", help="write <run-dir>/report.md and report.html (plots, numbers, samples)")
    report.add_argument("--run-dir", required=True)
    join = commands.add_parser("join", help="on machine 1, 2...: run this machine's part of every stage machine 0's "
                                            "`run` launches (multi-machine runs; shared run directory)")
    join.add_argument("--run-dir", required=True)
    join.add_argument("--machine-rank", type=int, required=True, help="this machine's rank: 1 .. num_machines-1")
    join.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                      help="give up if no run has ended within this time (default: follow until one does)")
    export = commands.add_parser("export", help="write a stage's result as a standalone Hugging Face model "
                                                "directory (adapter merged), or its adapter alone")
    export.add_argument("--run-dir", required=True)
    export.add_argument("--stage", required=True, help="the stage whose result to export (cpt, sft, rm, dpo, ppo)")
    export.add_argument("--out", required=True, help="a new directory to write it to")
    export.add_argument("--adapter-only", action="store_true",
                        help="the PEFT adapter alone, its adapter_config naming the base (a Hub id when it is one)")
    generate = commands.add_parser("generate", help="answer every prompt of a file with a stage's result, into JSONL")
    generate.add_argument("--run-dir", required=True)
    generate.add_argument("--stage", required=True)
    generate.add_argument("--prompts", required=True, help='a prompt file: {"prompt"} or {"messages"} per line')
    generate.add_argument("--out", required=True, help="the JSONL file to write: {prompt, response, source} per line")
    chat = commands.add_parser("chat", help="talk to a stage's result in the terminal (streaming, multi-turn)")
    chat.add_argument("--run-dir", required=True)
    chat.add_argument("--stage", required=True)
    chat.add_argument("--system", help="a system message for the conversation")
    for command in (generate, chat):
        command.add_argument("--max-new-tokens", type=int, default=256)
        command.add_argument("--temperature", type=float, default=0.7 if command is chat else 1.0,
                             help="sampling temperature" + (" (0: greedy)" if command is chat else ""))
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument("--seed", type=int, default=None, help="default: the run's seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.signals import Interrupted

    try:
        return COMMANDS[args.command](args)
    except Interrupted as exc:
        console.print("[yellow]interrupted:[/yellow]", escape(str(exc)), highlight=False)
        return exc.exit_code
    except PipelineError as exc:
        console.print("[red]error:[/red]", escape(str(exc)), highlight=False)
        return 2
    except OSError as exc:  # a full disk outside a stage (the runner names it within one)
        from pipeline.artifacts import disk_full

        full = disk_full(exc, Path(getattr(args, "run_dir", None) or "."))
        if full is None:
            raise
        console.print("[red]error:[/red]", escape(str(full)), highlight=False)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C outside a run, or a second signal (StopNow) within one
        console.print("[yellow]interrupted[/yellow]: run the same command again to resume")
        return getattr(exc, "exit_code", 130)


def _setup(args):
    from pipeline.runner import Runner, default_run_dir, selected_stages

    config = load_config(args.config, args.set)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config)
    return Runner(config, run_dir, getattr(args, "fresh", False)), selected_stages(config, args.stage)


def cmd_run(args) -> int:
    from pipeline.signals import graceful_stop

    runner, names = _setup(args)
    with graceful_stop():  # SIGTERM, SIGINT, SIGUSR1: finish the step, checkpoint, exit 128 + signal
        manifests = runner.run(names)
    return 0 if all(completed(m) for m in manifests) else 1


def cmd_plan(args) -> int:
    runner, names = _setup(args)
    for decision in runner.plan(names):
        out.print(f"[bold]{decision.stage:<11}[/bold] {decision.action:<7} {decision.reason}")
    return 0


def cmd_status(args) -> int:
    from pipeline.artifacts import stage_status

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise PipelineError(f"no run directory at {run_dir}")
    stages = {name: stage_status(run_dir, name) for name in STAGE_ORDER}
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), "stages": stages}, indent=2, default=str))
        return 0
    for name, info in stages.items():
        metrics = info.get("metrics", {})
        headline = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.endswith("loss") and v is not None)
        out.print(f"[bold]{name:<11}[/bold] {info['status']:<12} checkpoint={info.get('newest_checkpoint')} {headline}")
    return 0


def cmd_validate(args) -> int:
    from pipeline.validate import validate

    runner, names = _setup(args)
    return validate(runner, names)


def _check_judge_is_human(run_dir: Path) -> None:
    """Labels given here are read only by a run whose judge is a person; anything else would ignore them silently."""
    import yaml

    config_path = run_dir / "config.yaml"  # the resolved config, written by `run`; absent before the first run
    if not config_path.exists():
        return
    judge = (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}).get("preferences", {}).get("judge", {})
    if judge.get("type", "human") != "human":
        raise PipelineError(f"this run's judge is {judge['type']!r} (preferences.judge.type in {config_path}), so "
                            "the preferences stage would not read labels given here; set it to human to label "
                            "by hand")


def _human_judge(run_dir: Path):
    """The run's preferences.judge (its overlap and disagreement rule), from the resolved config `run` wrote."""
    from pipeline.config import JudgeConfig

    config_path = run_dir / "config.yaml"
    return load_config(config_path).preferences.judge if config_path.exists() else JudgeConfig()


def cmd_label(args) -> int:
    run_dir = Path(args.run_dir)
    pairs_path = run_dir / "preferences" / "pairs.jsonl"
    if not pairs_path.exists():
        raise PipelineError(f"{run_dir} has no pairs to label yet ({pairs_path} is missing): "
                            "run `python -m pipeline run --stage preferences` first")
    _check_judge_is_human(run_dir)
    from pipeline.lock import RunLock
    from reward.annotators import consensus, read_votes, settled_for
    from reward.build import human_labels_path
    from reward.importers import load_pairs
    from reward.interactive import label_interactively
    from reward.pairs import LabelStore

    judge = _human_judge(run_dir)
    # The lock keeps a running pipeline (whose stage may be labelling too) from writing the same label file.
    with RunLock(run_dir):
        pairs = load_pairs(pairs_path)  # read under the lock: the stage rewrites the file when it runs again
        if args.web:
            from reward.web_label import label_on_the_web

            return label_on_the_web(run_dir, pairs, judge, args.host, args.port)
        settled = settled_for(args.judge_name, pairs, read_votes(run_dir), judge.overlap, judge.disagreement)
        with LabelStore(human_labels_path(run_dir)) as store:
            session = label_interactively(pairs, store, args.judge_name, settled=settled)
    others = len(consensus(pairs, read_votes(run_dir), judge.overlap, judge.disagreement).pending)
    if session.remaining:
        console.print(f"{session.remaining} of {len(pairs)} pairs still unlabelled; continue with "
                      f"`python -m pipeline label --run-dir {run_dir}`", markup=False)
    elif others:
        console.print(f"{others} of {len(pairs)} pairs wait for another person's label (preferences.judge.overlap, "
                      f"or a split to break): `python -m pipeline label --run-dir {run_dir} --web`", markup=False)
    else:
        console.print(f"all {len(pairs)} pairs labelled; run `python -m pipeline run` to continue", markup=False)
    return 0


def cmd_report(args) -> int:
    from pipeline.report import write

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise PipelineError(f"no run directory at {run_dir}")
    for path in write(run_dir):
        out.print(str(path))
    return 0


def cmd_join(args) -> int:
    from pipeline.join import follow

    return follow(Path(args.run_dir), args.machine_rank, args.timeout)


def cmd_export(args) -> int:
    from pipeline.export import export

    export(Path(args.run_dir), args.stage, Path(args.out), args.adapter_only)
    return 0


def cmd_generate(args) -> int:
    from pipeline.export import generate

    if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise PipelineError("generate needs --temperature > 0, 0 < --top-p <= 1, --max-new-tokens and --batch-size "
                            ">= 1")
    generate(Path(args.run_dir), args.stage, Path(args.prompts), Path(args.out), args.max_new_tokens,
             args.temperature, args.top_p, args.batch_size, args.seed)
    return 0


def cmd_chat(args) -> int:
    from pipeline.export import chat

    return chat(Path(args.run_dir), args.stage, args.max_new_tokens, args.temperature, args.system)


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "status": cmd_status, "validate": cmd_validate, "label": cmd_label,
            "report": cmd_report, "join": cmd_join, "export": cmd_export, "generate": cmd_generate, "chat": cmd_chat}

if __name__ == "__main__":
    sys.exit(main())
