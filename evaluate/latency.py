"""Latency per batch size, measured so that ratios between backends hold on a busy machine.

Backends take turns in *rounds*: in each round every backend makes untimed calls for at least
``SETTLE_MS`` (one at least) and then ``PER_ROUND`` timed calls, on real test rows (16 batches rotate), and the order of backends rotates
from round to round. Turns this short cancel machine-wide drift (the noise that made one block per
backend swing 10-100x), while the settle calls keep one backend's threads from being timed inside
another's calls: interleaving strictly call by call made two ONNX Runtime sessions of the *same* model
2.5x slower at batch 512 (their worker threads spin after a call and steal the 2 cores), and biased
ORT-vs-torch ratios likewise (``bench/interleave.py`` measures it; docs/benchmarks.md).

A ratio is the ratio of two backends' median call times, with a 95% interval from a bootstrap over
rounds (``recompress.stats``). While a requested ratio's interval is wider than ``NOISY`` (upper / lower
bound), more rounds are measured: up to ``EXTEND`` times the requested number, or for at least
``MIN_SECONDS``, never past ``CAP`` times. A ratio still that wide is flagged ``noisy`` with a warning;
the regression gate decides on a ratio only when its whole interval is on one side of the limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from recompress.progress import progress, say
from recompress.stats import median_ratio

from .predictors import Inputs, Predictor

ROTATE = 16       # distinct input batches cycled through
SETTLE_MS = 3.0   # untimed calls start each backend's turn until this long has passed (the previous
                  # backend's worker threads spin down meanwhile)
PER_ROUND = 8     # timed calls per backend per round
MIN_ROUNDS = 25   # at least this many rounds, so the bootstrap over rounds has something to resample
NOISY = 1.3       # a ratio whose 95% interval spans more than this factor is too noisy to trust
EXTEND = 4        # extend to this many times the requested rounds while some ratio is noisy ...
MIN_SECONDS = 3.0  # ... or until this much time was spent on the batch size ...
CAP = 50          # ... but never past this many times the requested rounds


def measure(predictors: list[Predictor], pool: Callable[[int], list[Inputs]], batch_sizes: list[int],
            repeats: int, pairs: list[tuple[str, str]] = (), warmup: int = 20) -> dict[str, Any]:
    """``{"backends": {name: {batch: {p50_ms, p99_ms, mean_ms, calls}}}, "ratios": {"a/b": {batch: {...}}}}``.

    ``repeats`` is the number of timed calls per backend and batch size (at least; never fewer than
    ``MIN_ROUNDS`` rounds of ``PER_ROUND`` calls); ``pool(batch)`` gives
    the rotating input batches; ``pairs`` are the (numerator, denominator) backends whose p50 ratios are
    wanted, each with ``lo``/``hi`` (95%) and ``noisy``.
    """
    names = [p.name for p in predictors]
    out: dict[str, Any] = {"backends": {n: {} for n in names}, "ratios": {f"{a}/{c}": {} for a, c in pairs}}
    wanted = max(MIN_ROUNDS, math.ceil(repeats / PER_ROUND))
    with progress("latency", len(batch_sizes) * wanted) as advance:
        for b in batch_sizes:
            inputs = pool(b)
            for p in predictors:
                for i in range(warmup):
                    p(inputs[i % ROTATE])
            times: list[list[float]] = [[] for _ in predictors]
            rounds, target, start = 0, wanted, time.monotonic()
            while rounds < target:
                k = rounds % len(predictors)
                for j in [*range(k, len(predictors)), *range(k)]:
                    settle_until = time.perf_counter_ns() + SETTLE_MS * 1e6
                    predictors[j](inputs[rounds % ROTATE])
                    while time.perf_counter_ns() < settle_until:
                        predictors[j](inputs[rounds % ROTATE])
                    for i in range(PER_ROUND):
                        x = inputs[(rounds * PER_ROUND + i) % ROTATE]
                        t0 = time.perf_counter_ns()
                        predictors[j](x)
                        times[j].append((time.perf_counter_ns() - t0) / 1e6)
                rounds += 1
                if rounds <= wanted:
                    advance(1)
                if rounds == target and _may_extend(rounds, wanted, start) and _noisy(times, names, pairs):
                    target = min(2 * target, CAP * wanted)
            groups = np.repeat(np.arange(rounds), PER_ROUND)
            for name, t in zip(names, times):
                ms = np.asarray(t)
                out["backends"][name][str(b)] = {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
                                                 "mean_ms": float(ms.mean()), "calls": len(ms), "rounds": rounds}
            for a, c in pairs:
                r = median_ratio(times[names.index(a)], times[names.index(c)], groups=groups)
                r["noisy"] = r["hi"] / r["lo"] > NOISY
                out["ratios"][f"{a}/{c}"][str(b)] = r
    noisy = [f"{k} at batch {b}" for k, per in out["ratios"].items() for b, r in per.items() if r["noisy"]]
    if noisy:
        say(f"[yellow]warning:[/yellow] the machine is too noisy to measure {len(noisy)} latency ratio(s) "
            f"(95% interval wider than {NOISY}x after extra rounds): {', '.join(noisy[:4])}; "
            "read them with their intervals, or re-run on a quieter machine or with more --repeats.")
    return out


def _may_extend(rounds: int, wanted: int, start: float) -> bool:
    if rounds >= CAP * wanted:
        return False
    return rounds < EXTEND * wanted or time.monotonic() - start < MIN_SECONDS


def _noisy(times: list[list[float]], names: list[str], pairs: list[tuple[str, str]]) -> bool:
    groups = np.repeat(np.arange(len(times[0]) // PER_ROUND), PER_ROUND)
    for a, c in pairs:
        r = median_ratio(times[names.index(a)], times[names.index(c)], resamples=200, groups=groups)
        if r["hi"] / r["lo"] > NOISY:
            return True
    return False
