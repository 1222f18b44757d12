"""Pareto plots: accuracy against a cost (bytes or latency), frontier marked, every point and label legible.

Labels are placed one by one at the first of several offsets around their point where they overlap no
other label, no point and no axis edge (a leader line joins a label pushed further out); the legend sits
below the axes, so it never covers a point; byte axes are labelled in KiB/MiB/GiB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

TIE = 1e-4  # accuracy differences below this are ties (a 1e-6 better point is not a frontier point)
OFFSETS = [(6, 6), (6, -12), (-6, 6), (-6, -12), (10, -3), (-10, -3), (0, 12), (0, -16),
           (18, 16), (18, -22), (-18, 16), (-18, -22), (30, 0), (-30, 0), (0, 26), (0, -30),
           (40, 24), (40, -30), (-40, 24), (-40, -30)]


def frontier(points: list[tuple[float, float]], tie: float = TIE, higher_is_better: bool = True) -> list[int]:
    """Indices of points no other point beats (cost no higher and accuracy better by more than ``tie``), by cost."""
    if not higher_is_better:
        points = [(c, -a) for c, a in points]
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    best, out = -math.inf, []
    for i in order:
        if points[i][1] > best + tie:
            out.append(i)
            best = points[i][1]
    return out


def _bytes_label(x: float, _pos: float = 0) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if abs(x - round(x)) < 1e-9 or x >= 10 else f"{x:.1f} {unit}"
        x /= 1024
    return str(x)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _place_labels(fig, ax, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str]) -> list:
    """Each label at the first offset that overlaps nothing placed so far (else the least overlapping one);
    returns the labels' boxes."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pts = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
    taken = [matplotlib.transforms.Bbox.from_extents(px - 4, py - 4, px + 4, py + 4) for px, py in pts]
    placed = []
    for i in sorted(range(len(labels)), key=lambda i: -ys[i]):
        best = None
        for dx, dy in OFFSETS:
            leader = {"arrowstyle": "-", "color": "0.6", "lw": 0.6} if abs(dx) + abs(dy) > 20 else None
            ann = ax.annotate(labels[i], (xs[i], ys[i]), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                              ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                              arrowprops=leader)
            box = ann.get_window_extent(renderer).expanded(1.04, 1.15)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            score = sum(_overlaps(box, t) for t in taken) + (0 if inside else 10)
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, ann, box)
            else:
                ann.remove()
            if score == 0:
                break
        taken.append(best[2])
        placed.append(best[2])
    return placed


def pareto_plot(labels: list[str], cost: list[float], acc: list[float], path: Path, *, xlabel: str,
                ylabel: str = "test AUC", title: str = "", logx: bool = True, bytes_axis: bool = False,
                err: list[tuple[float, float]] | None = None, higher_is_better: bool = True) -> Path:
    """Scatter of (cost, accuracy) with the Pareto frontier; ``err`` (lower, upper) accuracy error bars."""
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=130)
    front = frontier(list(zip(cost, acc)), higher_is_better=higher_is_better)
    if err is not None:
        lower = [max(0.0, e[0]) for e in err]
        upper = [max(0.0, e[1]) for e in err]
        ax.errorbar(cost, acc, yerr=[lower, upper], fmt="none", ecolor="0.75", elinewidth=1, zorder=1,
                    label="95% CI of the difference to the baseline")
    ax.scatter(cost, acc, color="tab:gray", s=22, zorder=2, label="variant")
    ax.plot([cost[i] for i in front], [acc[i] for i in front], "-o", color="tab:red", ms=5, zorder=3,
            label="Pareto frontier")
    if logx:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=2 if bytes_axis else 10, numticks=8))
        ax.xaxis.set_minor_formatter(NullFormatter())
    if bytes_axis:
        ax.xaxis.set_major_formatter(FuncFormatter(_bytes_label))
    lo_x, hi_x = min(cost), max(cost)
    if logx and lo_x > 0:
        ax.set_xlim(lo_x / 2.2, hi_x * 2.2)
    else:
        pad = (hi_x - lo_x) * 0.25 or abs(hi_x) * 0.25 or 1.0
        ax.set_xlim(lo_x - pad, hi_x + pad)
    lo_y, hi_y = min(acc), max(acc)
    pad = (hi_y - lo_y) * 0.2 or 0.01
    ax.set_ylim(lo_y - pad, hi_y + pad)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.canvas.draw()
    _place_labels(fig, ax, cost, acc, labels)
    plt.setp(ax.get_xticklabels(), fontsize=8)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
