"""The alignment report of a run directory: report.md (text and tables) and report.html (the same, with its plots
inlined as PNG data URIs, so the one file can be mailed or archived and opens anywhere without a network).

Everything is read from what the stages left on disk (stage.json, metrics.jsonl, calibration.json, agreement.json,
eval_samples.jsonl); a stage or a file that is not there is left out, so a partial or running run still reports.
The content is built once as sections of paragraphs, tables and figures, then rendered as Markdown and as HTML.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.artifacts import ROUND_DONE, read_json, round_dirs, write_text_atomic
from pipeline.config import REGISTRY, STAGE_ORDER
from pipeline.errors import PipelineError

SAMPLES_SHOWN = 3
SAMPLE_CHARS = 600


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Plot:
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # paragraphs (str), Table, Plot


@dataclass
class Stage:
    name: str
    manifest: dict
    log: list[dict]  # metrics.jsonl

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    def curve(self, key: str) -> tuple[list[int], list[float]] | None:
        """(steps, values) of a logged metric; a step logged twice (a resumed attempt redoing it) keeps the later."""
        by_step = {row["step"]: row[key] for row in self.log if row.get(key) is not None}
        if not by_step:
            return None
        steps = sorted(by_step)
        return steps, [float(by_step[s]) for s in steps]


# ---------------------------------------------------------------- reading the run directory

def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a torn last line (a kill mid-append) is left out, a torn earlier one is an error."""
    if not path.exists():
        return []
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
            records.append(record)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if number < len(lines):
                raise PipelineError(f"{path}:{number}: not a JSON record ({' '.join(str(exc).split())})") from None
    return records


def load_stages(run_dir: Path) -> list[Stage]:
    from pipeline.artifacts import stage_status

    stages = []
    for name in STAGE_ORDER:
        manifest = stage_status(run_dir, name)
        if manifest["status"] != "pending":
            stages.append(Stage(name, manifest, read_jsonl(run_dir / name / "metrics.jsonl")))
    return stages


# ---------------------------------------------------------------- formatting

def _num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def _change(before, after, digits: int = 4) -> str:
    return f"{_num(before, digits)} → {_num(after, digits)}"


def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def _clip(text: str) -> str:
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + f" … [{len(text) - SAMPLE_CHARS} more chars]"


# ---------------------------------------------------------------- sections

def summary_section(stages: list[Stage]) -> Section:
    from pipeline.tracking import headline

    rows = []
    for stage in stages:
        manifest, metrics = stage.manifest, stage.metrics
        steps = metrics.get("train/steps")
        if steps is None and stage.log:
            steps = f"{max(row['step'] for row in stage.log)} so far"
        elapsed = manifest.get("duration_s")
        if elapsed is None and manifest["status"] == "running" and manifest.get("started_at"):
            elapsed = time.time() - manifest["started_at"]
        status = manifest["status"]
        if manifest.get("resumed_from"):
            status += f", resumed from {manifest['resumed_from']}"  # the time is then that last attempt's
        rows.append([stage.name, status, _duration(elapsed), _num(steps), _num(metrics.get("train/loss")),
                     headline(metrics) or "–"])
    blocks = [Table(["stage", "status", "time", "steps", "train loss", "key metric (before → after)"], rows)]
    blocks += [f"{stage.name} stopped with: {stage.manifest['error']}" for stage in stages
               if stage.manifest.get("error")]
    return Section("Stages", blocks)


def loss_section(stages: list[Stage]) -> Section | None:
    from pipeline import plots

    curves = {}
    for stage in stages:
        if _learns_online(stage.name):
            continue  # its losses are with its rewards below
        found = {kind: stage.curve(key) for kind, key in (("train", "loss"), ("eval", "eval_loss"))}
        found = {kind: curve for kind, curve in found.items() if curve}
        if found:
            curves[stage.name] = found
    if not curves:
        return None
    text = ("Training loss per logged step (metrics.jsonl) and, where a stage holds data out, the held-out loss "
            "(step 0 is before training). rm's loss is the Bradley-Terry loss; dpo, kto, orpo and simpo each "
            "have their own preference loss (orpo's includes the chosen answers' NLL).")
    return Section("Training curves", [text, Plot("loss per stage", plots.loss_curves(curves))])


