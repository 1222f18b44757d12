"""Report folder of a run: results.jsonl / .csv, summary.json, report.md, a self-contained report.html and
Pareto PNGs (accuracy vs bytes, accuracy vs latency) with the frontier marked."""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any

from .atomic import atomic_file

COLUMNS = ["variant", "target", "AUC", "ΔAUC", "logloss", "emb bytes", "smaller", "GPU B read/sample",
           "p50 ms by batch", "latency ÷ baseline", "ORT ÷ torch"]


def _cells(row: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    from .evaluate.report import fmt_bytes
    lat = row.get("p50_ms") or {}
    return [row["variant"], row["target"], f"{row['auc']:.4f}", f"{row['auc'] - ref['auc']:+.4f}", f"{row['logloss']:.4f}",
            fmt_bytes(row["emb_bytes"]), f"{ref['emb_bytes'] / row['emb_bytes']:.1f}x",
            f"{row['bytes_read_gpu']:,.0f}" if row.get("bytes_read_gpu") is not None else "-",
            " / ".join(f"{v:.3f}" for v in lat.values()) or "-",
            " / ".join(f"{v:.2f}" for v in (row.get("latency_ratio") or {}).values()) or "-",
            " / ".join(f"{v:.1f}x" for v in (row.get("speedup_vs_torch") or {}).values()) or "-"]


def reference_row(summary: dict[str, Any], target: str) -> dict[str, Any]:
    return next(r for r in summary["rows"] if r["variant"] == summary["reference"] and r["target"] == target)


def write_reports(summary: dict[str, Any], out: Path) -> dict[str, Path]:
    from rich.console import Console
    from rich.table import Table

    from .evaluate.plots import pareto_plot
    rows = summary["rows"]
    files = {}
    with atomic_file(out / "results.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    files["jsonl"] = out / "results.jsonl"
    flat = ["variant", "target", "method", "auc", "logloss", "emb_bytes", "file_bytes", "bytes_read_gpu", "lookup_flops"]
    batches = list(rows[0].get("p50_ms") or {})
    with atomic_file(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(flat + [f"p50_ms_b{b}" for b in batches] + [f"latency_ratio_b{b}" for b in batches] + ["params"])
        for r in rows:
            w.writerow([r.get(k) for k in flat] + [r.get("p50_ms", {}).get(b) for b in batches]
                       + [r.get("latency_ratio", {}).get(b) for b in batches] + [json.dumps(r["params"])])
    files["csv"] = out / "results.csv"
    with atomic_file(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    files["summary"] = out / "summary.json"

    title = f"{summary['recipe']}: test split" + (" [SYNTHETIC data]" if summary["synthetic"] else "")
    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("variant", "target") else "right")
    body = [_cells(r, reference_row(summary, r["target"])) for r in rows]
    for cells in body:
        table.add_row(*cells)
    Console(width=160).print(table)

    labels = [f"{r['variant']} ({r['target']})" if len({x['target'] for x in rows}) > 1 else r["variant"] for r in rows]
    plots = [pareto_plot(labels, [r["emb_bytes"] for r in rows], [r["auc"] for r in rows],
                         out / "pareto_auc_vs_bytes.png", xlabel="embedding bytes (stored)",
                         title=f"{summary['recipe']}: AUC vs embedding bytes")]
    if batches:
        b = batches[-1]
        plots.append(pareto_plot(labels, [r["latency_ratio"][b] for r in rows], [r["auc"] for r in rows],
                                 out / "pareto_auc_vs_latency.png", logx=False,
                                 xlabel=f"p50 latency ÷ baseline's, batch {b} (same run)",
                                 title=f"{summary['recipe']}: AUC vs latency"))
    files.update({p.stem: p for p in plots})
    note = (f"Data: {summary['data']}" + (" (**SYNTHETIC**)" if summary["synthetic"] else "") +
            f". Latency: p50 per batch size ({', '.join(batches)}), {summary['threads']} threads; "
            "'latency ÷ baseline' is this variant's p50 over the baseline's, measured in the same run.")
    md = [f"# {summary['recipe']}", "", note, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
          *("| " + " | ".join(c) + " |" for c in body), "", *(f"![{p.stem}]({p.name})" for p in plots), ""]
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text("\n".join(md))
    files["md"] = out / "report.md"
    imgs = "".join(f'<p><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"></p>'
                   for p in plots)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body)
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(summary['recipe'])}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;border-bottom:1px solid #ddd;"
            "text-align:right}td:first-child,th:first-child{text-align:left}</style>"
            f"<h1>{html.escape(summary['recipe'])}</h1><p>{html.escape(note)}</p>"
            f"<table><tr>{head}</tr>{trs}</table>{imgs}")
    with atomic_file(out / "report.html") as tmp:
        tmp.write_text(page)
    files["html"] = out / "report.html"
    return files
