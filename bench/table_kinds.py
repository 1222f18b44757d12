"""Benchmark (not a test): test AUC vs stored embedding bytes for every table kind and composition, several
seeds, plus ONNX Runtime CPU latency of each relative to the dense export in the same run (first seed).

    python bench/table_kinds.py --data DATASET_DIR --out bench/results/NAME.json [--seeds 0,1,2]

Every variant starts from the same seed's dense baseline (post-training) unless it is marked "scratch"
(trained from scratch in that form with the baseline's budget). Fine-tunes use one epoch at --ft-lr.
Writes JSON (every run), a Markdown table and a Pareto PNG next to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from recompress.checkpoint import Checkpoint
from recompress.compress.registry import Context, compress, parse_methods
from recompress.data import open_dataset
from recompress.evaluate.latency import measure
from recompress.evaluate.plots import pareto_plot
from recompress.evaluate.predictors import OrtPredictor
from recompress.evaluate.report import fmt_bytes
from recompress.export import export_checkpoint
from recompress.metrics import accuracy_metrics
from recompress.training import TrainConfig, predict, train_dlrm

FT = {"finetune": True}
VARIANTS: list[tuple[str, str, dict]] = [
    ("fp16", "fp16", {}), ("bf16", "bf16", {}), ("int8", "int8", {}), ("int4", "int4", {}),
    ("tt r4", "tt", {"tt_rank": 4}), ("tt r16", "tt", {"tt_rank": 16}), ("tt r16 +ft", "tt", {"tt_rank": 16, **FT}),
    ("hash 4x", "hash", {"ratio": 4}), ("hash 16x +ft", "hash", {"ratio": 16, **FT}),
    ("hash 64x +ft", "hash", {"ratio": 64, **FT}),
    ("qr 4x", "qr", {"ratio": 4}), ("qr 16x +ft", "qr", {"ratio": 16, **FT}),
    ("freqhash 4x", "freqhash", {"ratio": 4}), ("freqhash 8x +ft", "freqhash", {"ratio": 8, **FT}),
    ("lowrank r4", "lowrank", {"rank": 4}), ("lowrank r4,int8", "lowrank,int8", {"rank": 4}),
    ("tt r16 +ft,int8", "tt,int8", {"tt_rank": 16, **FT}), ("hash 16x +ft,int8", "hash,int8", {"ratio": 16, **FT}),
    ("qr 16x +ft,int4", "qr,int4", {"ratio": 16, **FT}), ("freqhash 8x +ft,int4", "freqhash,int4", {"ratio": 8, **FT}),
    ("scratch tt r16", "scratch:tt", {"tt_rank": 16}), ("scratch hash 16x", "scratch:hash", {"ratio": 16}),
    ("scratch hash 16x,int8", "scratch:hash,int8", {"ratio": 16}), ("scratch qr 16x", "scratch:qr", {"ratio": 16}),
]


def test_auc(model, data) -> dict:
    return accuracy_metrics(*predict(model, data, "test"))


def emb_bytes(model) -> int:
    return sum(t.stored_bytes() for t in model.tables.values())


def lookup(model) -> dict:
    return {k: round(sum(t.lookup_cost()[k] for t in model.tables.values()), 1)
            for k in ("bytes_read_gpu", "bytes_read_cpu", "flops")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--min-rows", type=int, default=0, help="tables a scratch variant trains compressed")
    ap.add_argument("--latency-batches", default="1,512")
    ap.add_argument("--only", default=None, help="variant names separated by ;")
    a = ap.parse_args()
    data = open_dataset(a.data)
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = [v for v in VARIANTS if not a.only or v[0] in a.only.split(";")]
    cfg = lambda seed: TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=seed)  # noqa: E731
    runs, lat = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="kinds-"))
    for seed in seeds:
        t0 = time.perf_counter()
        base = train_dlrm(data, cfg(seed), dim=a.dim)
        runs.append({"variant": "dense", "seed": seed, "bytes": emb_bytes(base.model), **test_auc(base.model, data),
                     "lookup": lookup(base.model), "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(runs[-1]), flush=True)
        models = {"dense": base}
        for name, methods, params in variants:
            t0 = time.perf_counter()
            if methods.startswith("scratch:"):
                first, *rest = methods[len("scratch:"):].split(",")
                ck = train_dlrm(data, cfg(seed), dim=a.dim, method=first, method_params=params,
                                method_min_rows=a.min_rows)
                if rest:
                    ck = compress(ck, parse_methods(",".join(rest), params), Context(data, cfg(seed)))
            else:
                ft = TrainConfig(epochs=1, lr=a.ft_lr, batch_size=a.batch_size, seed=seed)
                ck = compress(Checkpoint(copy.deepcopy(base.model), copy.deepcopy(base.spec)),
                              parse_methods(methods, params), Context(data, ft))
            runs.append({"variant": name, "seed": seed, "bytes": emb_bytes(ck.model), **test_auc(ck.model, data),
                         "lookup": lookup(ck.model), "seconds": round(time.perf_counter() - t0, 1),
                         "history": [{k: v for k, v in h.items() if k not in ("finetune",)} for h in ck.spec.history]})
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "history"}), flush=True)
            if seed == seeds[0]:
                models[name] = ck
        if seed == seeds[0]:
            preds = {}
            for name, ck in models.items():
                export_checkpoint(ck, "onnx", tmp / name.replace(" ", "_"), data=data, overwrite=True,
                                  atol=1e-5, rtol=1e-3)
                p = OrtPredictor(tmp / name.replace(" ", "_") / "model.onnx", 2)
                p.name = name
                preds[name] = p
            res = measure(list(preds.values()), data, [int(b) for b in a.latency_batches.split(",")], repeats=100)
            lat = {name: {b: {"p50_ms": v["p50_ms"], "vs_dense": v["p50_ms"] / res["dense"][b]["p50_ms"]}
                          for b, v in per.items()} for name, per in res.items()}
            del models, preds
    summary = summarize(runs, lat)
    out = Path(a.out)
    out.write_text(json.dumps({"args": vars(a), "data": str(data.path), "synthetic": bool(data.meta.get("synthetic")),
                               "summary": summary, "runs": runs, "latency": lat}, indent=2) + "\n")
    pareto_plot([s["variant"] for s in summary], [s["bytes"] for s in summary], [s["auc"] for s in summary],
                out.with_suffix(".png"), xlabel="stored embedding bytes",
                title=f"{Path(a.data).name}: test AUC vs embedding bytes (mean of {len(seeds)} seeds)")
    out.with_suffix(".md").write_text(markdown(summary) + "\n")
    print(markdown(summary))


def summarize(runs: list[dict], lat: dict) -> list[dict]:
    base = {r["seed"]: r for r in runs if r["variant"] == "dense"}
    out = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == name]
        auc = np.array([r["auc"] for r in rs])
        d = np.array([r["auc"] - base[r["seed"]]["auc"] for r in rs])
        out.append({"variant": name, "seeds": len(rs), "auc": float(auc.mean()), "auc_std": float(auc.std()),
                    "d_auc": float(d.mean()), "d_auc_std": float(d.std()),
                    "logloss": float(np.mean([r["logloss"] for r in rs])), "bytes": int(np.mean([r["bytes"] for r in rs])),
                    "smaller": float(base[rs[0]["seed"]]["bytes"] / np.mean([r["bytes"] for r in rs])),
                    "lookup": rs[0].get("lookup"), "latency": lat.get(name)})
    return out


def markdown(summary: list[dict]) -> str:
    batches = list(next(iter(summary))["latency"] or {})
    head = ["variant", "test AUC", "ΔAUC vs dense (paired)", "logloss", "emb bytes", "smaller",
            "GPU bytes read/sample", "lookup FLOPs/sample", *[f"ORT p50 ÷ dense ORT p50, b={b} (>1 = slower)" for b in batches]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        lk = s["lookup"] or {}
        lat = s["latency"] or {}
        lines.append("| " + " | ".join([
            s["variant"], f"{s['auc']:.4f} ± {s['auc_std']:.4f}", f"{s['d_auc']:+.4f} ± {s['d_auc_std']:.4f}",
            f"{s['logloss']:.4f}", fmt_bytes(s["bytes"]), f"{s['smaller']:.1f}x",
            f"{lk.get('bytes_read_gpu', '-')}", f"{lk.get('flops', '-')}",
            *[f"{lat[b]['vs_dense']:.2f}x" if b in lat else "-" for b in batches]]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
