"""Latency per batch size: warm-up, many timed calls on rotating real inputs, p50/p99 in milliseconds."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from recompress.data.ctr import CTRDataset
from recompress.progress import progress

from .predictors import Predictor

ROTATE = 16  # distinct input batches cycled through, so no call sees the inputs of the previous one


def input_pool(data: CTRDataset, batch: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    dense, sparse, _ = data.arrays("test")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(dense), size=(ROTATE, batch), replace=len(dense) < ROTATE * batch)
    return [(np.array(dense[np.sort(i)], np.float32), np.array(sparse[np.sort(i)], np.int64)[..., None])
            for i in idx]


def measure(predictors: list[Predictor], data: CTRDataset, batch_sizes: list[int], repeats: int,
            warmup: int = 20) -> dict[str, dict[str, Any]]:
    """``{backend: {batch: {p50_ms, p99_ms, mean_ms, calls}}}``; backends are interleaved per batch size."""
    out: dict[str, dict[str, Any]] = {p.name: {} for p in predictors}
    with progress("latency", len(batch_sizes) * len(predictors)) as advance:
        for b in batch_sizes:
            pool = input_pool(data, b)
            for p in predictors:
                for i in range(warmup):
                    p(*pool[i % ROTATE])
                times = np.empty(repeats)
                for i in range(repeats):
                    d, s = pool[i % ROTATE]
                    t0 = time.perf_counter_ns()
                    p(d, s)
                    times[i] = time.perf_counter_ns() - t0
                ms = times / 1e6
                out[p.name][str(b)] = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                                       "mean_ms": float(ms.mean()), "calls": repeats}
                advance(1)
    return out


def ratios(lat: dict[str, dict[str, Any]], reference: str = "torch") -> dict[str, dict[str, float]]:
    """Speed-up of each backend over ``reference`` per batch size (p50 ratio, same run)."""
    if reference not in lat:
        return {}
    return {name: {b: lat[reference][b]["p50_ms"] / v["p50_ms"] for b, v in per.items()}
            for name, per in lat.items() if name != reference}
