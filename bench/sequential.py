"""Benchmark (not a test): SASRec, HSTU and the appended-candidate ranker on real sequences, several seeds.

    python bench/sequential.py --data DIR [--data DIR ...] --out bench/results/sequential.json \
        [--models sasrec,hstu,ranker] [--seeds 0,1,2] [--epochs 30]

Each (dataset, model, seed) trains from scratch with the family's defaults (SASRec.pytorch's and
generative-recommenders' settings; dropout 0.5 as the SASRec paper uses on the sparse Amazon sets),
keeping the best validation checkpoint (NDCG@10, checked after every epoch, stopping after 3 checks
without gain), then is evaluated on the test users by full ranking over all items and by the sampled
protocol (100 negatives the user never had). Records seconds per epoch, full-ranking evaluation seconds
and peak resident memory (time them with the machine otherwise idle; `--epochs 1` is enough for speed). Writes JSON and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from recompress.data import open_dataset
from recompress.evaluation import evaluate_model
from recompress.families import get_family
from recompress.training import TrainConfig, train_model

METRICS = ("ndcg@10", "hr@10", "ndcg@20", "hr@20", "mrr")


def run(data, name: str, seed: int, epochs: int, lr: float, batch_size: int, dropout: float,
        full_users: int | None) -> dict:
    family = get_family(name)
    t0 = time.perf_counter()
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, keep_best=True, checks_per_epoch=1,
                      patience=3)
    ck = train_model(family, data, cfg, {"dropout": dropout})
    train = ck.spec.metrics["train"]
    seconds = time.perf_counter() - t0
    out = {"dataset": data.path.name, "model": name, "seed": seed, "train_seconds": round(seconds, 1),
           "steps": train["steps"], "best_step": train["keep_best"]["best_step"],
           "best_epoch": round(train["keep_best"]["best_step"] / family.steps_per_epoch(data, batch_size), 2),
           "seconds_per_epoch": round((train["seconds"] - train["keep_best"]["validation_seconds"])
                                      / max(train["steps"], 1) * family.steps_per_epoch(data, batch_size), 2),
           "validation_seconds_per_check": round(train["keep_best"]["validation_seconds"]
                                                 / len(train["keep_best"]["curve"]), 2)}
    out["full_users"] = full_users or data.num_users
    for protocol in ("full", "sampled"):
        t0 = time.perf_counter()
        s = evaluate_model(ck.model, data, "test", protocol, users=full_users if protocol == "full" else None)
        out[protocol] = s.metrics(METRICS)
        out[f"{protocol}_eval_seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="sasrec,hstu,ranker")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.5)
    ap.add_argument("--full-users", type=int, help="full ranking on a fixed random sample of this many test users "
                    "(the ranker scores every item through the history's attention: all users take ~20 min)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    done = {(r["dataset"], r["model"], r["seed"]) for r in runs}
    sets = [open_dataset(p) for p in a.data]
    for seed in [int(s) for s in a.seeds.split(",")]:  # seed-major: a run cut short still covers every pair
        for data in sets:
            for name in a.models.split(","):
                if (data.path.name, name, seed) in done:
                    continue
                runs.append(run(data, name, seed, a.epochs, a.lr, a.batch_size, a.dropout, a.full_users))
                print(json.dumps(runs[-1]), flush=True)
                out.write_text(json.dumps({"args": vars(a), "runs": runs}, indent=2) + "\n")  # resumable
    summary = summarize(runs)
    out.write_text(json.dumps({"args": vars(a), "runs": runs, "summary": summary}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(summary) + "\n")
    print(markdown(summary))


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for key in dict.fromkeys((r["dataset"], r["model"]) for r in runs):
        rs = [r for r in runs if (r["dataset"], r["model"]) == key]
        row = {"dataset": key[0], "model": key[1], "seeds": len(rs),
               "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in rs])),
               "validation_seconds_per_check": float(np.mean([r["validation_seconds_per_check"] for r in rs])),
               "full_eval_seconds": float(np.mean([r["full_eval_seconds"] for r in rs])),
               "peak_rss_gb": max(r["peak_rss_gb"] for r in rs), "full_users": rs[0].get("full_users"),
               "best_epoch": float(np.mean([r["best_epoch"] for r in rs]))}
        for protocol in ("full", "sampled"):
            for m in METRICS:
                v = np.array([r[protocol][m] for r in rs])
                row[f"{protocol}/{m}"] = [float(v.mean()), float(v.std())]
        rows.append(row)
    return rows


def markdown(summary: list[dict]) -> str:
    head = ["dataset", "model", "seeds", "NDCG@10 full", "HR@10 full", "NDCG@10 sampled-100", "HR@10 sampled-100",
            "best epoch", "train s / epoch", "validation s / check", "full-ranking users", "full-ranking eval s", "peak RSS GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = lambda x: f"{x[0]:.4f} ± {x[1]:.4f}"
    for r in summary:
        lines.append("| " + " | ".join([r["dataset"], r["model"], str(r["seeds"]), f(r["full/ndcg@10"]), f(r["full/hr@10"]),
                                        f(r["sampled/ndcg@10"]), f(r["sampled/hr@10"]), f"{r['best_epoch']:.1f}",
                                        f"{r['seconds_per_epoch']:.1f}", f"{r['validation_seconds_per_check']:.1f}",
                                        f"{r['full_users']:,}",
                                        f"{r['full_eval_seconds']:.1f}", f"{r['peak_rss_gb']:.2f}"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
