"""Data-parallel training on one machine: 1 process vs ``--nproc 2`` (gloo), interleaved, same global batch.

For each model: train the same command in one process (2 threads, and 1 thread) and on 2 ranks (1 thread
each), ``--repeats`` times in turn; record the training loop's seconds (the checkpoint's own
``metrics.train.seconds``), wall time, validation metrics and the largest weight difference to the
1-process model. Ratios are to the 1-process, 2-thread run of the same repeat.

    python bench/distributed_train.py --out bench/results/distributed_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

MODELS = {
    "dlrm": (["data", "synthetic", "--samples", "200000"], ["--dim", "16", "--batch-size", "512"]),
    "sasrec": (["data", "synthetic-sequences", "--users", "4000", "--items", "2000"],
               ["--model", "sasrec", "--dim", "64", "--heads", "2", "--dropout", "0", "--batch-size", "128"]),
}
VARIANTS = {"1 process, 2 threads": (1, "2"), "1 process, 1 thread": (1, "1"), "2 ranks, 1 thread each": (2, "1")}


def recompress(args: list[str], threads: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "recompress", *args], capture_output=True, text=True, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": threads})
    if p.returncode:
        raise SystemExit(f"recompress {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    return max(float(np.abs(wa[k].astype(np.float64) - wb[k].astype(np.float64)).max()) for k in wa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/recompress-bench/distributed")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "models": {}}
    for model, (make, train) in MODELS.items():
        data = work / f"{model}-data"
        if not data.exists():
            recompress([*make, "-o", str(data)], "2")
        runs: list[dict[str, object]] = []
        for rep in range(args.repeats):
            for label, (nproc, threads) in VARIANTS.items():
                out = work / f"{model}-{rep}-{nproc}-{threads}"
                cmd = ["train", "--data", str(data), *train, "-o", str(out), "--overwrite",
                       *([f"--nproc={nproc}"] if nproc > 1 else [])]
                wall = recompress(cmd, threads)
                spec = json.loads((out / "spec.json").read_text())
                train_metrics = spec["metrics"]["train"]
                runs.append({"variant": label, "repeat": rep, "wall_seconds": round(wall, 2),
                             "train_seconds": train_metrics["seconds"], "steps": train_metrics["steps"],
                             "ranks": train_metrics.get("ranks", 1), "val": train_metrics["val"],
                             "max_weight_diff_to_1_process": max_diff(work / f"{model}-{rep}-1-2", out)})
                print(model, label, rep, runs[-1]["train_seconds"], flush=True)
        base = {r["repeat"]: r["train_seconds"] for r in runs if r["variant"] == "1 process, 2 threads"}
        for r in runs:
            r["train_time_ratio"] = round(r["train_seconds"] / base[r["repeat"]], 3)
        summary = {label: {"median_train_seconds": float(np.median([r["train_seconds"] for r in runs if r["variant"] == label])),
                           "median_ratio": float(np.median([r["train_time_ratio"] for r in runs if r["variant"] == label]))}
                   for label in VARIANTS}
        results["models"][model] = {"make": make, "train": train, "runs": runs, "summary": summary}
    results["dlrm_drift"] = drift(work)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def drift(work: Path) -> list[dict[str, object]]:
    """How the 2-rank DLRM model drifts from the 1-process one with the number of steps (Adam, and SGD)."""
    data, (_, train) = work / "dlrm-data", MODELS["dlrm"]
    out = []
    for opt, steps in [("adam", 1), ("adam", 5), ("adam", 10), ("adam", 20), ("sgd", None)]:
        extra = ["--optimizer", opt, *(["--lr", "0.05"] if opt == "sgd" else []),
                 *(["--steps", str(steps)] if steps else [])]
        for n in (1, 2):
            recompress(["train", "--data", str(data), *train, *extra, "-o", str(work / f"drift{n}"), "--overwrite",
                        *([f"--nproc={n}"] if n > 1 else [])], "1")
        spec = json.loads((work / "drift2" / "spec.json").read_text())
        out.append({"optimizer": opt, "steps": spec["metrics"]["train"]["steps"],
                    "max_weight_diff": max_diff(work / "drift1", work / "drift2")})
        print("drift", out[-1], flush=True)
    return out


if __name__ == "__main__":
    main()
