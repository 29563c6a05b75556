"""The eval report's human half: a markdown table (one row per spec) and the accuracy/tokens Pareto plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evals.scoring import IOU_THR, SpecScore


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _percent(value: float | None) -> str:
    return _cell(None if value is None else 100 * value, ".1f")


def markdown_table(scores: Sequence[SpecScore]) -> str:
    """Accuracy (%) overall and per group value, recall@IOU_THR (%), mean IoU, ground truth in a crop (%),
    mean visual tokens computed and in the reason context, mean crops, p50/p95 latency (ms)."""
    # group columns: every (field, value) any spec has, fields in --by order, values as scored (sorted)
    groups = list(dict.fromkeys((f, v) for s in scores for f, values in s.by.items() for v in values))
    header = [
        "spec",
        "accuracy",
        *(value for _, value in groups),
        f"recall@{IOU_THR}",
        "mean IoU",
        "in a crop",
        "visual tokens computed",
        "in context",
        "crops",
        "p50 ms",
        "p95 ms",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in scores:
        by = [s.by[f][v].accuracy if v in s.by.get(f, {}) else None for f, v in groups]
        cells = [
            s.name,
            _percent(s.accuracy),
            *map(_percent, by),
            _percent(s.region_recall),
            _cell(s.mean_iou, ".2f"),
            _percent(s.crop_recall),
            _cell(s.visual_tokens_computed, ".0f"),
            _cell(s.visual_tokens_in_context, ".0f"),
            _cell(s.crops, ".1f"),
            _cell(s.p50_ms, ".0f"),
            _cell(s.p95_ms, ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (tokens, accuracy) points that no other point beats with as few tokens, by tokens."""
    frontier: list[int] = []
    best = float("-inf")
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        if points[i][1] > best:
            frontier.append(i)
            best = points[i][1]
    return frontier


def plot_pareto(scores: Sequence[SpecScore], path: Path, title: str) -> None:
    """Accuracy (%) against visual tokens per query in the reason context (log x), one labelled point per
    spec and the Pareto frontier as a line; specs with nothing answered are left out."""
    # the object API renders with Agg when saving, without pyplot's global state (safe in a headless CLI)
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    labels: dict[tuple[float, float], list[str]] = {}  # specs on the same point share one label
    for s in scores:
        if s.accuracy is not None and s.visual_tokens_in_context:
            labels.setdefault((s.visual_tokens_in_context, 100 * s.accuracy), []).append(s.name)
    points = sorted(labels)
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.add_subplot()
    frontier = [points[i] for i in pareto_frontier(points)]
    if len(frontier) > 1:  # one point is its own frontier: no line to draw
        ax.plot(*zip(*frontier), color="tab:orange", lw=1.5, zorder=1, label="Pareto frontier")
        ax.legend(loc="best", fontsize=8)
    if points:
        ax.scatter(*zip(*points), s=36, color="tab:blue", zorder=2)
    for x, y in points:
        # centred above its point: neighbours along a log axis rarely overlap; not part of the layout, so
        # a long label never squeezes the axes
        label = ax.annotate("\n".join(labels[x, y]), (x, y), xytext=(0, 7), textcoords="offset points",
                            ha="center", va="bottom", fontsize=8)  # fmt: skip
        label.set_in_layout(False)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.3)
    accuracies = [y for _, y in points] or [0.0]
    pad = max(5.0, 0.15 * (max(accuracies) - min(accuracies)))
    low, high = max(0.0, min(accuracies) - pad), min(100.0, max(accuracies) + 2 * pad)  # room for labels
    ax.set_ylim(low - 0.03 * (high - low), high)  # a point at 0% stays whole
    ax.set_xlabel("visual tokens per query in the reason context (log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    figure.savefig(path, dpi=120)
