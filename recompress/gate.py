"""Regression gate: compare a run's summary with a baseline summary, per variant and target.

Every check ends in one of four states, and only ``ok`` passes:
- ``ok``: measured and within tolerance;
- ``regression``: measured and outside it;
- ``missing``: the baseline has the measurement and the new run does not (a variant, its accuracy, its
  bytes, or its latency at a batch size): a gate never passes on what it did not check;
- ``unchecked``: measured, but too noisy to decide: a latency ratio whose 95% interval straddles its
  limit. A latency ratio is ``ok`` only if its whole interval is within the limit, and a ``regression``
  only if its whole interval is above it, so noise can neither pass nor fail a check by luck; how wide
  the interval may be is not fixed, but a ratio wider than ``evaluate.latency.NOISY`` is flagged.

The family's primary metric (AUC for CTR models, NDCG@10 for sequential ones) may drop by at most ``metric_drop`` (a
metric that is better lower, dlrm_hstu's MSE, may rise by at most that); the difference is also given
with a paired-bootstrap interval when both summaries hold predictions for the same test rows. Stored
embedding bytes may grow by at most ``bytes_growth`` (a ratio). Latency is compared as the variant's p50
divided by the reference variant's p50 *in the same run*, so machine speed cancels; that ratio may grow
by at most ``latency_growth``. Explicit zeros are honoured.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .metrics import METRICS

STATES = ("ok", "regression", "missing", "unchecked")


@dataclass(frozen=True)
class Tolerances:
    metric_drop: float = 0.002
    bytes_growth: float = 1.01
    latency_growth: float = 1.5

    @classmethod
    def resolve(cls, cli: dict[str, float | None], recipe: dict[str, Any]) -> Tolerances:
        """CLI value if given (0 included), else the recipe's ``[gate]`` value, else the default."""
        out = {}
        for name, default in asdict(cls()).items():
            given = cli.get(name)
            out[name] = float(given if given is not None else recipe.get(name, default))
            if out[name] < 0:
                raise UserError(f"gate tolerance {name} = {out[name]} is negative", "tolerances are >= 0")
        return cls(**out)


def read_summary(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        s = json.loads(p.read_text())
        s["rows"][0]["metrics"], s["rows"][0]["primary"]
    except FileNotFoundError:
        raise UserError(f"baseline {p} does not exist", "write one with 'recompress bench ... --save-baseline FILE'") from None
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise UserError(f"{p} is not a summary.json written by this version of 'recompress bench'",
                        "write a new baseline with 'recompress bench ... --save-baseline FILE'") from None
    return s


def _check(variant: str, target: str, metric: str, base: Any, new: Any, limit: str, state: str,
           note: str = "") -> dict[str, Any]:
    return {"variant": variant, "target": target, "metric": metric, "baseline": base, "new": new, "limit": limit,
            "state": state, "ok": state == "ok", "note": note}


def studies(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A run's studies by name (a one-recipe run is its own single study)."""
    return {s.get("study"): s for s in summary.get("studies", [summary])}


def compare(new: dict[str, Any], base: dict[str, Any], tol: Tolerances,
            labels: dict[str, np.ndarray | None] | None = None) -> list[dict[str, Any]]:
    """One check per (study, variant, target, measurement) of the baseline; ``labels`` by study, for the
    paired interval of click models' AUC (ranking records carry their own truth)."""
    from .stats import paired_from_records
    checks = []
    index = {(r.get("study"), r["variant"], r["target"]): r for r in new["rows"]}
    new_studies, base_studies = studies(new), studies(base)
    for b in base["rows"]:
        study, t = b.get("study"), b["target"]
        v = b["variant"] if len(base_studies) == 1 else f"{study}: {b['variant']}"
        n = index.get((study, b["variant"], t))
        if n is None:
            checks.append(_check(v, t, "present", "yes", "missing", "present", "missing"))
            continue
        primary = b.get("primary", "auc")
        got = (n.get("metrics") or {}).get(primary)
        want = b["metrics"][primary]
        if got is None:
            checks.append(_check(v, t, primary, want, None, "measured", "missing"))
        else:
            note = ""
            same = study in new_studies and new_studies[study].get("fingerprint") == base_studies[study].get("fingerprint")
            if same and labels is not None and n.get("predictions") and b.get("predictions"):
                d = paired_from_records(primary, n["predictions"], b["predictions"], labels.get(study))
                note = f"Δ {d['delta']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" + ("" if d["significant"] else " (within noise)")
            if METRICS[primary].higher_is_better if primary in METRICS else True:
                floor = want - tol.metric_drop
                checks.append(_check(v, t, primary, want, got, f">= {floor:.4f}", "ok" if got >= floor else "regression",
                                     note))
            else:  # e.g. MSE: may rise by at most metric_drop
                ceiling = want + tol.metric_drop
                checks.append(_check(v, t, primary, want, got, f"<= {ceiling:.4f}",
                                     "ok" if got <= ceiling else "regression", note))
        if n.get("emb_bytes") is None:
            checks.append(_check(v, t, "emb_bytes", b["emb_bytes"], None, "measured", "missing"))
        else:
            cap = b["emb_bytes"] * tol.bytes_growth
            checks.append(_check(v, t, "emb_bytes", b["emb_bytes"], n["emb_bytes"], f"<= {cap:,.0f}",
                                 "ok" if n["emb_bytes"] <= cap else "regression"))
        for batch, ref in (b.get("latency_ratio") or {}).items():
            metric = f"latency ratio b={batch}"
            r = (n.get("latency_ratio") or {}).get(batch)
            cap = ref["ratio"] * tol.latency_growth
            if r is None:
                checks.append(_check(v, t, metric, ref["ratio"], None, f"<= {cap:.3f}", "missing"))
                continue
            shown = f"{r['ratio']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
            noise = " (noisy machine)" if r.get("noisy") else ""
            if r["hi"] <= cap:
                state, note = "ok", noise.strip(" ()")
            elif r["lo"] > cap:
                state, note = "regression", noise.strip(" ()")
            else:
                state, note = "unchecked", "its 95% interval straddles the limit" + noise
            checks.append(_check(v, t, metric, ref["ratio"], shown, f"<= {cap:.3f}", state, note))
    return checks


def diff_table(checks: list[dict[str, Any]]) -> Any:
    from rich.table import Table
    t = Table(title="regression gate (vs baseline)")
    for c in ("variant", "target", "metric", "baseline", "new", "limit", "result", "note"):
        t.add_column(c, justify="left" if c in ("variant", "target", "metric", "note") else "right")
    fmt = lambda x: "-" if x is None else f"{x:,.4f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)
    style = {"ok": "ok", "regression": "[bold red]REGRESSION[/bold red]", "missing": "[bold red]MISSING[/bold red]",
             "unchecked": "[bold yellow]UNCHECKED[/bold yellow]"}
    for c in checks:
        t.add_row(c["variant"], c["target"], c["metric"], fmt(c["baseline"]), fmt(c["new"]), c["limit"],
                  style[c["state"]], c["note"])
    return t
