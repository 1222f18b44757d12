"""Latency per batch size, measured so that ratios between backends hold on a busy machine.

Backends are interleaved call by call: each *round* times every backend once, on the same input batch
(16 batches of real test rows rotate). Within a round, backends of one runtime run back to back (so an
ONNX Runtime session never pays for torch's threads winding down, which doubled small-batch ORT times
in a mixed order), the runtimes alternate which goes first, and the order within each rotates. A ratio is the
ratio of two backends' medians with a bootstrap interval over rounds (``recompress.stats``). While a
requested ratio's interval is wider than ``NOISY`` (upper / lower bound), more rounds are measured: up to
``EXTEND`` times the requested number, or for at least ``MIN_SECONDS`` (fast calls jitter most and cost
least), at most ``CAP`` times the requested number. A ratio still that wide is flagged ``noisy`` and
reported, not trusted (the regression gate does not pass on it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from recompress.progress import progress, say
from recompress.stats import median_ratio

from .predictors import Inputs, Predictor

ROTATE = 16   # distinct input batches cycled through, so no call sees the inputs of the previous one
NOISY = 1.3   # a ratio whose 95% interval spans more than this factor is too noisy to trust
EXTEND = 4    # extend to this many times the requested rounds while some ratio is noisy ...
MIN_SECONDS = 3.0  # ... or until this much time was spent on the batch size ...
CAP = 100     # ... but never past this many times the requested rounds


def measure(predictors: list[Predictor], pool: Callable[[int], list[Inputs]], batch_sizes: list[int],
            repeats: int, pairs: list[tuple[str, str]] = (), warmup: int = 20) -> dict[str, Any]:
    """``{"backends": {name: {batch: {p50_ms, p99_ms, mean_ms, calls}}}, "ratios": {"a/b": {batch: {...}}}}``.

    ``pool(batch)`` gives the rotating input batches; ``pairs`` are the (numerator, denominator) backends
    whose p50 ratios are wanted, each with ``lo``/``hi`` (95%) and ``noisy``.
    """
    names = [p.name for p in predictors]
    runtimes = list(dict.fromkeys(getattr(p, "runtime", p.name) for p in predictors))
    groups = [[j for j, p in enumerate(predictors) if getattr(p, "runtime", p.name) == r] for r in runtimes]
    out: dict[str, Any] = {"backends": {n: {} for n in names}, "ratios": {f"{a}/{b}": {} for a, b in pairs}}
    with progress("latency", len(batch_sizes) * repeats) as advance:
        for b in batch_sizes:
            inputs = pool(b)
            for p in predictors:
                for i in range(warmup):
                    p(inputs[i % ROTATE])
            times: list[list[float]] = [[] for _ in predictors]
            rounds, target, start = 0, repeats, time.monotonic()
            while rounds < target:
                x = inputs[rounds % ROTATE]
                for j in _order(groups, rounds):
                    t0 = time.perf_counter_ns()
                    predictors[j](x)
                    times[j].append((time.perf_counter_ns() - t0) / 1e6)
                rounds += 1
                if rounds <= repeats:
                    advance(1)
                if rounds == target and _may_extend(rounds, repeats, start) and _noisy(times, names, pairs):
                    target += repeats
            for name, t in zip(names, times):
                ms = np.asarray(t)
                out["backends"][name][str(b)] = {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
                                                 "mean_ms": float(ms.mean()), "calls": len(ms)}
            for a, c in pairs:
                r = median_ratio(times[names.index(a)], times[names.index(c)])
                r["noisy"] = r["hi"] / r["lo"] > NOISY
                out["ratios"][f"{a}/{c}"][str(b)] = r
    noisy = [f"{k} at batch {b}" for k, per in out["ratios"].items() for b, r in per.items() if r["noisy"]]
    if noisy:
        say(f"[yellow]warning:[/yellow] the machine is too noisy to measure {len(noisy)} latency ratio(s) "
            f"(95% interval wider than {NOISY}x after extra rounds): {', '.join(noisy[:4])}; "
            "they are reported but not trusted. Re-run on a quieter machine or with more --repeats.")
    return out


def _order(groups: list[list[int]], rounds: int) -> list[int]:
    """Round ``rounds``' call order: runtime groups back to back, alternating, each rotated."""
    g = rounds % len(groups)
    out = []
    for members in groups[g:] + groups[:g]:
        k = rounds % len(members)
        out += members[k:] + members[:k]
    return out


def _may_extend(rounds: int, repeats: int, start: float) -> bool:
    if rounds >= CAP * repeats:
        return False
    return rounds < EXTEND * repeats or time.monotonic() - start < MIN_SECONDS


def _noisy(times: list[list[float]], names: list[str], pairs: list[tuple[str, str]]) -> bool:
    for a, c in pairs:
        r = median_ratio(times[names.index(a)], times[names.index(c)], resamples=200)
        if r["hi"] / r["lo"] > NOISY:
            return True
    return False
