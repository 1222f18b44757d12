"""Benchmark (not a test): a scaling sweep of SASRec and HSTU, after "Scaling Sequential Recommendation
Models with Transformers" (Zivic et al.): NDCG@10 and eval loss vs non-embedding parameters and vs
training FLOPs, several seeds, with a power-law fit; one curve repeated with int8 item rows (the same
trained models, quantized) and with a 16x hashed item table trained from scratch.

    python bench/scaling.py --data DIR --out bench/results/scaling.json [--seeds 0,1,2] [--epochs 15]

- Sizes: (d, blocks, heads) from 16/1/1 to 128/4/2, the same for both families.
- Non-embedding parameters: every parameter outside the item and position tables.
- Training FLOPs: 6 x non-embedding parameters per trained position (forward + backward), plus the
  attention's 12 x L x d x blocks and the scoring of the target and negatives (6 x d each), times the
  positions actually trained (the runs stop on validation); an estimate, like the paper's.
- Eval loss: the mean cross-entropy of each test user's next item under a softmax over all items
  (scores divided by the model's temperature), the same measure for both families.
- Fit: log NDCG@10 = log a + b log N by least squares over sizes; the exponent's 95% interval is a
  bootstrap over seeds (each resample picks one seed per size).
Writes JSON, a Markdown table and PNG plots next to it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from recompress.compress.registry import Context, compress, fresh_tables, parse_methods

from recompress.data import open_dataset
from recompress.evaluation import evaluate_model
from recompress.families import get_family
from recompress.training import TrainConfig, train_model

SIZES = [(16, 1, 1), (32, 1, 1), (48, 2, 1), (64, 2, 2), (96, 3, 2), (128, 4, 2)]


def non_embedding(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tables."))


def trained_positions(data, max_len: int) -> int:
    """Positions with a target per epoch: each user's training part minus one, capped at max_len."""
    n_train = np.diff(data.offsets) - 2
    return int(np.minimum(np.maximum(n_train - 1, 0), max_len).sum())


def eval_loss(model, data) -> float:
    """Mean softmax cross-entropy of the test target over all items (temperature as trained)."""
    family = get_family(model.family)
    hp = model.hparams
    tau = hp["temperature"] if hp["loss"] == "sampled-softmax" else 1.0
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for inputs, (target, _) in family.eval_batches(hp, data, "test", "full"):
            scores = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})[:, 1:] / tau
            total += float(torch.nn.functional.cross_entropy(scores, torch.from_numpy(target) - 1, reduction="sum"))
            count += len(target)
    return total / count


def record(ck, data, name: str, size: tuple[int, int, int], seed: int, variant: str, seconds: float, a) -> dict:
    d, blocks, _ = size
    family = get_family(name)
    train = ck.spec.metrics["train"]
    epochs_run = train["steps"] / family.steps_per_epoch(data, a.batch_size)
    n = non_embedding(ck.model)
    negs = ck.model.hparams["negatives"]
    per_position = 6 * n + 12 * a.max_len * d * blocks + 6 * d * (1 + negs)
    full = evaluate_model(ck.model, data, "test", "full").metrics(("ndcg@10", "hr@10"))
    return {"model": name, "size": list(size), "seed": seed, "variant": variant, "non_embedding_params": n,
            "emb_bytes": sum(t.stored_bytes() for t in ck.model.tables.values()), "epochs_run": round(epochs_run, 2),
            "train_flops": float(per_position * trained_positions(data, a.max_len) * epochs_run),
            "ndcg@10": full["ndcg@10"], "hr@10": full["hr@10"], "eval_loss": eval_loss(ck.model, data),
            "seconds": round(seconds, 1)}


def run(data, name: str, size: tuple[int, int, int], seed: int, variant: str, a) -> list[dict]:
    """Train one (family, size, seed); the dense run of the repeated family also yields its int8 record
    (row-wise int8 of the same trained model, so the int8 curve differs from dense only by quantization)."""
    d, blocks, heads = size
    family = get_family(name)
    cfg = TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=seed, keep_best=True, checks_per_epoch=1,
                      patience=3)
    hp = {"dim": d, "blocks": blocks, "heads": heads, "max_len": a.max_len, "dropout": a.dropout}
    make = fresh_tables("hash", {"ratio": 16.0}, 0, seed) if variant == "hash16x" else None
    t0 = time.perf_counter()
    ck = train_model(family, data, cfg, hp, make_table=make)
    out = [record(ck, data, name, size, seed, variant, time.perf_counter() - t0, a)]
    if variant == "dense" and name == a.variants_model:
        out.append(record(compress(ck, parse_methods("int8"), Context()), data, name, size, seed, "int8", 0.0, a))
    return out


