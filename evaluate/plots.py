"""Pareto plots: accuracy against a cost (bytes or latency), frontier marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats (lower cost and higher-or-equal accuracy), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    best, out = float("-inf"), []
    for i in order:
        if points[i][1] > best:
            out.append(i)
            best = points[i][1]
    return out


def pareto_plot(labels: list[str], cost: list[float], acc: list[float], path: Path, *, xlabel: str,
                ylabel: str = "test AUC", title: str = "", logx: bool = True) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    front = frontier(list(zip(cost, acc)))
    ax.scatter(cost, acc, color="tab:gray", zorder=2)
    ax.plot([cost[i] for i in front], [acc[i] for i in front], "-o", color="tab:red", zorder=3, label="Pareto frontier")
    for x, y, name in zip(cost, acc, labels):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