def ppo_section(stage: Stage, run_dir: Path) -> Section | None:
    from pipeline import plots

    keys = ("ppo/reward_mean", "ppo/reward_std", "ppo/score_mean", "ppo/kl", "ppo/kl_coef", "ppo/entropy",
            "ppo/response_length", "ppo/policy_loss", "ppo/value_loss")
    curves = {key: curve for key in keys if (curve := stage.curve(key))}
    if "ppo/reward_mean" not in curves:
        return None
    m = stage.metrics
    # The manifest has the last iteration's numbers once the stage completes; until then, the last logged ones.
    rewards, kl = curves["ppo/reward_mean"][1], curves.get("ppo/kl", ([], [None]))[1]
    rows = [["reward (KL-penalised), first → last iteration",
             _change(m.get("ppo/reward_mean_first", rewards[0]), m.get("ppo/reward_mean", rewards[-1]))],
            ["KL to the reference at the last iteration", _num(m.get("ppo/kl", kl[-1]))],
            ["held-out score, before → after", _change(m.get("eval/score_mean_before"), m.get("eval/score_mean"))]]
    blocks = [Table(["measure", "value"], [row for row in rows if row[1] not in ("–", "– → –")]),
              Plot("PPO per iteration", plots.ppo_curves(curves))]
    tables = read_jsonl(run_dir / stage.name / "samples.jsonl")
    if tables:
        # What the reward is paying for right now: rising reward on one repeated answer is reward hacking.
        last = tables[-1]
        blocks += [f"Responses sampled at iteration {last['step']} (ppo/samples.jsonl has a table every "
                   "sample_every iterations):",
                   Table(["prompt", "response", "score", "reward (KL-penalised)"],
                         [[_clip(row["prompt"][-1]["content"]), _clip(row["response"]), _num(row["score"], 3),
                           _num(row["reward"], 3)] for row in last["samples"][:SAMPLES_SHOWN]])]
    return Section("PPO: reward and KL", blocks)


def online_section(stage: Stage, run_dir: Path) -> Section | None:
    """grpo and rloo, as TRL logs them: the reward, KL, entropy, response length and loss per step."""
    from pipeline import plots

    keys = ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "loss")
    curves = {key: curve for key in keys if (curve := stage.curve(key))}
    if "reward" not in curves:
        return None
    m, name = stage.metrics, stage.name
    # The manifest has the last logged numbers once the stage completes; until then, read them from the log.
    rewards, kl = curves["reward"][1], curves.get("kl", ([], [None]))[1]
    rows = [["reward, first → last logged step",
             _change(m.get(f"{name}/reward_mean_first", rewards[0]), m.get(f"{name}/reward_mean", rewards[-1]))],
            ["KL to the reference at the last logged step (nats per token)", _num(m.get(f"{name}/kl", kl[-1]))],
            ["held-out reward, before → after", _change(m.get("eval/score_mean_before"), m.get("eval/score_mean"))]]
    text = (f"{name} (TRL's {name.upper()} trainer) per logged step: the reward is the score of `{name}.reward` "
            "averaged over the step's responses, before any KL term.")
    blocks = [text, Table(["measure", "value"], [row for row in rows if row[1] not in ("–", "– → –")]),
              Plot(f"{name.upper()} per step", plots.online_curves(curves))]
    tables = read_jsonl(run_dir / name / "samples.jsonl")
    if tables:
        last = tables[-1]
        blocks += [f"Responses trained on at step {last['step']} ({name}/samples.jsonl has a table every logged step):",
                   Table(["prompt", "response", "score", "advantage"],
                         [[_clip(row["prompt"][-1]["content"]), _clip(row["response"]), _num(row["score"], 3),
                           _num(row["advantage"], 3)] for row in last["samples"][:SAMPLES_SHOWN]])]
    return Section(f"{name.upper()}: reward and KL", blocks)


