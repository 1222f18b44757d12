"""Confidence intervals for the differences recompress reports, so a difference inside the noise says so.

- Accuracy: paired bootstrap over test rows (the same resampled rows score both models), with AUC
  computed on bootstrap *weights* in one pass over the rows sorted once, so 1,000 resamples of a
  million rows take seconds.
- Latency: the ratio of two backends' medians, bootstrapped over rounds (in each round every backend
  takes a short turn), so machine-wide slowdowns hit both sides of the ratio.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

BOOTSTRAP = 1000
LEVEL = 0.95


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC (ties count one half) for each row of ``weights`` [R, n] (row multiplicities) at once."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="mergesort")
    s, y = np.asarray(scores)[order], labels[order]
    w = np.atleast_2d(weights)[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each tie group
    pos = np.add.reduceat(w * y, starts, axis=1)
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each group
    num = (pos * (below + 0.5 * neg)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def _resample_weights(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """``count`` bootstrap resamples of n rows, as multiplicities [count, n]."""
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(count)])


def paired_auc_delta(labels: np.ndarray, new: np.ndarray, base: np.ndarray, *, resamples: int = BOOTSTRAP,
                     seed: int = 0) -> dict[str, Any]:
    """AUC(new) - AUC(base) on the same rows, with a paired-bootstrap 95% interval."""
    labels, new, base = np.asarray(labels), np.asarray(new), np.asarray(base)
    if not (len(labels) == len(new) == len(base)):
        raise ValueError("paired comparison needs predictions for the same rows")
    n = len(labels)
    ones = np.ones((1, n))
    delta = float(weighted_auc(labels, new, ones)[0] - weighted_auc(labels, base, ones)[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, int(5e6 // max(n, 1))))
    draws = []
    for start in range(0, resamples, chunk):
        w = _resample_weights(rng, n, min(chunk, resamples - start))
        draws.append(weighted_auc(labels, new, w) - weighted_auc(labels, base, w))
    d = np.concatenate(draws)
    d = d[np.isfinite(d)]
    lo, hi = np.quantile(d, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"delta": delta, "lo": float(lo), "hi": float(hi), "level": LEVEL, "resamples": int(len(d)),
            "rows": n, "significant": bool(lo > 0 or hi < 0)}


def median_ratio(a: np.ndarray, b: np.ndarray, *, resamples: int = BOOTSTRAP, seed: int = 0,
                 groups: np.ndarray | None = None) -> dict[str, float]:
    """median(a) / median(b) for paired measurements, with a bootstrap 95% interval.

    ``groups`` (one label per measurement, the same for a and b) makes it a cluster bootstrap: whole
    rounds are resampled, keeping the calls of one round (timed close together) together.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ratio = float(np.median(a) / np.median(b))
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, len(a), (resamples, len(a)))
    else:
        members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
        pick = rng.integers(0, len(members), (resamples, len(members)))
        idx = np.stack([np.concatenate([members[g] for g in row]) for row in pick])
    boot = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    lo, hi = np.quantile(boot, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"ratio": ratio, "lo": float(lo), "hi": float(hi)}


KEEP_PREDICTIONS = 1_000_000  # test rows whose predictions a results file keeps for paired comparisons


def kept_rows(n: int) -> np.ndarray | None:
    """Which of ``n`` test rows a results file keeps predictions for (all, or a fixed sample of large splits)."""
    if n <= KEEP_PREDICTIONS:
        return None
    return np.sort(np.random.default_rng(0).choice(n, KEEP_PREDICTIONS, replace=False))


def predictions_record(probs: np.ndarray, backend: str) -> dict[str, Any]:
    """What a results file stores of a model's test predictions, for later paired comparisons."""
    keep = kept_rows(len(probs))
    return {"backend": backend, "rows": int(len(probs)), "sampled": keep is not None,
            "float32_base64": encode_floats(probs if keep is None else probs[keep])}


def paired_from_records(new: dict[str, Any], base: dict[str, Any], labels: np.ndarray) -> dict[str, Any]:
    """Paired ΔAUC of two stored prediction records of the same test rows (``labels``: all test labels)."""
    if new["rows"] != base["rows"] or new["rows"] != len(labels):
        raise ValueError("prediction records cover different test rows")
    keep = kept_rows(new["rows"])
    return paired_auc_delta(labels if keep is None else labels[keep], decode_floats(new["float32_base64"]),
                            decode_floats(base["float32_base64"]))


def encode_floats(x: np.ndarray) -> str:
    """float32 values as base64 text (4 bytes a value; what results JSON stores for paired comparisons)."""
    return base64.b64encode(np.asarray(x, dtype="<f4").tobytes()).decode("ascii")


def decode_floats(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float64)
