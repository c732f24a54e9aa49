"""PNG plots of a run: the metrics over steps, and the data's length histograms.

The only module that imports matplotlib (on the Agg backend: no display, no window, safe on a
server and in a test). It reads rows as ``metrics.jsonl`` holds them (``train.record``: train
rows from ``train_step``, eval rows from ``evaluation_row``) and the length histograms of
``data_audit.json`` (``data.data_audit``); it never imports torch::

    from lora_dpo.plots import plot_metrics
    paths = plot_metrics(rows, Path("runs/a/plots"))   # {"loss": Path(".../loss.png"), ...}

Train curves are noisy (a step sees a few pairs), so each is drawn faint as logged and again
smoothed (``smooth``); held-out points are drawn as they are, on the same axes, since each
averages every held-out pair already.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

# (file name, title, y label, [(metric, legend label)...]): one PNG each, in the report's order.
METRIC_PLOTS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    ("loss", "Loss", "loss per pair", [("loss", "loss")]),
    ("accuracy", "Reward accuracy", "share of pairs", [("rewards/accuracy", "accuracy")]),
    ("margins", "Reward margin (chosen - rejected)", "reward", [("rewards/margins", "margin")]),
    ("rewards", "Chosen and rejected rewards", "reward", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")]),
    ("logps", "Chosen and rejected log-probs (policy)", "summed log-prob (nats)",
     [("logps/chosen", "chosen"), ("logps/rejected", "rejected")]),
    ("lr", "Learning rate", "learning rate", [("lr", "lr")]),
    ("grad_norm", "Gradient norm (before clipping)", "norm", [("grad_norm", "grad norm")]),
    ("tokens_per_s", "Throughput", "tokens/s", [("tokens_per_s", "tokens/s")]),
    ("memory", "Peak memory", "GiB", [("peak_memory_gib", "allocated (GPU) / resident (CPU)"),
                                      ("peak_reserved_gib", "reserved (GPU)")]),
]
SMOOTHED = {"loss", "rewards/accuracy", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
            "logps/rejected", "grad_norm", "tokens_per_s"}
"""Metrics whose train curve gets a smoothed line; lr and memory are not noisy."""
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def smooth(values: Sequence[float], span: int | None = None) -> list[float]:
    """An exponential moving average, debiased like Adam's (so the first points are not pulled
    towards 0): weight 1 - 2 / (span + 1) on the past. The default span is a twentieth of the
    points (at least 1: no smoothing for short runs). Non-finite values are carried over, not
    averaged, so one bad step does not poison the rest of the curve."""
    span = span if span is not None else max(1, len(values) // 20)
    if span <= 1:
        return list(values)
    decay = 1 - 2 / (span + 1)
    out, average, weight = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = decay * average + (1 - decay) * value
            weight = decay * weight + (1 - decay)
        out.append(average / weight if weight else value)
    return out


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must be chosen before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if row.get("split") == split and isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def plot_metrics(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """One PNG per entry of METRIC_PLOTS that has data, in ``out_dir``; returns {name: path}.
    Rows are metrics.jsonl's; a metric no row holds (grad_norm before the first step, reserved
    memory on a CPU) is left out, and a plot with nothing to draw is not written."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, title, ylabel, metrics in METRIC_PLOTS:
        # Fixed margins instead of tight_layout, which draws the figure once more to measure it.
        figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=90)
        figure.subplots_adjust(left=0.13, right=0.97, top=0.9, bottom=0.15)
        drawn = False
        for (key, label), colour in zip(metrics, COLOURS):
            steps, values = _series(rows, "train", key)
            if steps:
                if key in SMOOTHED and len(values) > 20:
                    axes.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
                    axes.plot(steps, smooth(values), color=colour, linewidth=1.8, label=f"train {label} (smoothed)")
                else:
                    axes.plot(steps, values, color=colour, linewidth=1.5, marker="." if len(steps) < 30 else None,
                              label=f"train {label}")
                drawn = True
            eval_steps, eval_values = _series(rows, "eval", key)
            if eval_steps:
                axes.plot(eval_steps, eval_values, color=colour, linestyle="--", marker="o", markersize=5,
                          markerfacecolor="white", label=f"held-out {label}")
                drawn = True
        if drawn:
            axes.set_title(title)
            axes.set_xlabel("step")
            axes.set_ylabel(ylabel)
            axes.grid(alpha=0.3)
            axes.legend(fontsize=8, loc="best" if len(rows) < 2000 else "upper right")  # "best" scans every point
            path = out_dir / f"{name}.png"
            figure.savefig(path)
            written[name] = path
        plt.close(figure)
    return written


def plot_lengths(splits: list[dict[str, Any]], path: Path) -> Path | None:
    """Token-length histograms of prompt, chosen and rejected per split (data_audit.json's
    ``splits``), one row of panels per split; None when no split holds pairs."""
    with_pairs = [split for split in splits if split.get("pairs")]
    if not with_pairs:
        return None
    plt = _pyplot()
    parts = ("prompt", "chosen", "rejected")
    figure, grid = plt.subplots(len(with_pairs), len(parts), figsize=(9, 2.6 * len(with_pairs)), dpi=90,
                                squeeze=False)
    figure.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.16, hspace=0.7, wspace=0.3)
    for row, split in enumerate(with_pairs):
        for column, part in enumerate(parts):
            axes = grid[row][column]
            histogram = split["lengths"][part]
            edges, counts = histogram["edges"], histogram["counts"]
            axes.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge",
                     color=COLOURS[column], edgecolor="white")
            axes.set_title(f"{split['name']}: {part} (mean {histogram['mean']:.0f}, max {histogram['max']})", fontsize=9)
            axes.set_xlabel("tokens", fontsize=8)
            if column == 0:
                axes.set_ylabel("pairs", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
