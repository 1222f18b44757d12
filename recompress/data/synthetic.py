"""SYNTHETIC Criteo-like CTR data with a planted ground truth, so embedding quality matters.

Ids follow a (scrambled) Zipf law per table. Each id has a hidden ``true_dim``-wide vector and a bias,
computed from a hash of (seed, table, id): nothing of table size is ever stored, so tables of 10M+
rows cost nothing to generate. The click logit is the sum of pairwise dot products of the hidden
vectors (the structure DLRM's dot interaction can learn), per-id biases and a linear dense term;
labels are Bernoulli draws, calibrated to ``ctr``. Every output says ``synthetic: true``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from recompress.errors import UserError
from recompress.outputs import output_dir
from recompress.progress import progress, say

from .ctr import SPLITS, DatasetWriter, split_of

CHUNK = 100_000
_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_normal(seed: int, table: int, ids: np.ndarray, width: int) -> np.ndarray:
    """Standard normals [len(ids), width], a pure function of (seed, table, id, column)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        return _hashed_normal(seed, table, ids, width)


def _hashed_normal(seed: int, table: int, ids: np.ndarray, width: int) -> np.ndarray:
    base = _mix(ids.astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
                + np.uint64((seed * 1_000_003 + table * 7919) & 0xFFFFFFFF) * np.uint64(0xD6E8FEB86659FD93)
                + np.arange(width, dtype=np.uint64)[None, :] * np.uint64(2))
    u1 = ((base >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    u2 = ((_mix(base + np.uint64(1)) >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def zipf_ids(rng: np.random.Generator, rows: int, n: int, s: float) -> np.ndarray:
    """Ids in [1, rows) with a power-law popularity (exponent ``s``), hot ids scattered by a bijection."""
    span = rows - 1
    u = rng.random(n)
    if abs(s - 1.0) < 1e-9:
        rank = np.exp(u * math.log(span + 1)) - 1
    else:
        rank = ((span + 1) ** (1 - s) - 1) * u + 1
        rank = rank ** (1 / (1 - s)) - 1
    rank = np.minimum(rank.astype(np.int64), span - 1)
    a = 2_654_435_761 % span or 1
    while math.gcd(a, span) != 1:
        a += 1
    return (rank * a + 7) % span + 1


def make_synthetic(out: str | Path, *, samples: int = 200_000, table_rows: list[int] | None = None,
                   num_dense: int = 13, zipf: float = 1.05, true_dim: int = 8, ctr: float = 0.25,
                   signal: float = 2.5, val: float = 0.1, test: float = 0.1, seed: int = 0,
                   overwrite: bool = False) -> Path:
    """Write a prepared SYNTHETIC dataset with the given table sizes to ``out``."""
    table_rows = table_rows or [100_000, 20_000, 5_000, 1_000, 200, 50]
    if samples < 10 or any(r < 3 for r in table_rows) or true_dim < 1 or not 0 < ctr < 1:
        raise UserError("synthetic data needs samples >= 10, every table >= 3 rows, true_dim >= 1, 0 < ctr < 1",
                        "fix the generator options")
    rng = np.random.default_rng(seed)
    t = len(table_rows)
    pairs = t * (t - 1) / 2
    w_dense = rng.normal(0, 0.4 / math.sqrt(num_dense), num_dense)
    split = split_of(np.arange(samples), seed, val, test)
    sizes = {name: int((split == s).sum()) for s, name in enumerate(SPLITS)}

    def chunk(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.stack([zipf_ids(rng, r, n, zipf) for r in table_rows], axis=1)
        vecs = [hashed_normal(seed, j, ids[:, j], true_dim + 1) for j in range(t)]
        total = sum(v[:, :true_dim] for v in vecs)
        sq = sum((v[:, :true_dim] ** 2).sum(1) for v in vecs)
        inter = 0.5 * ((total ** 2).sum(1) - sq) / (true_dim * math.sqrt(max(pairs, 1)))  # one table: no pairs, 0
        bias = sum(v[:, true_dim] for v in vecs) / math.sqrt(t)
        counts = np.floor(np.exp(rng.normal(1.0, 1.5, (n, num_dense)))).astype(np.float32)
        dense = np.log1p(counts)
        logit = signal * inter + 0.5 * bias + (dense - 1.2) @ w_dense
        return ids.astype(np.int32), dense.astype(np.float32), logit

    probe = chunk(min(samples, 20_000))[2]
    lo, hi = -20.0, 20.0
    for _ in range(60):  # calibrate the intercept so the mean click rate is ``ctr``
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (1 / (1 + np.exp(-(probe + mid)))).mean() < ctr else (lo, mid)
    intercept = (lo + hi) / 2
    with output_dir(out, kind="dataset", overwrite=overwrite) as tmp, progress("synthetic data", samples) as advance:
        writer = DatasetWriter(tmp, sizes, num_dense, t)
        for start in range(0, samples, CHUNK):
            n = min(CHUNK, samples - start)
            ids, dense, logit = chunk(n)
            label = (rng.random(n) < 1 / (1 + np.exp(-(logit + intercept)))).astype(np.uint8)
            part = split[start:start + n]
            for s, name in enumerate(SPLITS):
                m = part == s
                if m.any():
                    writer.append(name, dense[m], ids[m], label[m])
            advance(n)
        writer.finish({"source": "synthetic", "synthetic": True, "num_dense": num_dense, "oov_row": 0,
                       "generator": {"samples": samples, "table_rows": table_rows, "zipf": zipf,
                                     "true_dim": true_dim, "ctr": ctr, "signal": signal, "seed": seed},
                       "split": {"method": "hash of row index", "seed": seed, "val": val, "test": test},
                       "tables": [{"name": f"C{j + 1}", "rows": r} for j, r in enumerate(table_rows)]})
    say(f"SYNTHETIC dataset: {samples} rows, tables {table_rows} -> {out}")
    return Path(out)
