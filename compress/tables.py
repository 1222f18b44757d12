"""The one embedding-table interface and its stored forms.

Every kind maps ids to rows with :meth:`Table.lookup`; pooling (sum over a bag) is shared, so a
model only ever sees ``table(ids, offsets)``. A table's stored tensors are its registered
parameters/buffers, so ``state_dict`` is the serialization and ``stored_bytes`` is exact by dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recompress.spec import TableSpec


def offsets_to_bags(ids: Tensor, offsets: Tensor) -> Tensor:
    """EmbeddingBag-style (flat ids, bag start offsets) -> padded ``[B, L]`` bags, -1 marking padding."""
    n, b = ids.numel(), offsets.numel()
    lengths = torch.diff(offsets, append=torch.tensor([n], dtype=offsets.dtype))
    width = int(lengths.max().item()) if b else 0
    pos = torch.arange(width).unsqueeze(0)
    take = offsets.unsqueeze(1) + pos
    valid = pos < lengths.unsqueeze(1)
    return torch.where(valid, ids[take.clamp(max=max(n - 1, 0))], torch.full_like(take, -1))


def pool(rows: Tensor, ids: Tensor) -> Tensor:
    """Sum over the bag axis (-2) of looked-up ``rows``, skipping positions where ``ids`` is -1 (padding)."""
    return (rows * (ids >= 0).unsqueeze(-1).to(rows.dtype)).sum(dim=-2)


class Table(nn.Module, ABC):
    """An embedding table with ``rows`` ids and ``dim``-wide output rows."""

    kind: ClassVar[str]

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.rows, self.dim = rows, dim

    @abstractmethod
    def lookup(self, ids: Tensor) -> Tensor:
        """Rows for ``ids`` of any shape (values in ``[0, rows)``) -> ``[*ids.shape, dim]``."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Kind-specific parameters that, with rows and dim, rebuild an empty table of this shape."""

    @abstractmethod
    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters updated through sparse (row) gradients during training."""

    @abstractmethod
    def reset_parameters(self, gen: torch.Generator) -> None:
        """Fresh random weights for training from scratch (dlrm's U(-1/sqrt(rows), 1/sqrt(rows)) scale)."""

    def forward(self, ids: Tensor, offsets: Tensor | None = None) -> Tensor:
        """Sum-pooled bags: ``ids`` is ``[B, L]`` with -1 padding, or flat ids with bag ``offsets``."""
        if offsets is not None:
            ids = offsets_to_bags(ids, offsets)
        return pool(self.lookup(ids.clamp(min=0)), ids)

    def dense_weight(self) -> Tensor:
        """The full ``rows x dim`` table this kind represents (for tests, export materialization)."""
        with torch.no_grad():
            return self.lookup(torch.arange(self.rows))

    def stored_bytes(self) -> int:
        """Exact bytes of everything stored for this table (all tensors, by dtype)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def spec(self, name: str, role: str = "sparse_feature") -> TableSpec:
        return TableSpec(name=name, rows=self.rows, dim=self.dim, kind=self.kind, role=role,
                         params=self.config())


class DenseTable(Table):
    """A plain ``rows x dim`` float table."""

    kind = "dense"

    def __init__(self, rows: int, dim: int, weight: Tensor | None = None) -> None:
        super().__init__(rows, dim)
        self.weight = nn.Parameter(torch.empty(rows, dim) if weight is None else weight.detach().clone())

    def lookup(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight, sparse=True)

    def config(self) -> dict[str, Any]:
        return {}

    def reset_parameters(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            bound = self.rows ** -0.5
            self.weight.uniform_(-bound, bound, generator=gen)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight]

    def dense_weight(self) -> Tensor:
        return self.weight.detach()


class FactorizedTable(Table):
    """``rows x inner`` table times an ``inner x dim`` matrix.

    With ``inner >= dim`` this is MLET's two-layer training form (collapsed after training); with
    ``inner < dim`` it is a low-rank stored form (truncated SVD). Same math, one class.
    """

    kind = "factorized"

    def __init__(self, rows: int, dim: int, inner: int,
                 left: Tensor | None = None, right: Tensor | None = None) -> None:
        super().__init__(rows, dim)
        self.inner = inner
        self.left = nn.Parameter(torch.empty(rows, inner) if left is None else left.detach().clone())
        self.right = nn.Parameter(torch.empty(inner, dim) if right is None else right.detach().clone())

    def lookup(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.left, sparse=True) @ self.right

    def config(self) -> dict[str, Any]:
        return {"inner": self.inner}

    def reset_parameters(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            bound = self.rows ** -0.5
            self.left.uniform_(-bound, bound, generator=gen)
            self.right.normal_(0.0, self.inner ** -0.5, generator=gen)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.left]

    def collapse(self) -> DenseTable:
        """The product as one dense table (computed in float64, so exact to float32 rounding)."""
        with torch.no_grad():
            w = (self.left.double() @ self.right.double()).float()
        return DenseTable(self.rows, self.dim, w)


def collapse_factorized(tables: nn.ModuleDict, names: list[str]) -> list[str]:
    """Replace the named factorized tables by their dense product in place; returns those collapsed."""
    done = []
    for n in names:
        if isinstance(tables[n], FactorizedTable):
            tables[n] = tables[n].collapse()
            done.append(n)
    return done


TABLE_KINDS: dict[str, type[Table]] = {cls.kind: cls for cls in (DenseTable, FactorizedTable)}


def empty_table(spec: TableSpec) -> Table:
    """An uninitialized table with the shapes ``spec`` describes (weights are loaded afterwards)."""
    try:
        cls = TABLE_KINDS[spec.kind]
    except KeyError:
        raise ValueError(f"unknown table kind {spec.kind!r}") from None
    return cls(spec.rows, spec.dim, **spec.params)
