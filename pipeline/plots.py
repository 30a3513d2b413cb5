"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas directly: no pyplot, so no global state and
no display is ever needed (a run on a headless server, or one that imported pyplot elsewhere, draws the same)."""

from __future__ import annotations

import io
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Curve = tuple[list[int], list[float]]  # steps, values
COLORS = {"train": "#1f77b4", "eval": "#d62728", "wins": "#2ca02c", "ties": "#bbbbbb", "losses": "#d62728"}


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _grid(panels: int, width: float = 4.2, height: float = 3.0) -> tuple[Figure, list]:
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[panels:]:
        unused.set_visible(False)
    for axis in axes[:panels]:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # steps: no 0.5 ticks, even for one
        axis.ticklabel_format(axis="y", useOffset=False)  # flat curves (a tiny model's loss) read as plain values
    return figure, list(axes[:panels])


def _line(axis, curve: Curve, label: str, color: str | None = None, marker: bool = False) -> None:
    steps, values = curve
    # A curve of one or two points (eval before and after) is drawn with markers, or it would be invisible.
    axis.plot(steps, values, label=label, color=color, marker="o" if marker or len(steps) <= 2 else None,
              markersize=4)


def _finish(axis, title: str, xlabel: str) -> None:
    """The title, axis label, grid and legend every panel of a grid has."""
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def loss_curves(stages: dict[str, dict[str, Curve]]) -> bytes:
    """One panel per stage: its training loss and, where it evaluated, its held-out loss, against the step."""
    figure, axes = _grid(len(stages))
    for axis, (stage, curves) in zip(axes, stages.items()):
        if "train" in curves:
            _line(axis, curves["train"], "train loss", COLORS["train"])
        if "eval" in curves:
            _line(axis, curves["eval"], "held-out loss", COLORS["eval"], marker=True)
        _finish(axis, stage, "step")
    return _png(figure)


def ppo_curves(curves: dict[str, Curve]) -> bytes:
    """Reward and score, KL and its coefficient, entropy and response length, the two losses: the signs of reward
    hacking (reward up while KL climbs and entropy and diversity collapse) side by side."""
    panels = [
        ("reward", [("ppo/reward_mean", "reward (KL-penalised)"), ("ppo/score_mean", "score")]),
        ("KL to the reference", [("ppo/kl", "KL (nats per response)")]),
        ("entropy", [("ppo/entropy", "entropy (nats per token)")]),
        ("response length", [("ppo/response_length", "tokens")]),
        ("losses", [("ppo/policy_loss", "policy loss"), ("ppo/value_loss", "value loss")]),
    ]
    return _reward_panels(curves, panels, ("ppo/reward_mean", "ppo/reward_std"), "ppo/kl_coef", "iteration")


def online_curves(curves: dict[str, Curve]) -> bytes:
    """grpo's and rloo's curves under the names TRL logs them: the reward (the judge's score, before any KL term),
    KL to the reference, entropy, response length and loss; the same signs of reward hacking as ppo's."""
    panels = [
        ("reward", [("reward", "reward")]),
        ("KL to the reference", [("kl", "KL (nats per token)")]),
        ("entropy", [("entropy", "entropy (nats per token)")]),
        ("response length", [("completions/mean_length", "tokens")]),
        ("loss", [("loss", "loss")]),
    ]
    return _reward_panels(curves, panels, ("reward", "reward_std"), None, "step")


def _reward_panels(curves: dict[str, Curve], panels: list, reward: tuple[str, str], kl_coef: str | None,
                   xlabel: str) -> bytes:
    """One panel per (title, lines) that has a curve; the reward's panel shades ± its std, the KL's shows the KL
    coefficient on a second axis."""
    panels = [(title, [(key, label) for key, label in lines if key in curves]) for title, lines in panels]
    panels = [(title, lines) for title, lines in panels if lines]
    figure, axes = _grid(len(panels), height=2.8)
    mean_key, std_key = reward
    for axis, (title, lines) in zip(axes, panels):
        for key, label in lines:
            _line(axis, curves[key], label)
        if title == "reward" and std_key in curves:
            steps, mean = curves[mean_key]
            std = dict(zip(*curves[std_key]))
            axis.fill_between(steps, [m - std.get(s, 0.0) for s, m in zip(steps, mean)],
                              [m + std.get(s, 0.0) for s, m in zip(steps, mean)], alpha=0.2, label="± std")
        if title == "KL to the reference" and kl_coef in curves:
            twin = axis.twinx()
            _line(twin, curves[kl_coef], "KL coefficient", "#888888")
            twin.set_ylabel("KL coefficient", color="#888888")
        _finish(axis, title, xlabel)
    return _png(figure)


def rounds(panels: dict[str, dict[str, Curve]], losses: dict[int, Curve]) -> bytes:
    """Iterative DPO: per panel, a few measures against the round (pairs decided, reward accuracy, win rate...), and
    each round's DPO loss against its step (every round's trainer counts from step 1)."""
    figure, axes = _grid(len(panels) + bool(losses), height=2.8)
    for axis, (title, curves) in zip(axes, panels.items()):
        for label, curve in curves.items():
            _line(axis, curve, label, marker=True)
        _finish(axis, title, "round")
    if losses:
        for k, curve in losses.items():
            _line(axes[-1], curve, f"round {k}")
        _finish(axes[-1], "DPO loss", "step of the round")
    return _png(figure)


def win_rates(results: dict[str, dict]) -> bytes:
    """Per policy stage, the share of held-out prompts where its answer won, tied or lost against its start's."""
    figure = Figure(figsize=(7.5, 0.7 + 0.6 * len(results)), layout="constrained")
    axis = figure.subplots()
    names = list(results)
    left = [0.0] * len(names)
    for outcome in ("wins", "ties", "losses"):
        shares = [results[n][outcome] / max(1, results[n]["wins"] + results[n]["ties"] + results[n]["losses"])
                  for n in names]
        axis.barh(names, shares, left=left, color=COLORS[outcome], label=outcome)
        left = [a + b for a, b in zip(left, shares)]
    for row, name in enumerate(names):
        rate = results[name]["win_rate"]
        axis.text(1.01, row, "n/a" if rate is None else f"win rate {rate:.0%}", va="center", fontsize=9)
    axis.axvline(0.5, color="black", linewidth=0.8, linestyle=":")
    axis.set_xlim(0, 1)
    axis.invert_yaxis()
    axis.set_xlabel("share of held-out prompts (ties count half in the win rate)")
    axis.legend(ncols=3, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _png(figure)


def reliability(bins: list[dict], ece: float | None) -> bytes:
    """The reward model's reliability diagram: for pairs binned by its confidence in its pick, how often the pick
    was right. A calibrated model's bars touch the diagonal."""
    figure = Figure(figsize=(4.6, 4.0), layout="constrained")
    axis = figure.subplots()
    for row in bins:
        low, high = (float(x) for x in row["confidence"].split("-"))
        if row["pairs"]:
            axis.bar((low + high) / 2, row["accuracy"], width=high - low, color=COLORS["train"], alpha=0.75,
                     edgecolor="white")
            axis.text((low + high) / 2, min(row["accuracy"], 0.93) + 0.02, f"n={row['pairs']}", ha="center",
                      fontsize=8)
    axis.plot([0.5, 1.0], [0.5, 1.0], color="black", linestyle="--", linewidth=1, label="calibrated")
    confident = [row for row in bins if row["pairs"]]
    axis.plot([row["mean_confidence"] for row in confident], [row["accuracy"] for row in confident], "o",
              color=COLORS["eval"], label="mean confidence of the bin")
    axis.set_xlim(0.5, 1.0)
    axis.set_ylim(0, 1.05)
    axis.set_xlabel("confidence in its pick, max(p, 1 - p)")
    axis.set_ylabel("accuracy")
    axis.set_title("held-out pairs" + ("" if ece is None else f" (ECE {ece:.3f})"))
    axis.legend(fontsize=8, loc="lower right")
    return _png(figure)


def agreement(values: dict[str, float]) -> bytes:
    """The judge against the reference labels: raw agreement, Cohen's kappa, and each source's tie rate."""
    figure = Figure(figsize=(6.0, 0.6 + 0.45 * len(values)), layout="constrained")
    axis = figure.subplots()
    names = list(values)
    axis.barh(names, [values[n] for n in names], color=COLORS["train"])
    for row, name in enumerate(names):
        axis.text(max(values[name], 0) + 0.01, row, f"{values[name]:.2f}", va="center", fontsize=9)
    axis.set_xlim(min(0.0, *values.values()), 1.12)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.invert_yaxis()
    return _png(figure)
