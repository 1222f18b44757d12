"""Regression gate: compare a run's summary with a baseline summary, per variant and target.

Accuracy may drop by at most ``auc_drop``; stored embedding bytes may grow by at most ``bytes_growth``
(a ratio); latency is compared as the variant's p50 divided by the reference variant's p50 *in the same
run*, so machine speed and noise cancel, and that ratio may grow by at most ``latency_growth``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class Tolerances:
    auc_drop: float = 0.002
    bytes_growth: float = 1.01
    latency_growth: float = 1.5


def read_summary(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        s = json.loads(p.read_text())
        s["rows"][0]["auc"]
    except FileNotFoundError:
        raise UserError(f"baseline {p} does not exist", "write one with 'recompress bench ... --save-baseline FILE'") from None
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise UserError(f"{p} is not a summary.json written by 'recompress bench'", "pass a bench summary") from None
    return s


def compare(new: dict[str, Any], base: dict[str, Any], tol: Tolerances) -> list[dict[str, Any]]:
    """One check per (variant, target, metric); ``ok`` False marks a regression."""
    checks = []
    index = {(r["variant"], r["target"]): r for r in new["rows"]}
    for b in base["rows"]:
        k = (b["variant"], b["target"])
        n = index.get(k)
        if n is None:
            checks.append({"variant": k[0], "target": k[1], "metric": "present", "baseline": "yes", "new": "missing",
                           "limit": "present", "ok": False})
            continue
        checks.append({"variant": k[0], "target": k[1], "metric": "auc", "baseline": b["auc"], "new": n["auc"],
                       "limit": f">= {b['auc'] - tol.auc_drop:.4f}", "ok": n["auc"] >= b["auc"] - tol.auc_drop})
        checks.append({"variant": k[0], "target": k[1], "metric": "emb_bytes", "baseline": b["emb_bytes"],
                       "new": n["emb_bytes"], "limit": f"<= {b['emb_bytes'] * tol.bytes_growth:,.0f}",
                       "ok": n["emb_bytes"] <= b["emb_bytes"] * tol.bytes_growth})
        for batch, ratio in (b.get("latency_ratio") or {}).items():
            got = (n.get("latency_ratio") or {}).get(batch)
            if got is None:
                continue
            checks.append({"variant": k[0], "target": k[1], "metric": f"latency ratio b={batch}", "baseline": ratio,
                           "new": got, "limit": f"<= {ratio * tol.latency_growth:.3f}",
                           "ok": got <= ratio * tol.latency_growth})
    return checks


def diff_table(checks: list[dict[str, Any]]) -> Any:
    from rich.table import Table
    t = Table(title="regression gate (vs baseline)")
    for c in ("variant", "target", "metric", "baseline", "new", "limit", "result"):
        t.add_column(c, justify="left" if c in ("variant", "target", "metric") else "right")
    fmt = lambda x: f"{x:,.4f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)  # noqa: E731
    for c in checks:
        t.add_row(c["variant"], c["target"], c["metric"], fmt(c["baseline"]), fmt(c["new"]), c["limit"],
                  "ok" if c["ok"] else "[bold red]REGRESSION[/bold red]")
    return t
