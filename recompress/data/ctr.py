"""A prepared CTR dataset: a folder of memory-mapped arrays per split plus ``meta.json``.

Layout: ``meta.json`` (tables with row counts, dense count, split sizes, source, fingerprint) and,
per split ``train|val|test``: ``{split}.dense.npy`` float32 [N, num_dense],
``{split}.sparse.npy`` int32 [N, T] (row ids, 0 = out-of-vocabulary) and ``{split}.label.npy`` uint8 [N].
Readers and generators write this folder; training and evaluation only read it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recompress.distributed import shard
from recompress.errors import UserError
from recompress.lazy import lazy

from .arrays import load_array

if TYPE_CHECKING:
    import torch
else:
    torch = lazy("torch")  # readers that write datasets (recompress data) never need it

SPLITS = ("train", "val", "test")
META = "meta.json"


@dataclass
class Batch:
    dense: torch.Tensor   # [B, num_dense] float32
    sparse: torch.Tensor  # [B, T, 1] int64
    label: torch.Tensor   # [B] float32


class CTRDataset:
    """Read-only view of a prepared dataset folder."""

    kind = "ctr"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta: dict[str, Any] = json.loads((path / META).read_text())
        self.table_names: list[str] = [t["name"] for t in self.meta["tables"]]
        self.table_rows: list[int] = [int(t["rows"]) for t in self.meta["tables"]]
        self._rows = np.array(self.table_rows, dtype=np.int64)
        self.num_dense: int = int(self.meta["num_dense"])

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def size(self, split: str) -> int:
        return int(self.meta["splits"].get(split, 0))

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.size(split) == 0:
            raise UserError(f"dataset {self.path} has no rows in its {split!r} split",
                            "prepare it with a non-zero split fraction")
        dense, sparse, label = (load_array(self.path / f"{split}.{kind}.npy") for kind in ("dense", "sparse", "label"))
        return dense, sparse, label

    def ids(self, split: str, sparse: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
        """Rows ``rows`` of ``split``'s sparse ids (``sparse``, from :meth:`arrays`) as int64 ``[n, T]``, refused
        where an id is outside its table: a dataset damaged or edited after it was prepared (no lookup may index
        past a table, and none is a padding id here)."""
        ids = np.asarray(sparse[rows], dtype=np.int64)
        bad = (ids < 0) | (ids >= self._rows)
        if bad.any():
            r, t = (int(x) for x in np.argwhere(bad)[0])
            row = (rows.start or 0) + r if isinstance(rows, slice) else int(rows[r])
            raise UserError(f"{self.path / f'{split}.sparse.npy'} row {row}: id {ids[r, t]} of table "
                            f"{self.table_names[t]} is outside its {self.table_rows[t]} rows",
                            "the dataset was damaged or edited after it was prepared: prepare it again")
        return ids

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                limit: int | None = None, part: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        """Batches in file order, or shuffled with ``seed``; ``limit`` caps the rows read. With ``part``
        (rank, ranks): only that rank's rows of each batch are read (``recompress.distributed.shard``)."""
        dense, sparse, label = self.arrays(split)
        n = min(len(label), limit) if limit else len(label)
        order = np.random.default_rng(seed).permutation(n) if shuffle else None
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            # sorted: monotone gathers are much faster on memory maps
            idx = np.sort(order[start:stop]) if order is not None else slice(start, stop)
            if part[1] > 1:
                mine = shard(stop - start, part)
                idx = idx[mine] if order is not None else slice(start + mine.start, start + mine.stop)
            yield Batch(torch.from_numpy(np.array(dense[idx], dtype=np.float32)),
                        torch.from_numpy(self.ids(split, sparse, idx)).unsqueeze(-1),
                        torch.from_numpy(np.asarray(label[idx], dtype=np.float32)))

    def id_counts(self, split: str = "train", chunk: int = 1 << 20) -> list[np.ndarray]:
        """How often each id of each table occurs in ``split`` (the frequencies hashing methods use)."""
        _, sparse, _ = self.arrays(split)
        counts = [np.zeros(r, dtype=np.int64) for r in self.table_rows]
        for s in range(0, len(sparse), chunk):
            block = self.ids(split, sparse, slice(s, s + chunk))
            for t, c in enumerate(counts):
                c += np.bincount(block[:, t], minlength=len(c))
        return counts

    def sample(self, split: str, n: int, seed: int = 0) -> Batch:
        """``n`` rows drawn without replacement (or all rows), in sorted order."""
        dense, sparse, label = self.arrays(split)
        idx = np.sort(np.random.default_rng(seed).choice(len(label), size=min(n, len(label)), replace=False))
        return Batch(torch.from_numpy(np.asarray(dense[idx], dtype=np.float32)),
                     torch.from_numpy(self.ids(split, sparse, idx)).unsqueeze(-1),
                     torch.from_numpy(np.asarray(label[idx], dtype=np.float32)))


class DatasetWriter:
    """Writes a prepared dataset into ``root`` (a temporary folder the caller renames)."""

    def __init__(self, root: Path, sizes: dict[str, int], num_dense: int, num_tables: int) -> None:
        self.root, self.sizes = root, sizes
        self.pos = dict.fromkeys(sizes, 0)
        self.maps = {}
        for split, n in sizes.items():
            if n == 0:
                continue
            mk = lambda kind, dtype, shape: np.lib.format.open_memmap(
                root / f"{split}.{kind}.npy", mode="w+", dtype=dtype, shape=shape)
            self.maps[split] = (mk("dense", np.float32, (n, num_dense)), mk("sparse", np.int32, (n, num_tables)),
                                mk("label", np.uint8, (n,)))

    def append(self, split: str, dense: np.ndarray, sparse: np.ndarray, label: np.ndarray) -> None:
        a, n = self.pos[split], len(label)
        d, s, lab = self.maps[split]
        d[a:a + n], s[a:a + n], lab[a:a + n] = dense, sparse, label
        self.pos[split] = a + n

    def finish(self, meta: dict[str, Any]) -> None:
        for split, n in self.sizes.items():
            if self.pos[split] != n:
                raise RuntimeError(f"{split}: wrote {self.pos[split]} rows, expected {n}")
        for arrays in self.maps.values():
            for a in arrays:
                a.flush()
        h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        meta = {**meta, "splits": self.sizes, "fingerprint": h.hexdigest()[:16]}
        (self.root / META).write_text(json.dumps(meta, indent=2) + "\n")


def split_of(row_index: np.ndarray, seed: int, val: float, test: float) -> np.ndarray:
    """Deterministic split (0 train, 1 val, 2 test) from a hash of each row's index: streamable."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        x = row_index.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        u = (x ^ (x >> np.uint64(31))).astype(np.float64) / 2.0**64
    return np.where(u < test, 2, np.where(u < test + val, 1, 0)).astype(np.int8)
