"""The evaluation's speed-vs-quality chart: one labelled point per model (seconds per video against prompt
adherence), so "which model is best and how much faster is it" reads off one picture in the MLflow UI.

Rendered on matplotlib's Agg canvas (no display, no pyplot state), like the curation report."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
# The quality axis, first that applies: prompt adherence (rule-based, no weights) when the prompts follow the sample
# dump's grammar, else caption match from the CLIP scorer.
QUALITY = {"both_accuracy": "colour and direction right (fraction of prompts)",
           "clipsim_mean": "CLIP caption match (mean cosine)"}


def quality_metric(result) -> str:
    """The metric on the quality axis for an EvaluationResult."""
    if any(m.metrics.get("prompts_scored", 0) > 0 for m in result.models):
        return "both_accuracy"
    return "clipsim_mean"


def write_speed_quality_chart(result, path: str | Path) -> Path:
    """Seconds per video (log scale) against the quality metric, each point labelled with its model, its network
    evaluations per video and its speedup against the first model; the axis says when the metric comes from
    untrained weights."""
    metric = quality_metric(result)
    untrained = metric in result.untrained_metrics
    fig = Figure(figsize=(9, 5.5), dpi=DPI, facecolor="white")
    ax = fig.add_subplot(1, 1, 1)
    points = [(m.metrics["seconds_per_video"], m.metrics.get(metric, math.nan), m) for m in result.models]
    shown = [(x, y, m) for x, y, m in points if math.isfinite(x) and x > 0 and math.isfinite(y)]
    for i, (x, y, model) in enumerate(shown):
        reference = model is result.models[0]
        ax.scatter([x], [y], s=60, color="tab:red" if reference else "tab:blue", zorder=3)
        speedup = model.metrics.get("speedup_vs_teacher", math.nan)
        label = (f"{model.name}\n{int(model.metrics['model_evaluations_per_video'])} evals, "
                 + ("reference" if reference else f"{speedup:.1f}x faster" if math.isfinite(speedup) else "n/a"))
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 == 0 else -22), fontsize=8)
    if shown:
        ax.set_xscale("log")
        xs = [x for x, _, _ in shown]
        ax.set_xlim(min(xs) / 1.6, max(xs) * 2.5)  # room for the labels right of the slowest point
    if metric == "both_accuracy":
        ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("seconds per video (log scale; lower is faster)")
    ylabel = f"{metric}: {QUALITY[metric]}"
    if untrained:
        ylabel = f"untrained_{metric}: from untrained weights, NOT meaningful"
    ax.set_ylabel(ylabel, fontsize=9)
    fmt = result.format
    ax.set_title(f"speed vs quality: {len(result.prompts)} prompts per model, {fmt.num_frames} frames, "
                 f"{fmt.size}x{fmt.size} px (higher and further left is better)", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    return path
