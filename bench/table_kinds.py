"""Benchmark (not a test): test AUC vs stored embedding bytes for every table kind and composition, several
seeds, plus ONNX Runtime CPU latency of each relative to the dense export in the same run (first seed).

    python bench/table_kinds.py --data DATASET_DIR --out bench/results/NAME.json [--seeds 0,1,2]

Every variant starts from the same seed's dense baseline (post-training) unless it is marked "scratch"
(trained from scratch in that form with the baseline's budget). Fine-tunes (+ft) use one epoch at --ft-lr
and keep their best validation checkpoint, as `recompress checkpoint` does; "dense +ft" is the dense
baseline fine-tuned with that same budget, the control every +ft variant is compared with. ΔAUC is the
mean over seeds of the paired difference on the same test rows, with a paired-bootstrap 95% interval
over test rows. Exports use the user-default parity tolerances. Writes JSON, a Markdown table and a
Pareto PNG next to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from recompress.compress.registry import Context, compress, fresh_tables, parse_methods
from recompress.evaluate.latency import ROTATE, measure
from recompress.evaluate.plots import pareto_plot
from recompress.evaluate.predictors import OrtPredictor
from recompress.evaluate.report import fmt_bytes
from recompress.export import export_checkpoint

from recompress.checkpoint import Checkpoint
from recompress.data import open_dataset
from recompress.evaluation import evaluate_model
from recompress.families import get_family
from recompress.metrics import accuracy_metrics
from recompress.stats import paired_auc_delta
from recompress.training import TrainConfig, train_model

DLRM = get_family("dlrm")

FT = {"finetune": True}
CONTROL = "dense +ft"
VARIANTS: list[tuple[str, str, dict]] = [
    (CONTROL, "finetune", {}),
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
    ap.add_argument("--repeats", type=int, default=100)
    a = ap.parse_args()
    data = open_dataset(a.data)
    seeds = [int(s) for s in a.seeds.split(",")]
    cfg = lambda seed: TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=seed)
    labels = np.asarray(data.arrays("test")[2])
    runs, probs, lat = [], {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="kinds-"))

    def record(name: str, seed: int, ck: Checkpoint, seconds: float) -> None:
        p = evaluate_model(ck.model, data).values
        probs[name, seed] = p
        runs.append({"variant": name, "seed": seed, "bytes": emb_bytes(ck.model), **accuracy_metrics(labels, p),
                     "lookup": lookup(ck.model), "seconds": round(seconds, 1),
                     "history": [{k: v for k, v in h.items() if k != "finetune"} for h in ck.spec.history]})
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "history"}), flush=True)

    for seed in seeds:
        t0 = time.perf_counter()
        base = train_model(DLRM, data, cfg(seed), {"dim": a.dim})
        record("dense", seed, base, time.perf_counter() - t0)
        models = {"dense": base}
        for name, methods, params in VARIANTS:
            t0 = time.perf_counter()
            if methods.startswith("scratch:"):
                first, *rest = methods[len("scratch:"):].split(",")
                ck = train_model(DLRM, data, cfg(seed), {"dim": a.dim},
                                 make_table=fresh_tables(first, params, a.min_rows, seed),
                                 history=[{"method": first, "params": params, "from_scratch": True}])
                if rest:
                    ck = compress(ck, parse_methods(",".join(rest), params), Context(data, cfg(seed)))
            else:
                ft = TrainConfig(epochs=1, lr=a.ft_lr, batch_size=a.batch_size, seed=seed, keep_best=True)
                ck = compress(Checkpoint(copy.deepcopy(base.model), copy.deepcopy(base.spec)),
                              parse_methods(methods, params), Context(data, ft))
            record(name, seed, ck, time.perf_counter() - t0)
            if seed == seeds[0]:
                models[name] = ck
        if seed == seeds[0]:
            preds = []
            for name, ck in models.items():
                folder = tmp / name.replace(" ", "_").replace(",", "+")
                export_checkpoint(ck, "onnx", folder, data=data)
                preds.append(OrtPredictor(folder / "model.onnx", 2, name))
            hp = base.spec.hparams
            res = measure(preds, lambda b: DLRM.latency_inputs(hp, data, b, ROTATE),
                          [int(b) for b in a.latency_batches.split(",")],
                          a.repeats, [(p.name, "dense") for p in preds if p.name != "dense"])
            lat = {name: {b: {"p50_ms": v["p50_ms"],
                              "vs_dense": res["ratios"].get(f"{name}/dense", {}).get(b, {"ratio": 1.0, "lo": 1.0,
                                                                                       "hi": 1.0, "noisy": False})}
                          for b, v in per.items()} for name, per in res["backends"].items()}
            del models, preds
    summary = summarize(runs, lat, labels, probs, seeds)
    out = Path(a.out)
    out.write_text(json.dumps({"args": vars(a), "data": str(data.path), "synthetic": bool(data.meta.get("synthetic")),
                               "test_rows": int(len(labels)), "summary": summary, "runs": runs, "latency": lat},
                              indent=2) + "\n")
    err = [(s["d_auc"]["delta"] - s["d_auc"]["lo"], s["d_auc"]["hi"] - s["d_auc"]["delta"]) for s in summary]
    pareto_plot([s["variant"] for s in summary], [s["bytes"] for s in summary], [s["auc"] for s in summary],
                out.with_suffix(".png"), xlabel="stored embedding bytes", bytes_axis=True, err=err,
                title=f"{Path(a.data).name}: test AUC vs embedding bytes (mean of {len(seeds)} seeds)")
    out.with_suffix(".md").write_text(markdown(summary) + "\n")
    print(markdown(summary))


def summarize(runs: list[dict], lat: dict, labels: np.ndarray, probs: dict, seeds: list[int]) -> list[dict]:
    base = {r["seed"]: r for r in runs if r["variant"] == "dense"}
    out = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == name]
        auc = np.array([r["auc"] for r in rs])
        mine = np.stack([probs[name, s] for s in seeds])
        row = {"variant": name, "seeds": len(rs), "auc": float(auc.mean()), "auc_std": float(auc.std()),
               "d_auc": paired_auc_delta(labels, mine, np.stack([probs["dense", s] for s in seeds])),
               "d_auc_seed_std": float(np.std([r["auc"] - base[r["seed"]]["auc"] for r in rs])),
               "d_auc_control": (paired_auc_delta(labels, mine, np.stack([probs[CONTROL, s] for s in seeds]))
                                 if "+ft" in name and name != CONTROL else None),
               "logloss": float(np.mean([r["logloss"] for r in rs])), "bytes": int(np.mean([r["bytes"] for r in rs])),
               "smaller": float(base[rs[0]["seed"]]["bytes"] / np.mean([r["bytes"] for r in rs])),
               "lookup": rs[0].get("lookup"), "latency": lat.get(name)}
        out.append(row)
    return out


def _delta(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['delta']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" + ("" if d["significant"] else " ~")


def markdown(summary: list[dict]) -> str:
    batches = list(next(iter(summary))["latency"] or {})
    head = ["variant", "test AUC (mean ± std over seeds)", "ΔAUC vs dense [95% CI]", "ΔAUC vs dense +ft [95% CI]",
            "logloss", "emb bytes", "smaller", "GPU bytes read/sample", "lookup FLOPs/sample",
            *[f"ORT p50 ÷ dense, b={b} [95% CI]" for b in batches]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        lk = s["lookup"] or {}
        lat = s["latency"] or {}
        cells = [f"{lat[b]['vs_dense']['ratio']:.2f}x [{lat[b]['vs_dense']['lo']:.2f}, {lat[b]['vs_dense']['hi']:.2f}]"
                 + (" noisy" if lat[b]["vs_dense"]["noisy"] else "") if b in lat else "-" for b in batches]
        lines.append("| " + " | ".join([
            s["variant"], f"{s['auc']:.4f} ± {s['auc_std']:.4f}", _delta(s["d_auc"]), _delta(s["d_auc_control"]),
            f"{s['logloss']:.4f}", fmt_bytes(s["bytes"]), f"{s['smaller']:.1f}x",
            f"{lk.get('bytes_read_gpu', '-')}", f"{lk.get('flops', '-')}", *cells]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
