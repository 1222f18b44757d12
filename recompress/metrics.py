"""The metric registry: every accuracy metric recompress reports, for click models and for rankers.

A metric reads one of three kinds of per-row records:
- ``scores``: a click probability per test row, with the 0/1 labels as truth (AUC, logloss);
- ``ranks``: the 0-based rank of each test user's true next item among its candidates, with the number
  of candidates as truth (HR@k, NDCG@k, MRR, and the per-user AUC ``uauc``);
- ``predictions``: a regression output per test row, with the target value as truth (MSE, MAE).
Each metric can also be computed under row weights (bootstrap resamples as multiplicities), which is
how ``recompress.stats`` gives every difference a paired confidence interval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EPS = 1e-7


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


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC with ties counted as one half (Mann-Whitney U with average ranks)."""
    labels = np.asarray(labels).ravel()
    if labels.size == 0 or labels.all() or not labels.any():
        return float("nan")
    return float(weighted_auc(labels, np.asarray(scores, dtype=np.float64).ravel(), np.ones((1, labels.size)))[0])


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = EPS) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1 - eps]."""
    return float(_logloss_rows(np.asarray(labels), np.asarray(probs)).mean())


def _logloss_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    y = y.astype(np.float64).ravel()
    p = np.clip(p.astype(np.float64).ravel(), EPS, 1 - EPS)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


@dataclass(frozen=True)
class Metric:
    """``per_row(truth, values)`` for metrics that are means over rows; AUC is the one that is not."""

    name: str
    kind: str  # "scores" | "ranks" | "predictions"
    higher_is_better: bool
    help: str
    per_row: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

    def value(self, truth: np.ndarray, values: np.ndarray) -> float:
        return float(self.resampled(truth, values, np.ones((1, len(values))))[0])

    def resampled(self, truth: np.ndarray, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The metric under each row of ``weights`` [R, n]."""
        if self.per_row is None:
            return weighted_auc(truth, values, weights)
        v = self.per_row(np.asarray(truth), np.asarray(values))
        w = np.atleast_2d(weights).astype(np.float64)
        return (w @ v) / w.sum(1)


def _hr(k: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return lambda n, r: (r < k).astype(np.float64)


def _ndcg(k: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return lambda n, r: np.where(r < k, 1.0 / np.log2(np.asarray(r, np.float64) + 2.0), 0.0)


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("auc", "scores", True, "ROC AUC over test rows (ties count one half)"),
    Metric("logloss", "scores", False, "mean binary cross-entropy", _logloss_rows),
    Metric("accuracy", "scores", True, "share of test rows whose rounded probability is the label (numpy's round, "
           "0.5 -> 0, as dlrm prints it)", lambda y, p: (np.round(np.asarray(p)) == np.asarray(y)).astype(np.float64)),
    *[Metric(f"hr@{k}", "ranks", True, f"share of test users whose next item ranks in the top {k}", _hr(k)) for k in (10, 20)],
    *[Metric(f"ndcg@{k}", "ranks", True, f"NDCG@{k} of the next item (one relevant item per user)", _ndcg(k))
      for k in (10, 20)],
    Metric("mrr", "ranks", True, "mean reciprocal rank of the next item", lambda n, r: 1.0 / (np.asarray(r) + 1.0)),
    Metric("mrr@10", "ranks", True, "mean reciprocal rank of the next item, 0 below the top 10 (RecBole's MRR@10)",
           lambda n, r: np.where(np.asarray(r) < 10, 1.0 / (np.asarray(r) + 1.0), 0.0)),
    Metric("uauc", "ranks", True, "per-user AUC of the next item against the other candidates",
           lambda n, r: 1.0 - np.asarray(r, np.float64) / np.maximum(np.asarray(n) - 1, 1)),
    Metric("mse", "predictions", False, "mean squared error of the prediction (torchrec's MSE with unit weights)",
           lambda y, p: (np.asarray(p, np.float64) - np.asarray(y, np.float64)) ** 2),
    Metric("mae", "predictions", False, "mean absolute error of the prediction",
           lambda y, p: np.abs(np.asarray(p, np.float64) - np.asarray(y, np.float64))),
]}


def compute(names: tuple[str, ...] | list[str], truth: np.ndarray, values: np.ndarray) -> dict[str, float]:
    return {n: METRICS[n].value(truth, values) for n in names}


def accuracy_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The click-model report: AUC, logloss, rows and click rate."""
    return {"auc": auc(labels, probs), "logloss": logloss(labels, probs), "rows": int(len(labels)),
            "ctr": float(np.mean(labels))}


def ranks(scores: np.ndarray, target: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """0-based rank of ``scores[i, target[i]]`` in row i, ignoring ``exclude`` (True = not a candidate).

    Ties are broken uniformly at random (seeded, so reruns agree): the target ranks after the candidates
    that score higher and at a uniform place among those that score the same, as an arbitrary pick by a
    server would in expectation. A constant scorer thus ranks like a random one, and items that share a
    row (hashed tables) share its rank fairly instead of all ranking last. A target that ``exclude`` marks
    ranks after every candidate.
    """
    scores = np.asarray(scores, dtype=np.float64)
    rows = np.arange(len(scores))
    t = scores[rows, target][:, None]
    ahead, tied = scores > t, scores == t
    tied[rows, target] = False
    if exclude is not None:
        ahead &= ~exclude
        tied &= ~exclude
    ties = tied.sum(1)
    place = np.floor(np.random.default_rng(0).random(len(scores)) * (ties + 1)).astype(np.int64)
    out = ahead.sum(1).astype(np.int64) + place
    if exclude is not None:
        missed = exclude[rows, target]
        out[missed] = (~exclude[missed]).sum(1)
    return out