def fit(runs: list[dict], key: str = "non_embedding_params", metric: str = "ndcg@10", resamples: int = 2000) -> dict:
    """Power-law fit metric = a N^b over sizes, b's 95% interval by resampling one seed per size."""
    sizes = sorted({r[key] for r in runs})
    groups = [[r for r in runs if r[key] == s] for s in sizes]
    x = np.log([s for s in sizes])
    y = np.log([np.mean([r[metric] for r in g]) for g in groups])
    b, loga = np.polyfit(x, y, 1)
    rng = np.random.default_rng(0)
    boot = [np.polyfit(x, np.log([g[rng.integers(len(g))][metric] for g in groups]), 1)[0] for _ in range(resamples)]
    lo, hi = np.quantile(boot, [0.025, 0.975])
    resid = y - (loga + b * x)
    return {"exponent": float(b), "lo": float(lo), "hi": float(hi), "a": float(np.exp(loga)),
            "residuals": [round(float(v), 4) for v in resid]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="sasrec,hstu")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--variants-model", default="sasrec", help="the family whose curve is repeated compressed")
    ap.add_argument("--sizes", default=",".join("/".join(map(str, s)) for s in SIZES),
                    help="model sizes as DIM/BLOCKS/HEADS, comma-separated")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: rebuild curves, plot and table from the runs already in --out (a sweep cut short)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sizes = [tuple(int(x) for x in s.split("/")) for s in a.sizes.split(",")]
    data = open_dataset(a.data)
    out = Path(a.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    done = {(r["model"], tuple(r["size"]), r["seed"], r["variant"]) for r in runs}
    # seed-major, so that a sweep cut short still has every curve (with fewer seeds)
    plan = [(m, s, seed, v) for seed in map(int, a.seeds.split(",")) for s in sizes
            for m, v in [*((m, "dense") for m in a.models.split(",")), (a.variants_model, "hash16x")]]
    for name, size, seed, variant in plan:
        if (name, size, seed, variant) in done or a.report_only:
            continue
        for r in run(data, name, size, seed, variant, a):
            runs.append(r)
            print(json.dumps(r), flush=True)
        out.write_text(json.dumps({"args": vars(a), "runs": runs}, indent=2) + "\n")  # resumable
    curves = {}
    for name, variant in dict.fromkeys((r["model"], r["variant"]) for r in runs):
        rs = [r for r in runs if r["model"] == name and r["variant"] == variant]
        curves[f"{name}/{variant}"] = {"ndcg_vs_params": fit(rs), "points": summarize(rs)}
    out.write_text(json.dumps({"args": vars(a), "runs": runs, "curves": curves}, indent=2) + "\n")
    plot(curves, out)
    out.with_suffix(".md").write_text(markdown(curves) + "\n")
    print(markdown(curves))


def summarize(rs: list[dict]) -> list[dict]:
    out = []
    for size in dict.fromkeys(tuple(r["size"]) for r in rs):
        g = [r for r in rs if tuple(r["size"]) == size]
        out.append({"size": list(size), "non_embedding_params": g[0]["non_embedding_params"], "seeds": len(g),
                    **{k: [float(np.mean([r[k] for r in g])), float(np.std([r[k] for r in g]))]
                       for k in ("ndcg@10", "hr@10", "eval_loss", "train_flops", "epochs_run")}})
    return out


def markdown(curves: dict) -> str:
    lines = []
    for name, c in curves.items():
        f = c["ndcg_vs_params"]
        lines += [f"**{name}**: NDCG@10 ∝ N^{f['exponent']:.3f} (95% CI {f['lo']:.3f} to {f['hi']:.3f}); "
                  f"log residuals by size {f['residuals']}", "",
                  "| d / blocks / heads | non-embedding params | NDCG@10 | HR@10 | eval loss | training FLOPs | epochs |",
                  "|---|---|---|---|---|---|---|"]
        for p in c["points"]:
            lines.append(f"| {'/'.join(map(str, p['size']))} | {p['non_embedding_params']:,} | "
                         f"{p['ndcg@10'][0]:.4f} ± {p['ndcg@10'][1]:.4f} | {p['hr@10'][0]:.4f} ± {p['hr@10'][1]:.4f} | "
                         f"{p['eval_loss'][0]:.3f} ± {p['eval_loss'][1]:.3f} | {p['train_flops'][0]:.2e} | "
                         f"{p['epochs_run'][0]:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot(curves: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), dpi=120)
    for name, c in curves.items():
        pts = c["points"]
        n = [p["non_embedding_params"] for p in pts]
        for ax, key, x in ((axes[0], "ndcg@10", n), (axes[1], "eval_loss", n),
                           (axes[2], "ndcg@10", [p["train_flops"][0] for p in pts])):
            ax.errorbar(x, [p[key][0] for p in pts], yerr=[p[key][1] for p in pts], marker="o", capsize=3, label=name)
        f = c["ndcg_vs_params"]
        xs = np.geomspace(min(n), max(n), 50)
        axes[0].plot(xs, f["a"] * xs ** f["exponent"], "--", color="0.6", lw=0.8)
    for ax, xl, yl in ((axes[0], "non-embedding parameters", "test NDCG@10 (full ranking)"),
                       (axes[1], "non-embedding parameters", "eval loss (softmax over all items)"),
                       (axes[2], "training FLOPs (estimate)", "test NDCG@10 (full ranking)")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a short range
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))


if __name__ == "__main__":
    main()
