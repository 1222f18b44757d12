"""Benchmark (not a test): AUC / logloss vs embedding width d for
(i) baseline trained at d, (ii) MLET from scratch (hidden k), (iii) post-training MLET from the d=64
checkpoint (its fine-tune keeps the best validation checkpoint, as `recompress checkpoint` does), and
(iv) lowrank (truncated SVD, rank d) from the same d=64 checkpoint; several seeds. At each d, post-training
MLET (n x d stored) is compared with lowrank (n x d + d x 64 stored, about the same bytes) by a paired
bootstrap on the same test rows, averaged over seeds.

    python bench/mlet_sweep.py --data DATASET_DIR --out bench/results/NAME.json [--seeds 0,1,2]

Writes JSON (every run) and a PNG plot next to it. Numbers are test-split metrics.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
from recompress.compress.registry import Context, compress, parse_methods

from recompress.checkpoint import Checkpoint
from recompress.data import open_dataset
from recompress.evaluation import evaluate_model
from recompress.families import get_family
from recompress.metrics import accuracy_metrics
from recompress.stats import paired_auc_delta
from recompress.training import TrainConfig, train_model

DLRM = get_family("dlrm")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dims", default="4,8,16,32,64")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--hidden", type=int, default=64, help="MLET hidden width k")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    a = ap.parse_args()
    data = open_dataset(a.data)
    dims = [int(x) for x in a.dims.split(",")]
    top_d = max(dims)
    runs = []
    labels = np.asarray(data.arrays("test")[2])
    probs = {}

    def record(kind, d, seed, model, extra=None):
        probs[kind, d, seed] = evaluate_model(model, data).values
        m = accuracy_metrics(labels, probs[kind, d, seed])
        emb = sum(t.stored_bytes() for t in model.tables.values())
        runs.append({"kind": kind, "dim": d, "seed": seed, "auc": m["auc"], "logloss": m["logloss"],
                     "embedding_bytes": emb, **(extra or {})})
        print(f"{kind:>14} d={d:<3} seed={seed} auc={m['auc']:.4f} logloss={m['logloss']:.4f}", flush=True)

    for seed in [int(s) for s in a.seeds.split(",")]:
        cfg = TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=seed)
        ft = TrainConfig(epochs=a.ft_epochs, lr=a.ft_lr, batch_size=a.batch_size, seed=seed, keep_best=True)
        base_top = None
        for d in dims:
            t0 = time.perf_counter()
            ck = train_model(DLRM, data, cfg, {"dim": d})
            record("baseline", d, seed, ck.model, {"seconds": time.perf_counter() - t0})
            if d == top_d:
                base_top = ck
            t0 = time.perf_counter()
            ck = train_model(DLRM, data, cfg, {"dim": d}, mlet_hidden=max(a.hidden, d))
            record("mlet_scratch", d, seed, ck.model, {"hidden": max(a.hidden, d), "seconds": time.perf_counter() - t0})
        for d in dims:
            if d == top_d:
                continue
            t0 = time.perf_counter()
            ck = compress(Checkpoint(copy.deepcopy(base_top.model), copy.deepcopy(base_top.spec)),
                          parse_methods("mlet", {"dim": d}), Context(data, ft))
            keep = ck.spec.history[-1]["finetune"].get("keep_best", {})
            record("mlet_post", d, seed, ck.model, {"seconds": time.perf_counter() - t0,
                                                    "energy_kept": ck.spec.history[-1]["energy_kept"],
                                                    "best_step": keep.get("best_step"), "val_curve": keep.get("curve")})
            ck = compress(Checkpoint(copy.deepcopy(base_top.model), copy.deepcopy(base_top.spec)),
                          parse_methods("lowrank", {"rank": d}), Context())
            record("lowrank", d, seed, ck.model)
    summary = {}
    for kind in ("baseline", "mlet_scratch", "mlet_post", "lowrank"):
        for d in dims:
            xs = [r for r in runs if r["kind"] == kind and r["dim"] == d]
            if xs:
                summary[f"{kind}/{d}"] = {k: [float(np.mean([r[k] for r in xs])), float(np.std([r[k] for r in xs]))]
                                          for k in ("auc", "logloss")} | {"embedding_bytes": xs[0]["embedding_bytes"],
                                                                           "n": len(xs)}
    seeds = [int(s) for s in a.seeds.split(",")]
    for d in dims:
        if d != top_d:
            summary[f"mlet_post_minus_lowrank/{d}"] = paired_auc_delta(
                labels, np.stack([probs["mlet_post", d, s] for s in seeds]),
                np.stack([probs["lowrank", d, s] for s in seeds]))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"data": a.data, "synthetic": bool(data.meta.get("synthetic")), "args": vars(a)}
    out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2) + "\n")
    plot(summary, dims, out.with_suffix(".png"), Path(a.data).name)
    for k, v in summary.items():
        if "minus" in k:
            print(f"{k:>28}: {v['delta']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]")
        else:
            print(f"{k:>28}: AUC {v['auc'][0]:.4f} ± {v['auc'][1]:.4f}  logloss {v['logloss'][0]:.4f} ± {v['logloss'][1]:.4f}")


def plot(summary: dict, dims: list[int], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for kind in ("baseline", "mlet_scratch", "mlet_post", "lowrank"):
        xs = [d for d in dims if f"{kind}/{d}" in summary]
        if xs:
            m = [summary[f"{kind}/{d}"]["auc"][0] for d in xs]
            s = [summary[f"{kind}/{d}"]["auc"][1] for d in xs]
            ax.errorbar(xs, m, yerr=s, marker="o", capsize=3, label=kind + (" (rank d, width 64)" if kind == "lowrank" else ""))
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("embedding width d (lowrank: rank)")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(f"MLET vs baseline: {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