def _learns_online(name: str) -> bool:
    """ppo, grpo, rloo: the stages that learn from a reward on responses they sample."""
    return "reward" in {f.name for f in dataclasses.fields(REGISTRY[name].section)}


def rounds_section(stage: Stage, run_dir: Path, config: dict) -> Section | None:
    """Iterative DPO, round by round: what the judge decided, what DPO learnt, and how the judge sees the policy."""
    from pipeline import plots

    finished = [read_json(d / ROUND_DONE) for d in round_dirs(run_dir / stage.name) if (d / ROUND_DONE).exists()]
    if not finished:
        return None
    section = config.get(stage.name, {})
    judge = section.get("judge", {})
    rows = []
    for m in finished:
        flips = m.get("judge/order_flip_rate")
        rows.append([str(m["round"]), _num(m["prompts"]), _num(m["pairs/judged"]), _num(m["pairs/decided"]),
                     f"{_num(m['pairs/ties'])} ({_pct(m.get('judge/tie_rate'))})", _pct(flips),
                     _num(m.get("train/loss"), 3), _pct(m.get("dpo/train_accuracy")),
                     _num(m.get("dpo/train_margin"), 3),
                     f"{_pct(m.get('dpo/eval_accuracy_before'))} → {_pct(m.get('dpo/eval_accuracy'))}",
                     _pct(m.get("win/win_rate"))])
    judged_by = " ".join(filter(None, (judge.get("type"), judge.get("function") or judge.get("model"))))
    text = (f"{len(finished)} of {section.get('rounds', len(finished))} rounds finished. Each round sampled pairs "
            f"from the policy the round before trained, {judged_by} labelled them ({stage.name}/round_N/pairs.jsonl), "
            f"and DPO trained on them against the {section.get('reference', 'previous')} policy as its reference. "
            "Reward accuracy and margin are DPO's implicit rewards (beta log pi/pi_ref) on the round's training pairs "
            "and, before → after, on its held-out prompts; the win rate is the same judge comparing the round's "
            "policy with the start on held-out prompts (it trained the policy: the independent verdict is the "
            "evaluation above).")
    blocks = [text, Table(["round", "prompts", "pairs judged", "decided", "ties", "order flips", "train loss",
                           "reward accuracy", "reward margin", "held-out accuracy before → after",
                           "judge win rate over the start"], rows)]
    numbered = [m["round"] for m in finished]

    def curve(key):
        points = [(k, m[key]) for k, m in zip(numbered, finished) if m.get(key) is not None]
        return ([k for k, _ in points], [float(v) for _, v in points]) if points else None

    panels = {"pairs": {"decided": curve("pairs/decided"), "ties": curve("pairs/ties")},
              "DPO reward accuracy": {"training pairs": curve("dpo/train_accuracy"),
                                      "held-out, after the round": curve("dpo/eval_accuracy")},
              "judge win rate over the start": {"win rate": curve("win/win_rate")}}
    panels = {title: {label: c for label, c in curves.items() if c} for title, curves in panels.items()}
    losses = {}
    for d in round_dirs(run_dir / stage.name):
        loss = Stage(stage.name, {}, read_jsonl(d / "metrics.jsonl")).curve("loss")
        if loss:
            losses[int(d.name.split("_")[1])] = loss
    blocks.append(Plot("iterative DPO by round", plots.rounds({t: c for t, c in panels.items() if c}, losses)))
    return Section("Iterative DPO: rounds", blocks)


