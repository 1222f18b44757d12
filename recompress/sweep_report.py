"""Report folder of a run: results.jsonl / .csv, summary.json, report.md, a self-contained report.html and
Pareto PNGs (accuracy vs bytes, accuracy vs latency) with the frontier marked."""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any

from .metrics import METRICS
from .outputs import marker, output_file


def columns(metric: str) -> list[str]:
    return ["variant", "target", metric, f"Δ{metric} vs baseline [95% CI]", f"Δ{metric} vs same-budget control [95% CI]",
            "emb bytes", "smaller", "GPU B read/lookup", "p50 ms by batch", "latency ÷ baseline [95% CI]",
            "ORT ÷ torch [95% CI]"]


TRAINED = "†"


def _delta(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"{d['delta']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" + ("" if d["significant"] else " ~")


def _ratios(per: dict[str, Any] | None, suffix: str = "") -> str:
    if not per:
        return "-"
    return " / ".join(f"{r['ratio']:.2f}{suffix} [{r['lo']:.2f}, {r['hi']:.2f}]" + (" noisy" if r["noisy"] else "")
                      for r in per.values())


def _cells(row: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    from .evaluate.report import fmt_bytes
    lat = row.get("p50_ms") or {}
    return [row["variant"] + (f" {TRAINED}" if row["trained"] else ""), row["target"],
            f"{row['metrics'][row['primary']]:.4f}", _delta(row.get("delta")), _delta(row.get("delta_control")),
            fmt_bytes(row["emb_bytes"]),
            f"{ref['emb_bytes'] / row['emb_bytes']:.1f}x",
            f"{row['bytes_read_gpu']:,.0f}" if row.get("bytes_read_gpu") is not None else "-",
            " / ".join(f"{v:.3f}" for v in lat.values()) or "-",
            _ratios(row.get("latency_ratio")), _ratios(row.get("speedup_vs_torch"), "x")]


def reference_row(rows: list[dict[str, Any]], target: str) -> dict[str, Any]:
    return next(r for r in rows if r["variant"] == "baseline" and r["target"] == target)


def notes(study: dict[str, Any]) -> list[str]:
    """The sentences a reader needs to read a study's table right (plain text, rendered to Markdown and HTML)."""
    rows = study["rows"]
    metric = study["primary"]
    batches = list(rows[0].get("p50_ms") or {})
    out = [f"Data: {study['data']}" + (" (SYNTHETIC)" if study["synthetic"] else "") +
           f"; {study['test_rows']:,} test rows; {study['family']} models, primary metric {metric}."]
    if study.get("baseline"):
        out.append(f"Baseline: {study['baseline']}.")
    if batches:
        out.append(f"Latency: p50 per batch size ({', '.join(batches)}), {study['threads']} threads, every backend "
                   "in short alternating turns in one run; ratios are medians' ratios with a bootstrap 95% interval.")
    out.append(f"Δ{metric}: paired bootstrap over the same test rows (1,000 resamples); '~' marks a difference inside "
               "the 95% interval of zero (noise).")
    if metric in METRICS and not METRICS[metric].higher_is_better:
        out.append(f"{metric} is better lower: a positive Δ is a loss, and the Pareto frontier keeps the lowest "
                   f"{metric} at each cost.")
    if any(r["trained"] for r in rows):
        out.append(f"{TRAINED} trains after compressing, so part of its change is extra training: compare it with its "
                   "same-budget control, the baseline fine-tuned with the same budget (the 'vs same-budget control' "
                   "column).")
    noisy = [r["variant"] for r in rows for x in (r.get("latency_ratio") or {}).values() if x["noisy"]]
    if noisy:
        out.append(f"WARNING: the machine was noisy while measuring some latency ratios ({', '.join(sorted(set(noisy)))}):"
                   " their 95% intervals are wider than 1.3x (marked 'noisy'); the regression gate passes or fails"
                   " a ratio only when all of its interval is on one side of the limit.")
    return out


def write_reports(summary: dict[str, Any], out: Path) -> dict[str, Path]:
    from rich.console import Console
    from rich.table import Table

    from .evaluate.plots import pareto_plot
    from .gate import studies
    rows = summary["rows"]
    files: dict[str, Path] = {}

    def plot(labels: list[str], cost: list[float], acc: list[float], path: Path, **kw: Any) -> Path:
        with output_file(path, owner=out) as tmp:
            pareto_plot(labels, cost, acc, tmp, **kw)
        return path

    def write(name: str, text: str) -> Path:
        with output_file(out / name, owner=out) as tmp:
            tmp.write_text(text)
        return out / name

    slim = [{k: v for k, v in r.items() if k != "predictions"} for r in rows]
    files["jsonl"] = write("results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in slim))
    flat = ["study", "variant", "target", "method", "trained", "control", "primary", "emb_bytes", "file_bytes",
            "bytes_read_gpu", "lookup_flops"]
    batches = sorted({b for r in rows for b in (r.get("p50_ms") or {})}, key=int)
    metric_names = list(dict.fromkeys(m for r in rows for m in r["metrics"]))
    with output_file(out / "results.csv", owner=out) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(flat + metric_names + ["d_primary", "d_primary_lo", "d_primary_hi", "d_primary_control"]
                   + [f"p50_ms_b{b}" for b in batches] + [f"latency_ratio_b{b}" for b in batches] + ["params"])
        for r in rows:
            d, dc = r.get("delta") or {}, r.get("delta_control") or {}
            w.writerow([r.get(k) for k in flat] + [r["metrics"].get(m) for m in metric_names]
                       + [d.get("delta"), d.get("lo"), d.get("hi"), dc.get("delta")]
                       + [(r.get("p50_ms") or {}).get(b) for b in batches]
                       + [(r.get("latency_ratio") or {}).get(b, {}).get("ratio") for b in batches]
                       + [json.dumps(r["params"])])
    files["csv"] = out / "results.csv"
    files["summary"] = write("summary.json", json.dumps({"recompress": marker("summary"), **summary}, indent=2,
                                                        default=str) + "\n")
    md = [f"# {summary['recipe']}", ""]
    page = [f"<h1>{html.escape(summary['recipe'])}</h1>"]
    plots = []
    several = len(studies(summary)) > 1
    for name, study in studies(summary).items():
        srows, metric = study["rows"], study["primary"]
        cols = columns(metric)
        body = [_cells(r, reference_row(srows, r["target"])) for r in srows]
        table = Table(title=f"{name}: test split" + (" [SYNTHETIC data]" if study["synthetic"] else ""))
        for c in cols:
            table.add_column(c, justify="left" if c in ("variant", "target") else "right")
        for cells in body:
            table.add_row(*cells)
        Console(width=200, stderr=True).print(table)
        many = len({x["target"] for x in srows}) > 1
        labels = [f"{r['variant']} ({r['target']})" if many else r["variant"] for r in srows]
        err = [((r["delta"]["delta"] - r["delta"]["lo"]), (r["delta"]["hi"] - r["delta"]["delta"])) if r.get("delta")
               else (0.0, 0.0) for r in srows]
        acc = [r["metrics"][metric] for r in srows]
        stem = (f"{name}_" if several else "") + "pareto_" + metric.replace("@", "")
        better = {"higher_is_better": METRICS[metric].higher_is_better if metric in METRICS else True}
        mine = [plot(labels, [r["emb_bytes"] for r in srows], acc, out / f"{stem}_vs_bytes.png",
                            xlabel="embedding bytes (stored)", ylabel=f"test {metric}", bytes_axis=True, err=err,
                            title=f"{name}: {metric} vs embedding bytes", **better)]
        sb = list(srows[0].get("p50_ms") or {})
        if sb:
            b = sb[-1]
            mine.append(plot(labels, [r["latency_ratio"][b]["ratio"] for r in srows], acc,
                                    out / f"{stem}_vs_latency.png", logx=False, err=err, ylabel=f"test {metric}",
                                    xlabel=f"p50 latency ÷ baseline's, batch {b} (same run)",
                                    title=f"{name}: {metric} vs latency", **better))
        plots += mine
        text = notes(study)
        md += ([f"## {name}", ""] if several else []) + [*text, "", "| " + " | ".join(cols) + " |",
                                                        "|" + "---|" * len(cols),
                                                        *("| " + " | ".join(c) + " |" for c in body), "",
                                                        *(f"![{p.stem}]({p.name})" for p in mine), ""]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body)
        imgs = "".join(f'<p><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                       "</p>" for p in mine)
        page += ([f"<h2>{html.escape(name)}</h2>"] if several else []) + [
            "".join(f"<p>{html.escape(t)}</p>" for t in text), f"<table><tr>{head}</tr>{trs}</table>{imgs}"]
    files.update({p.stem: p for p in plots})
    files["md"] = write("report.md", "\n".join(md))
    files["html"] = write("report.html", f"<!doctype html><meta charset='utf-8'><title>{html.escape(summary['recipe'])}"
                          "</title><style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;border-bottom:"
                          "1px solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}</style>"
                          + "".join(page))
    return files
