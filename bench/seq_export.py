"""Benchmark (not a test): the sequential ONNX exports against torch eager on this CPU, ratios from one run.

    python bench/seq_export.py --out bench/results/seq_export.json [--threads 2] [--parts forms,amortized]
        [--models sasrec,hstu,ranker] [--lengths 50,200] [--counts 1,16,128,512] [--merge]

Models are Beauty-sized (the 12,101 items drawn, of which a synthetic set keeps ~12,000; SASRec and HSTU d = 50, 2 blocks, 1 head; the ranker d = 64, 2
heads; max_len = the L measured, since a graph reads windows of its max_len) with freshly initialized weights: latency does not depend on the weights. Histories are
full-length (no padding, the most work) and drawn at random with 16 rotating inputs, like
``recompress evaluate``'s latency (``evaluate/latency.py``: alternating turns, settle calls, medians
and bootstrap intervals over rounds). Every export is parity-checked against the model, as
``recompress export`` does; graphs take per-row candidates ([batch, M]: each history its own).

- ``forms``: ORT with the softmax attention as one ``Attention`` node (fused) vs MatMul/Softmax
  (decomposed) vs torch eager, batches of 1/64/512 histories with 101 candidates each (the sampled
  protocol's request), L = 50; HSTU's decomposed graph vs torch likewise.
- ``amortized``: one request (one history of L in {50, 200}, M in {1, 16, 128, 512} candidates) through
  the amortized graph (history computed once) and the naive one (once per candidate), in ORT and torch
  (the ranker's amortized graph in both attention forms).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from recompress.evaluate.latency import ROTATE, measure
from recompress.evaluate.predictors import OrtPredictor, TorchPredictor
from recompress.export import export_checkpoint

from recompress.checkpoint import Checkpoint
from recompress.data import open_dataset
from recompress.data.synthetic_sequences import make_synthetic_sequences
from recompress.families import get_family
from recompress.tables import DenseTable

ITEMS = 12_101
EXTRA_FORMS = {"ranker": [("amortized", "decomposed")]}  # next to the target's default form (fused)
MODELS = {"sasrec": {"dim": 50, "heads": 1}, "hstu": {"dim": 50, "heads": 1, "time_bias": False},  # Beauty has no times
          "ranker": {"dim": 64, "heads": 2}}


def model(name: str, data, max_len: int) -> Checkpoint:
    fam = get_family(name)
    spec = fam.new_spec(data, {**MODELS[name], "max_len": max_len, "blocks": 2})
    m = fam.build(spec, {t.name: DenseTable(t.rows, t.dim) for t in spec.tables})
    fam.init(m, 0)
    with torch.no_grad():
        for t in m.tables.values():
            t.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return Checkpoint(m.eval(), spec, None)


def requests(batch: int, length: int, m: int, seed: int, items: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"history": rng.integers(1, items + 1, (batch, length)), "candidates": rng.integers(1, items + 1, (batch, m))}
            for _ in range(ROTATE)]


def export(ck: Checkpoint, folder: Path, **opts) -> dict:
    t0 = time.perf_counter()
    man = export_checkpoint(ck, "onnx", folder, opts=opts, samples=64)
    print(f"  exported {folder.name} in {time.perf_counter() - t0:.0f} s, parity {man['parity']['max_abs_diff']:.1e}")
    return man


def forms(work: Path, data, threads: int, repeats: int, out: dict, save, models: list[str], *_: list[int]) -> None:
    for name, variants in (("sasrec", ("fused", "decomposed")), ("ranker", ("fused", "decomposed")), ("hstu", ("decomposed",))):
        if name not in models:
            continue
        ck = model(name, data, 50)
        preds = [TorchPredictor(ck.model, threads, name="torch")]
        ops = {}
        for form in variants:
            man = export(ck, work / f"{name}-{form}", attention=form, layout="per-row")
            preds.append(OrtPredictor(work / f"{name}-{form}" / man["file"], threads, name=f"ort-{form}"))
            ops[form] = man["ops"]
        pairs = [("torch", p.name) for p in preds[1:]] + ([("ort-decomposed", "ort-fused")] if len(variants) > 1 else [])
        print(f"{name}: attention forms")
        lat = measure(preds, lambda b: requests(b, 50, 101, b, data.num_items), [1, 64, 512], repeats, pairs)
        out[name] = {"length": 50, "candidates": 101, "ops": ops, **lat}
        save()


def amortized(work: Path, data, threads: int, repeats: int, out: dict, save, models: list[str],
              lengths: list[int], counts: list[int]) -> None:
    for name in models:
        out.setdefault(name, {})
        for length in lengths:  # a model reads windows of its max_len: one model per L
            ck = model(name, data, length)
            preds = [TorchPredictor(ck.model, threads, name="torch-amortized"),
                     TorchPredictor(ck.model, threads, name="torch-naive", scoring="naive")]
            forms = {}
            for scoring, attention in (("amortized", None), ("naive", None), *EXTRA_FORMS.get(name, ())):
                label = f"ort-{scoring}" + (f"-{attention}" if attention else "")
                man = export(ck, work / f"{name}-{length}-{label}", scoring=scoring, attention=attention, layout="per-row")
                preds.append(OrtPredictor(work / f"{name}-{length}-{label}" / man["file"], threads, name=label))
                forms[label] = man["attention"]
            pairs = [("ort-naive", "ort-amortized"), ("torch-naive", "torch-amortized"),
                     ("torch-amortized", "ort-amortized"), *((p.name, "ort-amortized") for p in preds[4:])]
            out[name]["attention"] = forms
            for m in counts:
                print(f"{name}: L = {length}, M = {m}")
                lat = measure(preds, lambda b, L=length, M=m: requests(b, L, M, M, data.num_items), [1], repeats, pairs)
                cps = {p: m / (v["1"]["p50_ms"] / 1e3) for p, v in lat["backends"].items()}
                out[name][f"L{length}_M{m}"] = {"length": length, "candidates": m, "candidates_per_s": cps, **lat}
                save()


def fmt(r: dict) -> str:
    return f"{r['ratio']:.2f}× [{r['lo']:.2f}, {r['hi']:.2f}]" + (" noisy" if r.get("noisy") else "")


def report(result: dict) -> str:
    """Markdown tables of the JSON (docs/benchmarks.md quotes them)."""
    lines = [f"Threads: {result['threads']} per backend; torch {result['torch']}, onnxruntime {result['onnxruntime']}.", ""]
    if result.get("forms"):
        lines += [("| model | batch | torch p50 ms | ORT fused p50 ms | ORT decomposed p50 ms | torch ÷ ORT fused | "
                   "torch ÷ ORT decomposed | decomposed ÷ fused |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, x in result["forms"].items():
            be, ra = x["backends"], x["ratios"]
            for b in be["torch"]:
                p50 = [f"{be[k][b]['p50_ms']:.2f}" if k in be else "–" for k in ("torch", "ort-fused", "ort-decomposed")]
                rat = [fmt(ra[k][b]) if k in ra else "–"
                       for k in ("torch/ort-fused", "torch/ort-decomposed", "ort-decomposed/ort-fused")]
                lines.append(f"| {name} | {b} | {' | '.join(p50)} | {' | '.join(rat)} |")
        lines.append("")
    if result.get("amortized"):
        lines += [("| model | L | M | candidates/s ORT amortized | ORT naive | torch amortized | torch naive | "
                   "amortized speed-up, ORT | amortized speed-up, torch | torch ÷ ORT (amortized) |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, x in result["amortized"].items():
            for key, y in x.items():
                if not key.startswith("L"):  # "attention" (forms per graph), "note"
                    continue
                c, ra = y["candidates_per_s"], y["ratios"]
                lines.append(f"| {name} | {y['length']} | {y['candidates']} | {c['ort-amortized']:,.0f} | "
                             f"{c['ort-naive']:,.0f} | {c['torch-amortized']:,.0f} | {c['torch-naive']:,.0f} | "
                             f"{fmt(ra['ort-naive/ort-amortized']['1'])} | {fmt(ra['torch-naive/torch-amortized']['1'])} | "
                             f"{fmt(ra['torch-amortized/ort-amortized']['1'])} |")
                for k in ra:
                    if k.startswith("ort-amortized-"):
                        lines.append(f"|  | | | {k.split('/')[0]}: {c[k.split('/')[0]]:,.0f} | "
                                     f"÷ default: {fmt(ra[k]['1'])} | | | | | |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--parts", default="forms,amortized")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--lengths", default="50,200", help="amortized: history lengths L")
    ap.add_argument("--counts", default="1,16,128,512", help="amortized: candidates per request M")
    ap.add_argument("--merge", action="store_true", help="update --out in place (other models' results kept)")
    ap.add_argument("--report-only", action="store_true", help="write the Markdown tables of --out and stop")
    a = ap.parse_args()
    if a.report_only:
        Path(a.out).with_suffix(".md").write_text(report(json.loads(Path(a.out).read_text())) + "\n")
        return
    work = Path(tempfile.mkdtemp(prefix="seq-export-"))
    data = open_dataset(make_synthetic_sequences(work / "items", users=200, items=ITEMS, clusters=40, mean_len=5))
    old = json.loads(Path(a.out).read_text()) if a.merge and Path(a.out).exists() else {}
    result = {**old, "threads": a.threads, "repeats": a.repeats, "items": data.num_items, "models": MODELS,
              "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__}
    parts = {"forms": forms, "amortized": amortized}

    def save() -> None:  # after every step
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")

    for part in a.parts.split(","):
        result.setdefault(part, {})
        parts[part](work, data, a.threads, a.repeats, result[part], save, a.models.split(","),
                    [int(x) for x in a.lengths.split(",")], [int(x) for x in a.counts.split(",")])
    Path(a.out).with_suffix(".md").write_text(report(result) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