def win_rate_section(stages: list[Stage], config: dict) -> Section | None:
    from pipeline import plots

    evaluated = [s for s in stages if REGISTRY[s.name].evaluated and s.metrics.get("eval/wins") is not None]
    if not evaluated:
        return None
    evaluation = config.get("evaluation", {})
    judge = evaluation.get("judge", {})
    measure = evaluation.get("measure")
    rows = []
    for stage in evaluated:
        m = stage.metrics
        start = (stage.manifest.get("init") or {}).get("description", "its starting policy")
        rows.append([stage.name, start, _pct(m.get("eval/win_rate")),
                     f"{m['eval/wins']} / {m['eval/ties']} / {m['eval/losses']}",
                     _num(m.get("eval/kl_to_start"), 3),
                     _change(m.get("eval/measure_before"), m.get("eval/measure_after"), 3),
                     _change(m.get("eval/response_words_before"), m.get("eval/response_words_after"), 1)])
    judged_by = " ".join(filter(None, (judge.get("type"), judge.get("function") or judge.get("model"))))
    text = (f"Each policy against the one it started from, on held-out prompts ({evaluation.get('prompts')}), "
            f"judged by {judged_by}; a tie counts half. KL is nats per response; the held-out measure is "
            f"{measure or 'not set'}.")
    results = {s.name: {k: s.metrics.get(f"eval/{k}") for k in ("wins", "ties", "losses", "win_rate")}
               for s in evaluated}
    return Section("Win rate over the starting policy", [
        text,
        Table(["stage", "against", "win rate", "wins / ties / losses", "KL to start", "measure before → after",
               "mean words before → after"], rows),
        Plot("win rates", plots.win_rates(results)),
    ])


def judged_win_rates(stage: Stage, config: dict) -> list[tuple[str, float, float | None, float | None]]:
    """(judge, win rate, 95% low, 95% high) for every judge that compared the stage with its start: evaluation.judge
    under eval/, each of evaluation.judges under eval/<type>/."""
    evaluation = config.get("evaluation", {})
    judges = [evaluation.get("judge", {}), *evaluation.get("judges", [])]
    found = []
    for key, value in stage.metrics.items():
        if value is None or not (key.startswith("eval/") and key.endswith("win_rate")):
            continue
        space = key[len("eval/"):-len("win_rate")]
        name = space.rstrip("/") or (judges[0].get("type") or "judge")
        found.append((space == "", name, value, stage.metrics.get(f"eval/{space}win_rate_low"),
                      stage.metrics.get(f"eval/{space}win_rate_high")))
    # evaluation.judge first (stage.json keeps its metrics sorted, which puts eval/<type>/ before eval/win_rate).
    return [row[1:] for row in sorted(found, key=lambda row: not row[0])]


