"""Readable tables for results, and deltas against a baseline results file (with confidence intervals)."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.table import Table

from recompress.errors import UserError
from recompress.metrics import METRICS
from recompress.stats import paired_from_records


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def fmt_ratio(r: dict[str, Any], suffix: str = "x") -> str:
    """``2.31x [2.20, 2.45]``, or the same marked as noisy."""
    text = f"{r['ratio']:.2f}{suffix} [{r['lo']:.2f}, {r['hi']:.2f}]"
    return text + " (noisy)" if r.get("noisy") else text


def fmt_delta(d: dict[str, Any]) -> str:
    """``+0.0012 [-0.0008, +0.0031], within noise``."""
    verdict = "significant" if d["significant"] else "within noise"
    return f"{d['delta']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}], {verdict}"


def primary_accuracy(r: dict[str, Any]) -> dict[str, Any]:
    acc = r["accuracy"]
    return acc.get("onnxruntime") or acc.get("torch") or next(iter(acc.values()))


def results_table(r: dict[str, Any]) -> Table:
    d = r["data"]
    t = Table(title=f"{r['artifact']['path']} on {d['path']}" + (" [SYNTHETIC data]" if d["synthetic"] else ""))
    t.add_column("metric")
    t.add_column("value", justify="right")
    split = d.get("split", "test")
    where = split if d.get("protocol") in (None, "pointwise") else \
        f"{split}, {d['protocol']}" + (" ranking" if d["protocol"] in ("full", "sampled") else "") + \
        (f" vs {d['negatives']} negatives" if d.get("negatives") else "")
    for backend, a in r["accuracy"].items():
        for name, v in a.items():
            if name in METRICS:
                t.add_row(f"{name} ({backend}, {where})", f"{v:.4f}")
    if r.get("export_vs_checkpoint"):
        t.add_row(f"{r['primary']}, export - checkpoint (paired 95% CI)", fmt_delta(r["export_vs_checkpoint"]))
    b = r["bytes"]
    t.add_row("embedding bytes", fmt_bytes(b["embeddings"]))
    if b.get("embeddings_exported") not in (None, b["embeddings"]):
        t.add_row("embedding bytes as exported (materialized)", fmt_bytes(b["embeddings_exported"]))
    t.add_row("dense bytes", fmt_bytes(b["dense"]))
    t.add_row("file bytes", fmt_bytes(b["file"]))
    lk = (r.get("lookup") or {}).get("per_sample")
    if lk:
        t.add_row("embedding bytes read / lookup (GPU 32 B sectors)", f"{lk['bytes_read_gpu']:,.0f} B")
        t.add_row("embedding bytes read / lookup (CPU 64 B lines)", f"{lk['bytes_read_cpu']:,.0f} B")
        t.add_row("lookup FLOPs / lookup", f"{lk['flops']:,.0f}")
    lat = r.get("latency")
    if lat:
        per_call = f", {lat['candidates']} candidates each" if lat.get("candidates") else ""
        for backend, per in lat["backends"].items():
            for bs, v in per.items():
                t.add_row(f"{backend} batch {bs}{per_call} p50 / p99 ({lat['threads']} threads)",
                          f"{v['p50_ms']:.3f} / {v['p99_ms']:.3f} ms")
        for backend, per in lat["speedup_vs_torch"].items():
            for bs, x in per.items():
                t.add_row(f"{backend} speed-up vs torch, batch {bs} (95% CI, same run)", fmt_ratio(x))
    return t


def paired_delta(new: dict[str, Any], base: dict[str, Any], labels: np.ndarray | None) -> dict[str, Any]:
    """Paired-bootstrap Δ of the primary metric of two results files on the same test rows."""
    rows = lambda r, key: r["data"].get(key, "test" if key == "split" else None)  # results before --split: test
    for key in ("fingerprint", "split", "rows", "protocol", "negatives", "users"):
        if rows(new, key) != rows(base, key):
            raise UserError(f"the baseline was evaluated on other rows ({key} {base['data'].get(key)} vs "
                            f"{new['data'].get(key)})", "compare results computed on the same dataset and protocol")
    if not new.get("predictions") or not base.get("predictions"):
        raise UserError("the baseline results file holds no predictions, so the difference has no confidence interval",
                        "re-create it with this version of 'recompress evaluate --json'")
    return paired_from_records(new.get("primary", "auc"), new["predictions"], base["predictions"], labels)


def compare_table(new: dict[str, Any], base: dict[str, Any], delta: dict[str, Any]) -> Table:
    """Deltas new - base: the primary metric with its paired 95% interval ``delta`` (``paired_delta``), other
    metrics as differences, bytes and latency as ratios."""
    t = Table(title="compared with baseline (new - baseline; 95% CI, paired on the same test rows)")
    for c in ("metric", "baseline", "new", "change"):
        t.add_column(c, justify="right" if c != "metric" else "left")
    a, b = primary_accuracy(new), primary_accuracy(base)
    primary = new.get("primary", "auc")
    for k in a:
        if k in METRICS and k in b:
            change = fmt_delta(delta) if k == primary else f"{a[k] - b[k]:+.4f}"
            t.add_row(k, f"{b[k]:.4f}", f"{a[k]:.4f}", change)
    for k in ("embeddings", "file"):
        x, y = new["bytes"][k], base["bytes"][k]
        t.add_row(f"{k} bytes", fmt_bytes(y), fmt_bytes(x), f"{x / y:.3f}x" if y else "-")
    nl, bl = new.get("latency", {}).get("backends", {}), base.get("latency", {}).get("backends", {})
    for backend in sorted(set(nl) & set(bl)):
        for bs in sorted(set(nl[backend]) & set(bl[backend]), key=int):
            x, y = nl[backend][bs]["p50_ms"], bl[backend][bs]["p50_ms"]
            t.add_row(f"{backend} b={bs} p50 (separate runs)", f"{y:.3f} ms", f"{x:.3f} ms", f"{x / y:.2f}x")
    return t
