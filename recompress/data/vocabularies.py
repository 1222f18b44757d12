"""Vocabulary fingerprints: a hash of which raw value each row of a table stands for, in row order. Datasets
record one per table; a model records those of the data it was trained on, and is refused on a dataset
whose vocabulary has the same size but other values or another order (row counts alone cannot tell)."""

from __future__ import annotations

import hashlib

import numpy as np


def fingerprint(values: np.ndarray) -> str:
    """16 hex digits of SHA-256 over the values in row order (integers as little-endian int64, strings as
    UTF-8, one per line)."""
    a = np.asarray(values)
    if a.dtype.kind in "US":
        data = "\n".join(str(x) for x in a.tolist()).encode()
    else:
        data = np.ascontiguousarray(a, dtype="<i8").tobytes()
    return hashlib.sha256(a.dtype.kind.encode() + data).hexdigest()[:16]
