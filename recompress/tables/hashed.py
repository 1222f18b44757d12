"""Hashing-family table kinds: hashing trick, QR compositional, frequency-aware double hashing.

Every id -> bucket map is a pure function of parameters kept in the table's config (universal hash
constants, collision counts) or in a stored index buffer, so an export maps ids exactly as training did.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Table

PRIME = (1 << 31) - 1  # a * id stays below 2**62 for ids < 2**31, so int64 arithmetic is exact


def universal_hash(ids: Tensor, a: int, b: int, buckets: int) -> Tensor:
    """``((a * id + b) mod p) mod buckets`` with p = 2^31 - 1 (Carter-Wegman)."""
    return ((ids * a + b) % PRIME) % buckets


class HashedTable(Table):
    """Hashing trick: ids share ``buckets`` rows through one seeded universal hash."""

    kind = "hash"

    def __init__(self, rows: int, dim: int, buckets: int, a: int, b: int) -> None:
        super().__init__(rows, dim)
        self.buckets, self.a, self.b = buckets, a, b
        self.weight = nn.Parameter(torch.empty(buckets, dim))

    def config(self) -> dict[str, Any]:
        return {"buckets": self.buckets, "a": self.a, "b": self.b}

    def bucket(self, ids: Tensor) -> Tensor:
        return universal_hash(ids, self.a, self.b, self.buckets)

    def lookup(self, ids: Tensor) -> Tensor:
        return self.gather("weight", self.bucket(ids))

    def reset_parameters(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            bound = self.rows ** -0.5
            self.weight.uniform_(-bound, bound, generator=gen)


class QRTable(Table):
    """Quotient-remainder compositional embedding (Shi et al. 2020; dlrm's ``QREmbeddingBag``).

    ``q[id // collisions]`` and ``r[id % collisions]`` combined by ``op`` (mult, add, or concat of two
    d/2-wide halves). The row lookup combines before any pooling, so multi-hot bags are exact (dlrm
    pools first, which its maintainers note is right only for one-hot features, dlrm#366).
    """

    kind = "qr"

    def __init__(self, rows: int, dim: int, collisions: int, op: str, q_device: str | None = None) -> None:
        super().__init__(rows, dim)
        self.collisions, self.op = collisions, op
        width = dim // 2 if op == "concat" else dim
        self.q = nn.Parameter(torch.empty(-(-rows // collisions), width, device=q_device))  # meta: written in blocks
        self.r = nn.Parameter(torch.empty(collisions, width))

    def row_matrices(self) -> tuple[str, ...]:
        return ("q", "r")

    def config(self) -> dict[str, Any]:
        return {"collisions": self.collisions, "op": self.op}

    def lookup(self, ids: Tensor) -> Tensor:
        q, r = self.gather("q", ids // self.collisions), self.gather("r", ids % self.collisions)
        if self.op == "mult":
            return q * r
        if self.op == "add":
            return q + r
        return torch.cat([q, r], dim=-1)

    def flops(self) -> int:
        return 0 if self.op == "concat" else self.dim

    def reset_parameters(self, gen: torch.Generator) -> None:
        """Zero-mean rows like a dense table's init. (dlrm draws both tables from U(sqrt(1/n), 1): all
        positive, so every product or sum starts far from zero and strongly correlated.)"""
        bound = self.rows ** -0.5
        with torch.no_grad():
            if self.op == "mult":
                self.q.uniform_(0.9, 1.1, generator=gen)  # near-identity multiplier
                self.r.uniform_(-bound, bound, generator=gen)
            else:
                scale = bound / 2 ** 0.5 if self.op == "add" else bound
                self.q.uniform_(-scale, scale, generator=gen)
                self.r.uniform_(-scale, scale, generator=gen)


class FreqHashTable(Table):
    """Frequency-aware double hashing (Zhang et al. 2020): hot ids keep their own rows, the tail shares
    ``buckets`` rows through two universal hashes whose rows are summed.

    ``slot`` (int32, one per id) holds an id's row in ``hot`` or -1 for the tail; its bytes are counted.
    ``hot_share`` is the fraction of training lookups that hit hot ids (for the bytes-read estimate).
    """

    kind = "freqhash"

    def __init__(self, rows: int, dim: int, hot: int, buckets: int, hashes: list[list[int]],
                 hot_share: float = 0.0) -> None:
        super().__init__(rows, dim)
        self.hot_rows, self.buckets, self.hashes, self.hot_share = hot, buckets, hashes, hot_share
        self.register_buffer("slot", torch.full((rows,), -1, dtype=torch.int32))
        self.hot = nn.Parameter(torch.empty(max(hot, 1), dim))
        self.tail = nn.Parameter(torch.empty(buckets, dim))

    def row_matrices(self) -> tuple[str, ...]:
        return ("hot", "tail")

    def access(self) -> list[tuple[str, float]]:
        tail = 1.0 - self.hot_share
        return [("slot", 1.0), ("hot", self.hot_share), ("tail", 2 * tail)]

    def row_bytes(self, name: str) -> int:
        return self.slot.element_size() if name == "slot" else super().row_bytes(name)

    def config(self) -> dict[str, Any]:
        return {"hot": self.hot_rows, "buckets": self.buckets, "hashes": self.hashes, "hot_share": self.hot_share}

    def tail_buckets(self, ids: Tensor) -> list[Tensor]:
        return [universal_hash(ids, a, b, self.buckets) for a, b in self.hashes]

    def lookup(self, ids: Tensor) -> Tensor:
        slot = self.slot[ids].long()
        hot = self.gather("hot", slot.clamp(min=0))
        h1, h2 = self.tail_buckets(ids)
        tail = self.gather("tail", h1) + self.gather("tail", h2)
        return torch.where((slot >= 0).unsqueeze(-1), hot, tail)

    def flops(self) -> int:
        return self.dim

    def reset_parameters(self, gen: torch.Generator) -> None:
        bound = self.rows ** -0.5
        with torch.no_grad():
            self.hot.uniform_(-bound, bound, generator=gen)
            self.tail.uniform_(-bound / 2 ** 0.5, bound / 2 ** 0.5, generator=gen)
