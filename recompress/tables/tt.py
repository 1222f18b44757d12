"""Tensor-train (TT-Rec) tables: an n x d table as a TT-matrix that is never materialized.

Row id i is written in mixed radix (i_1, ..., i_K) over ``row_shape`` (product >= n, padded) and a
column j as (j_1, ..., j_K) over ``dim_shape`` (product = d). Core k is stored as a row matrix
``[row_shape[k], ranks[k] * dim_shape[k] * ranks[k+1]]`` so a lookup gathers one row per core by digit
and contracts them with batched matmuls: only the requested rows are ever computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .base import Table


class TTTable(Table):
    """``rows x dim`` table in tensor-train form with bond ``ranks`` (``[1, r_1, ..., r_{K-1}, 1]``)."""

    kind = "tt"

    def __init__(self, rows: int, dim: int, row_shape: list[int], dim_shape: list[int], ranks: list[int]) -> None:
        super().__init__(rows, dim)
        if math.prod(row_shape) < rows or math.prod(dim_shape) != dim or len(ranks) != len(row_shape) + 1:
            raise ValueError(f"TT shapes {row_shape} x {dim_shape} with ranks {ranks} do not fit a {rows} x {dim} table")
        self.row_shape, self.dim_shape, self.ranks = list(row_shape), list(dim_shape), list(ranks)
        strides = [math.prod(row_shape[k + 1:]) for k in range(len(row_shape))]
        self.register_buffer("strides", torch.tensor(strides), persistent=False)
        self.register_buffer("radix", torch.tensor(row_shape), persistent=False)
        for k, (n, d) in enumerate(zip(row_shape, dim_shape)):
            self.register_parameter(f"core{k}", nn.Parameter(torch.empty(n, ranks[k] * d * ranks[k + 1])))

    def row_matrices(self) -> tuple[str, ...]:
        return tuple(f"core{k}" for k in range(len(self.row_shape)))

    def config(self) -> dict[str, Any]:
        return {"row_shape": self.row_shape, "dim_shape": self.dim_shape, "ranks": self.ranks}

    def lookup(self, ids: Tensor) -> Tensor:
        shape = ids.shape
        flat = ids.reshape(-1)
        digits = (flat.unsqueeze(1) // self.strides) % self.radix  # [B, K]
        r, d = self.ranks, self.dim_shape
        out = self.gather("core0", digits[:, 0]).view(-1, d[0], r[1])
        width = d[0]
        for k in range(1, len(self.row_shape)):
            core = self.gather(f"core{k}", digits[:, k]).view(-1, r[k], d[k] * r[k + 1])
            width *= d[k]
            out = torch.bmm(out, core).view(-1, width, r[k + 1])
        return out.reshape(*shape, self.dim)

    @torch.no_grad()
    def dense_blocks(self) -> Iterator[tuple[int, Tensor]]:
        """Rows in order, in blocks of about 65k rows computed by GEMMs (far faster than per-row lookups for a
        full reconstruction). With 3 cores, memory does not grow with the rows: each block is the first
        digit's slice of core 0 times core 1 (a few i_2 values) times core 2. With more, core 0's slice times
        the contraction of the other cores (held whole: rows / n_1 * dim / d_1 * r_1 values)."""
        if len(self.row_shape) == 3:
            yield from self._blocks_of_three()
            return
        r, n, d = self.ranks, self.row_shape, self.dim_shape
        rest = self.matrix("core1").view(n[1], r[1], d[1], r[2]).permute(1, 0, 2, 3)  # [r1, i2, j2, r2]
        for k in range(2, len(n)):
            core = self.matrix(f"core{k}").view(n[k], r[k], d[k], r[k + 1])
            rest = torch.einsum("a...b,ibjc->a...ijc", rest, core)
        m = math.prod(n[1:])
        # rest: [r1, i2, j2, i3, j3, ...] -> [r1, (i2 i3 ...), (j2 j3 ...)]
        k = len(n) - 1
        rest = rest.reshape(r[1], *[x for pair in zip(n[1:], d[1:]) for x in pair])
        rest = rest.permute(0, *range(1, 2 * k, 2), *range(2, 2 * k + 1, 2)).reshape(r[1], -1)
        core0 = self.matrix("core0").view(n[0], d[0], r[1])
        for i in range(n[0]):
            start = i * m
            if start >= self.rows:
                break
            block = (core0[i] @ rest).view(d[0], m, -1).permute(1, 0, 2).reshape(m, self.dim)
            yield start, block[:self.rows - start]

    def _blocks_of_three(self) -> Iterator[tuple[int, Tensor]]:
        (n1, n2, n3), (d1, d2, d3), r = self.row_shape, self.dim_shape, self.ranks
        core0 = self.matrix("core0").view(n1, d1, r[1])
        core1 = self.matrix("core1").view(n2, r[1], d2, r[2])
        core2 = self.matrix("core2").view(n3, r[2], d3)
        step = max(1, (1 << 16) // n3)  # i_2 values per block
        for i1 in range(n1):
            left = torch.einsum("ja,iakb->ijkb", core0[i1], core1)  # [i2, j1, j2, r2]
            for i2 in range(0, n2, step):
                start = (i1 * n2 + i2) * n3
                if start >= self.rows:
                    return
                block = torch.einsum("ijkb,lbm->iljkm", left[i2:i2 + step], core2).reshape(-1, self.dim)
                yield start, block[:self.rows - start]

    def flops(self) -> int:
        r, d, width, total = self.ranks, self.dim_shape, self.dim_shape[0], 0
        for k in range(1, len(d)):
            total += 2 * width * r[k] * d[k] * r[k + 1]
            width *= d[k]
        return total

    def reset_parameters(self, gen: torch.Generator) -> None:
        """TT-Rec's sampled-Gaussian init: the product's entries get the dense table's init variance."""
        target = (self.rows ** -0.5) / math.sqrt(3.0)  # std of U(-1/sqrt(n), 1/sqrt(n))
        k = len(self.row_shape)
        sigma = (target ** 2 / math.prod(self.ranks[1:-1])) ** (1.0 / (2 * k))
        with torch.no_grad():
            for name in self.row_matrices():
                getattr(self, name).normal_(0.0, sigma, generator=gen)