def verdict(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "no interval"
    return "better" if low > 0.5 else "worse" if high < 0.5 else "no clear difference"


def alignment_section(stages: list[Stage], config: dict) -> Section | None:
    """The headline: did the policy stages beat the policy they started from, under each judge, with what cost
    (KL), on the held-out measure, and with warnings where the reward looks hacked."""
    evaluated = [s for s in stages if REGISTRY[s.name].evaluated and s.metrics.get("eval/wins") is not None]
    if not evaluated:
        return None
    rows, warnings = [], []
    for stage in evaluated:
        m = stage.metrics
        rates = judged_win_rates(stage, config)
        for name, rate, low, high in rates:
            interval = f"{_pct(low)} – {_pct(high)}" if low is not None else "n/a"
            rows.append([stage.name, name, _pct(rate), interval, verdict(low, high),
                         _change(m.get("eval/measure_before"), m.get("eval/measure_after"), 3),
                         _num(m.get("eval/kl_to_start"), 3),
                         _change(m.get("eval/degenerate_before"), m.get("eval/degenerate_after"), 3)])
        independent = rates[1:] or rates  # judges that did not train the policy, where the config names any
        first, last = m.get(f"{stage.name}/reward_mean_first"), m.get(f"{stage.name}/reward_mean")
        reward_rose = first is not None and last is not None and last > first
        if reward_rose and all(verdict(low, high) != "better" for _, _, low, high in independent):
            warnings.append(f"{stage.name}: its training reward rose ({first:.3f} → {last:.3f}) but no independent "
                            "judge finds it better than its start: a sign of reward hacking; read its samples.")
        if (m.get("eval/degenerate_after") or 0) > (m.get("eval/degenerate_before") or 0):
            warnings.append(f"{stage.name}: {_pct(m['eval/degenerate_after'])} of its held-out answers repeat a "
                            f"three-word phrase three times or more (its start: {_pct(m.get('eval/degenerate_before'))})"
                            ": degenerate text a reward can favour.")
    text = ("Each policy against the one it started from on held-out prompts, under every judge that compared them "
            "(a tie counts half; the interval is 95%, Wilson). \"better\" needs the whole interval above 50%.")
    rm = next((s for s in stages if s.name == "rm" and s.metrics.get("rm/eval_accuracy") is not None), None)
    if rm is not None:
        text += (f" The reward model: held-out accuracy {_pct(rm.metrics['rm/eval_accuracy'])}."
                 + _probe_text(rm.metrics))
    blocks = [text, Table(["stage", "judge", "win rate", "95% interval", "verdict", "held-out measure before → "
                           "after", "KL to start", "repetitive answers before → after"], rows)]
    blocks += [f"Warning: {warning}" for warning in warnings] or ["No sign of reward hacking: no training reward rose "
                                                                  "without an independent judge seeing it, and no "
                                                                  "more repetitive answers than before."]
    return Section("Did it align?", blocks)


def _probe_text(m: dict) -> str:
    """rm.data.probes: accuracy before → after on each held-out set built to break a surface cue."""
    names = sorted(k[len("rm/probe_"):-len("_accuracy")] for k in m
                   if k.startswith("rm/probe_") and k.endswith("_accuracy"))
    return "".join(f" On the probe '{name}' (pairs built so that a surface cue points to the rejected answer): "
                   f"accuracy {_change(m.get(f'rm/probe_{name}_accuracy_before'), m.get(f'rm/probe_{name}_accuracy'), 3)}."
                   for name in names)


def calibration_section(stage: Stage, run_dir: Path) -> Section | None:
    from pipeline import plots

    calibration = read_json(run_dir / stage.name / "calibration.json")
    if not calibration:
        return None
    m = stage.metrics
    text = (f"Held-out accuracy {_change(m.get('rm/eval_accuracy_before'), m.get('rm/eval_accuracy'), 3)}, "
            f"mean margin {_change(m.get('rm/eval_margin_before'), m.get('rm/eval_margin'), 3)}, expected "
            f"calibration error {_num(m.get('rm/eval_ece'), 3)} on {_num(m.get('data/eval_pairs'))} pairs. "
            "The model's P(chosen wins) = sigmoid(r_chosen - r_rejected)." + _probe_text(m))
    rows = [[b["confidence"], str(b["pairs"]), _num(b["mean_confidence"], 3), _num(b["accuracy"], 3)]
            for b in calibration["bins"]]
    return Section("Reward model calibration", [
        text, Plot("reliability diagram", plots.reliability(calibration["bins"], m.get("rm/eval_ece"))),
        Table(["confidence", "pairs", "mean confidence", "accuracy"], rows),
    ])


def classification_section(stage: Stage, run_dir: Path) -> Section | None:
    """cls: held-out accuracy and macro-F1 before and after, and the confusion matrices (cls/confusion.json)."""
    confusion = read_json(run_dir / stage.name / "confusion.json")
    if not confusion:
        return None
    m, labels = stage.metrics, confusion["labels"]
    blocks = [f"The classifier's predictions on {_num(m.get('data/eval_rows'))} held-out rows, before training (a new "
              "head) and after. Macro-F1 averages the labels' F1 unweighted, so a rare label counts as much as a "
              "common one.",
              Table(["measure", "before → after"],
                    [["accuracy", _change(m.get("cls/eval_accuracy_before"), m.get("cls/eval_accuracy"), 3)],
                     ["macro-F1", _change(m.get("cls/eval_macro_f1_before"), m.get("cls/eval_macro_f1"), 3)]])]
    for when in ("before", "after"):
        if confusion.get(when):
            blocks += [f"Confusion {when} training (rows: the actual label, columns: the predicted one):",
                       Table(["actual \\ predicted", *labels],
                             [[label, *map(str, row)] for label, row in zip(labels, confusion[when])])]
    return Section("Classification", blocks)


def preferences_section(stage: Stage, run_dir: Path, config: dict) -> Section | None:
    from pipeline import plots

    m = stage.metrics
    if m.get("preferences/pairs") is None:
        return None
    prefs = config.get("preferences", {})
    judge = prefs.get("judge", {})
    labels = [["pairs judged", _num(m.get("preferences/pairs"))],
              ["chosen/rejected rows", _num(m.get("preferences/rows"))],
              ["ties", f"{_num(m.get('preferences/ties'))} ({_pct(m.get('preferences/tie_rate'))})"],
              ["unlabelled", _num(m.get("preferences/unlabelled"))],
              ["first response preferred", _pct(m.get("preferences/a_wins"))]]
    if m.get("preferences/order_flip_rate") is not None:
        labels.append(["verdict changed when the order was swapped", _pct(m["preferences/order_flip_rate"])])
    if m.get("preferences/position_bias") is not None:
        labels.append(["position bias removed (mean log-odds for the first-shown response)",
                       _num(m["preferences/position_bias"], 3)])
    blocks = [f"Judge: {judge.get('type')}.", Table(["labels", "value"], labels)]
    agreement = read_json(run_dir / stage.name / "final" / "agreement.json")
    if agreement:
        values = {"raw agreement": agreement["raw"], "Cohen's κ": agreement["kappa"],
                  "tie rate (judge)": agreement["tie_rates"][0], "tie rate (reference)": agreement["tie_rates"][1]}
        flips = agreement.get("order_flip_rates") or (None, None)
        if flips[0] is not None:
            values["order flips (judge)"] = flips[0]
        if agreement.get("ece") is not None:  # older runs' agreement.json has no calibration
            values["calibration error (ECE)"] = agreement["ece"]
        blocks += [f"Agreement with {prefs.get('compare_with')} on the {agreement['pairs']} pairs both labelled "
                   "(Cohen's κ corrects for chance agreement over a / b / tie):",
                   Table(["agreement", "value"], [[k, _num(v, 3)] for k, v in values.items()]),
                   Plot("judge agreement", plots.agreement({k: v for k, v in values.items() if v is not None}))]
    blocks += annotator_blocks(read_json(run_dir / stage.name / "final" / "annotators.json"), m)
    return Section("Preference labels and judge agreement", blocks)


def annotator_blocks(annotators: dict | None, m: dict) -> list:
    """Between the people who labelled (label --web), on the pairs several of them labelled: all of them, then
    each two."""
    if not annotators:
        return []
    rows = [["all annotators (Fleiss' κ)", str(annotators["pairs"]), _pct(annotators["raw"]),
             _num(annotators["kappa"], 3)]]
    rows += [[" & ".join(p["annotators"]) + " (Cohen's κ)", str(p["pairs"]), _pct(p["raw"]), _num(p["kappa"], 3)]
             for p in annotators["pairwise"]]
    dropped = m.get("annotators/dropped_disagreements") or 0
    return [f"Agreement between the {len(annotators['annotators'])} annotators ({', '.join(annotators['annotators'])}) "
            f"on the pairs more than one labelled (overlap {_pct(annotators['overlap'])} of pairs; disagreements: "
            f"{annotators['disagreement']}{f', {dropped} pairs dropped' if dropped else ''}):",
            Table(["annotators", "pairs", "all agree", "κ"], rows)]


def samples_section(stages: list[Stage], run_dir: Path) -> Section | None:
    verdicts = {"a": "after", "b": "before", "tie": "tie", None: "unjudged"}
    blocks = []
    for stage in stages:
        if not REGISTRY[stage.name].evaluated:
            continue
        samples = read_jsonl(run_dir / stage.name / "eval_samples.jsonl")
        if samples:
            rows = [[_clip(s["prompt"]), _clip(s["start"]), _clip(s["policy"]), verdicts.get(s["winner"], s["winner"])]
                    for s in samples[:SAMPLES_SHOWN]]
            blocks += [f"{stage.name}: {min(len(samples), SAMPLES_SHOWN)} of {len(samples)} held-out prompts "
                       f"({stage.name}/eval_samples.jsonl has them all).",
                       Table(["prompt", "before (starting policy)", f"after ({stage.name})", "judge preferred"], rows)]
    return Section("Sample generations, before and after", blocks) if blocks else None


def build(run_dir: Path) -> tuple[str, list[Section]]:
    stages = load_stages(run_dir)
    if not stages:
        raise PipelineError(f"nothing to report: no stage has run in {run_dir}")
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) if (
        run_dir / "config.yaml").exists() else {}
    by_name = {stage.name: stage for stage in stages}
    # In the order of the pipeline: labels, the reward model, then the policies trained against them.
    sections = [
        alignment_section(stages, config), summary_section(stages), loss_section(stages),
        preferences_section(by_name["preferences"], run_dir, config) if "preferences" in by_name else None,
        calibration_section(by_name["rm"], run_dir) if "rm" in by_name else None,
        rounds_section(by_name["iterative_dpo"], run_dir, config) if "iterative_dpo" in by_name else None,
        ppo_section(by_name["ppo"], run_dir) if "ppo" in by_name else None,
        *(online_section(by_name[name], run_dir) for name in ("grpo", "rloo") if name in by_name),
        classification_section(by_name["cls"], run_dir) if "cls" in by_name else None,
        win_rate_section(stages, config), samples_section(stages, run_dir),
    ]
    model = (config.get("model") or {}).get("name_or_path", "?")
    intro = (f"Run directory {run_dir.resolve()}, model {model}, report written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}.")
    return intro, [section for section in sections if section is not None]


