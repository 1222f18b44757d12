"""Distinct values numbered in order of first appearance, built chunk by chunk (memory grows with the
number of distinct values, never with the rows). Each chunk is dictionary-encoded by pyarrow (a hash table,
several times faster than sorting it); only the chunk's distinct values are looked up in the running set."""

from __future__ import annotations

import numpy as np


class FirstSeen:
    """Ids 0, 1, ... for distinct values in order of first appearance; optionally counts occurrences."""

    def __init__(self, dtype: type = np.int64) -> None:
        self.sorted = np.empty(0, dtype)  # every value seen, sorted
        self.sorted_ids = np.empty(0, np.int64)  # id of sorted[i]
        self.order: list[np.ndarray] = []  # values in id order, per chunk
        self.counts = np.empty(0, np.int64)  # occurrences among the rows passed as counted, by id

    def __len__(self) -> int:
        return len(self.sorted)

    def encode(self, values: np.ndarray, counted: np.ndarray | None = None) -> np.ndarray:
        """Ids of ``values`` (int64), numbering the unseen ones in order of first appearance; the rows where
        ``counted`` is true are counted."""
        import pyarrow as pa
        import pyarrow.compute as pc

        enc = pc.dictionary_encode(pa.array(values))
        local = enc.indices.to_numpy()
        u = enc.dictionary.to_numpy()  # this chunk's distinct values, in order of first appearance
        pos = np.searchsorted(self.sorted, u)
        hit = np.zeros(len(u), bool)
        inside = pos < len(self.sorted)
        hit[inside] = self.sorted[pos[inside]] == u[inside]
        ids = np.empty(len(u), np.int64)
        ids[hit] = self.sorted_ids[pos[hit]]
        new = np.flatnonzero(~hit)
        ids[new] = np.arange(len(self.sorted), len(self.sorted) + len(new))
        if len(new):
            self.order.append(u[new])
            srt = new[np.argsort(u[new], kind="stable")]  # equal insert positions must take ascending values
            self.sorted = np.insert(self.sorted, pos[srt], u[srt])
            self.sorted_ids = np.insert(self.sorted_ids, pos[srt], ids[srt])
            self.counts = np.concatenate([self.counts, np.zeros(len(new), np.int64)])
        if counted is not None:
            self.counts[ids] += np.bincount(local[counted], minlength=len(u))
        return ids[local]

    def values(self) -> np.ndarray:
        """The distinct values in id order."""
        return np.concatenate(self.order) if self.order else self.sorted[:0].copy()
