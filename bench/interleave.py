"""Benchmark (not a test): how the order of timed calls biases latency on this machine.

    python bench/interleave.py --export EXPORT_DIR --ckpt CKPT_DIR --data DATASET --out bench/results/interleave.json

Times two ONNX Runtime sessions of the same model, and an ORT session against torch eager, at batch 1
and 512 (2 threads each), in several orders: in blocks (all calls of one backend, then the other; again
at the end to show drift), strictly call by call, and in alternating turns with settle calls of several
lengths (``evaluate/latency.py``'s setting among them). Two sessions of one model should take the same
time, and a torch/ORT ratio should agree with the blocks'; the order that distorts least is the one to trust.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from recompress.evaluate.latency import PER_ROUND, ROTATE, SETTLE_MS
from recompress.evaluate.predictors import OrtPredictor, TorchPredictor

from recompress.adapters import load_any
from recompress.data import open_dataset
from recompress.families import get_family


def timed(p, x) -> float:
    t0 = time.perf_counter_ns()
    p(x)
    return (time.perf_counter_ns() - t0) / 1e6


def blocks(a, b, pool, n):
    return [timed(a, pool[i % 16]) for i in range(n)], [timed(b, pool[i % 16]) for i in range(n)]


def call_by_call(a, b, pool, n):
    ta, tb = [], []
    for i in range(n):
        ta.append(timed(a, pool[i % 16]))
        tb.append(timed(b, pool[i % 16]))
    return ta, tb


def turns(a, b, pool, n, settle_ms=SETTLE_MS, per_round=PER_ROUND):
    out = ([], [])
    for r in range(-(-n // per_round)):
        for j, p in enumerate((a, b) if r % 2 == 0 else (b, a)):
            k = j if r % 2 == 0 else 1 - j
            until = time.perf_counter_ns() + settle_ms * 1e6
            p(pool[r % 16])
            while time.perf_counter_ns() < until:
                p(pool[r % 16])
            out[k].extend(timed(p, pool[(r * per_round + i) % 16]) for i in range(per_round))
    return out


ORDERS = [("blocks", blocks), ("call by call", call_by_call),
          (f"turns (recompress: settle {SETTLE_MS:g} ms, {PER_ROUND} calls)", turns),
          *[(f"turns (settle {s:g} ms, {k} calls)", lambda a, b, pool, n, s=s, k=k: turns(a, b, pool, n, s, k))
            for s, k in ((20, 8), (20, 32), (100, 64)) if (s, k) != (SETTLE_MS, PER_ROUND)],
          ("blocks again (drift check)", blocks)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--calls", type=int, default=400)
    a = ap.parse_args()
    data = open_dataset(a.data)
    onnx = Path(a.export) / "model.onnx"
    ckpt = load_any(a.ckpt)
    family = get_family(ckpt.spec.family)
    pairs = {"ORT session A vs session B (same model)": (OrtPredictor(onnx, 2, "A"), OrtPredictor(onnx, 2, "B")),
             "torch eager vs ORT": (TorchPredictor(ckpt.model, 2), OrtPredictor(onnx, 2))}
    rows = []
    for batch in (1, 512):
        pool = family.latency_inputs(ckpt.spec.hparams, data, batch, ROTATE)
        for label, (x, y) in pairs.items():
            for _ in range(20):
                x(pool[0]), y(pool[0])
            for order, fn in ORDERS:
                tx, ty = fn(x, y, pool, a.calls)
                row = {"pair": label, "batch": batch, "order": order, "p50_ms_first": float(np.median(tx)),
                       "p50_ms_second": float(np.median(ty)), "ratio": float(np.median(tx) / np.median(ty))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(a.out).write_text(json.dumps({"calls": a.calls, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
