"""Benchmark (not a test): how the order of timed calls biases latency on this machine.

    python bench/interleave.py --export EXPORT_DIR --ckpt CKPT_DIR --data DATASET --out bench/results/interleave.json

Times two ONNX Runtime sessions of the same model, and an ORT session against torch eager, three ways
at batch 1 and 512 (2 threads each): in blocks (all calls of one backend, then the other), strictly call
by call, and in short alternating turns with settle calls (what ``evaluate/latency.py`` does). Two
sessions of one model should take the same time; the order that distorts that least is the one to trust.
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


def turns(a, b, pool, n):
    out = ([], [])
    for r in range(-(-n // PER_ROUND)):
        for j, p in enumerate((a, b) if r % 2 == 0 else (b, a)):
            k = j if r % 2 == 0 else 1 - j
            until = time.perf_counter_ns() + SETTLE_MS * 1e6
            p(pool[r % 16])
            while time.perf_counter_ns() < until:
                p(pool[r % 16])
            out[k].extend(timed(p, pool[(r * PER_ROUND + i) % 16]) for i in range(PER_ROUND))
    return out


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
            for order, fn in (("blocks", blocks), ("call by call", call_by_call), ("turns (recompress)", turns)):
                tx, ty = fn(x, y, pool, a.calls)
                row = {"pair": label, "batch": batch, "order": order, "p50_ms_first": float(np.median(tx)),
                       "p50_ms_second": float(np.median(ty)), "ratio": float(np.median(tx) / np.median(ty))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(a.out).write_text(json.dumps({"calls": a.calls, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
