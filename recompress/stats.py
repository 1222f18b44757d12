"""Confidence intervals for the differences recompress reports, so a difference inside the noise says so.

- Accuracy: paired bootstrap over test rows (the same resampled rows score both models), for any metric
  of ``recompress.metrics``; AUC is computed on bootstrap *weights* in one pass over rows sorted once, so
  1,000 resamples of a million rows take seconds.
- Latency: the ratio of two backends' medians, bootstrapped over rounds (in each round every backend
  takes a short turn), so machine-wide slowdowns hit both sides of the ratio.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from .metrics import METRICS

BOOTSTRAP = 1000
LEVEL = 0.95
KEEP_PREDICTIONS = 1_000_000  # test rows whose predictions a results file keeps for paired comparisons


def _resample_weights(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """``count`` bootstrap resamples of n rows, as multiplicities [count, n]."""
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(count)])


def paired_delta(metric: str, truth: np.ndarray, new: np.ndarray, base: np.ndarray, *,
                 resamples: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """metric(new) - metric(base) on the same rows, with a paired-bootstrap 95% interval.

    ``new`` and ``base`` may be ``[k, n]`` (k pairs, e.g. training seeds scored on the same test rows):
    then the delta is the mean over pairs, and every resample reweights the rows of all pairs alike.
    ``significant`` means the interval excludes zero.
    """
    m = METRICS[metric]
    truth, new, base = np.asarray(truth), np.atleast_2d(new), np.atleast_2d(base)
    if not (len(truth) == new.shape[1] == base.shape[1]) or new.shape[0] != base.shape[0]:
        raise ValueError("paired comparison needs predictions for the same rows")
    n = len(truth)

    def mean_delta(w: np.ndarray) -> np.ndarray:
        return np.mean([m.resampled(truth, a, w) - m.resampled(truth, b, w) for a, b in zip(new, base)], axis=0)

    delta = float(mean_delta(np.ones((1, n)))[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, int(5e6 // max(n, 1))))
    draws = []
    for start in range(0, resamples, chunk):
        draws.append(mean_delta(_resample_weights(rng, n, min(chunk, resamples - start))))
    d = np.concatenate(draws)
    d = d[np.isfinite(d)]
    lo, hi = np.quantile(d, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"metric": metric, "delta": delta, "lo": float(lo), "hi": float(hi), "level": LEVEL,
            "resamples": int(len(d)), "rows": n, "significant": bool(lo > 0 or hi < 0)}


def paired_auc_delta(labels: np.ndarray, new: np.ndarray, base: np.ndarray, **kw: Any) -> dict[str, Any]:
    return paired_delta("auc", labels, new, base, **kw)


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


DTYPES = {"scores": "<f4", "ranks": "<i4", "predictions": "<f4"}  # how each kind of record is stored


def kept_rows(n: int) -> np.ndarray | None:
    """Which of ``n`` test rows a results file keeps predictions for (all, or a fixed sample of large splits)."""
    if n <= KEEP_PREDICTIONS:
        return None
    return np.sort(np.random.default_rng(0).choice(n, KEEP_PREDICTIONS, replace=False))


def predictions_record(values: np.ndarray, kind: str, backend: str, truth: np.ndarray | None = None) -> dict[str, Any]:
    """What a results file stores of a model's test output, for later paired comparisons: click
    probabilities (``scores``; truth = the labels, read from the dataset), each user's ``ranks`` (truth =
    candidates per user, stored alongside) or regression ``predictions`` (truth = targets, stored alongside)."""
    keep = kept_rows(len(values))
    pick = (lambda x: x) if keep is None else (lambda x: x[keep])
    rec = {"kind": kind, "backend": backend, "rows": int(len(values)), "sampled": keep is not None,
           "base64": encode(pick(values), DTYPES[kind])}
    if kind != "scores":
        rec["truth_base64"] = encode(pick(truth), DTYPES[kind])
    return rec


def paired_from_records(metric: str, new: dict[str, Any], base: dict[str, Any],
                        labels: np.ndarray | None) -> dict[str, Any]:
    """Paired Δmetric of two stored records of the same test rows (``labels``: every test label, for scores)."""
    if new["rows"] != base["rows"] or new["kind"] != base["kind"]:
        raise ValueError("prediction records cover different test rows")
    dtype = DTYPES[new["kind"]]
    if new["kind"] == "scores":
        keep = kept_rows(new["rows"])
        truth = labels if keep is None else labels[keep]
    else:
        truth = decode(new["truth_base64"], dtype)
    return paired_delta(metric, truth, decode(new["base64"], dtype), decode(base["base64"], dtype))


def encode(x: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.asarray(x, dtype=dtype).tobytes()).decode("ascii")


def decode(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).astype(np.float64 if dtype == "<f4" else np.int64)