# ---------------------------------------------------------------- rendering

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def to_markdown(title: str, intro: str, sections: list[Section]) -> str:
    lines = [f"# {title}", "", intro, "", "The plots are in report.html, next to this file.", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines += ["| " + " | ".join(map(_md_cell, block.header)) + " |",
                          "|" + "---|" * len(block.header)]
                lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
            elif isinstance(block, Plot):
                lines.append(f"*Plot: {block.caption} (report.html)*")
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; white-space: pre-wrap; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
"""


def to_html(title: str, intro: str, sections: list[Section]) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{e(title)}</h1>", f"<p>{e(intro)}</p>"]
    for section in sections:
        parts.append(f"<h2>{e(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in block.header) + "</tr>")
                parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block.rows]
                parts.append("</table>")
            elif isinstance(block, Plot):
                data = base64.b64encode(block.png).decode("ascii")
                parts.append(f"<img alt='{e(block.caption)}' src='data:image/png;base64,{data}'>")
            else:
                parts.append(f"<p>{e(block)}</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write(run_dir: Path) -> tuple[Path, Path]:
    """Write <run_dir>/report.md and report.html, each atomically (a reader never sees half a report)."""
    intro, sections = build(run_dir)
    title = f"Alignment report: {run_dir.resolve().name}"
    md, page = run_dir / "report.md", run_dir / "report.html"
    write_text_atomic(md, to_markdown(title, intro, sections))
    write_text_atomic(page, to_html(title, intro, sections))
    return md, page
