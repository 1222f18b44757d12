"""The one embedding-table interface, its dense and factorized kinds, and rebuilding any kind from a spec.

Every kind maps ids to rows with :meth:`Table.lookup`; pooling (sum over a bag) is shared, so a
model only ever sees ``table(ids, offsets)``. A table's stored tensors are its registered
parameters/buffers, so ``state_dict`` is the serialization and ``stored_bytes`` is exact by dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recompress.spec import TableSpec

from .rowformat import units_touched
from .rowwise import QuantizedRows


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
    """An embedding table with ``rows`` ids and ``dim``-wide output rows.

    A kind reads its stored row matrices (named by :meth:`row_matrices`) only through :meth:`gather`,
    so any of them can be swapped for row-wise quantized storage (:meth:`quantize`) without the kind
    knowing: that is how ``tt,int8`` or ``qr,int4`` compose.
    """

    kind: ClassVar[str]
    KINDS: ClassVar[dict[str, type[Table]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "kind" in cls.__dict__:
            Table.KINDS[cls.kind] = cls

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.rows, self.dim = rows, dim
        self.stores = nn.ModuleDict()  # row matrix name -> QuantizedRows, once quantized

    @abstractmethod
    def lookup(self, ids: Tensor) -> Tensor:
        """Rows for ``ids`` of any shape (values in ``[0, rows)``) -> ``[*ids.shape, dim]``."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Kind-specific parameters that, with rows and dim, rebuild an empty table of this shape."""

    @abstractmethod
    def reset_parameters(self, gen: torch.Generator) -> None:
        """Fresh random weights for training from scratch (dlrm's U(-1/sqrt(rows), 1/sqrt(rows)) scale)."""

    def row_matrices(self) -> tuple[str, ...]:
        """Names of the 2-D row matrices that lookups gather from (the quantizable storage)."""
        return ("weight",)

    def access(self) -> list[tuple[str, float]]:
        """(stored matrix, rows read from it per looked-up id, on average) for the bytes-read estimate."""
        return [(n, 1.0) for n in self.row_matrices()]

    def flops(self) -> int:
        """Arithmetic per looked-up id beyond reading rows (e.g. TT contractions)."""
        return 0

    def gather(self, name: str, idx: Tensor) -> Tensor:
        """Float rows ``idx`` of row matrix ``name``, from whichever storage holds it."""
        if name in self.stores:
            return self.stores[name](idx)
        return F.embedding(idx, getattr(self, name), sparse=True)

    def matrix(self, name: str) -> Tensor:
        """Row matrix ``name`` as float (dequantized if stored quantized)."""
        if name in self.stores:
            return self.stores[name].dequantized()
        return getattr(self, name).detach()

    @property
    def quant(self) -> dict[str, Any] | None:
        return next(iter(self.stores.values())).config() if len(self.stores) else None

    @property
    def form(self) -> str:
        """The kind plus its storage, e.g. ``tt`` or ``tt+int8``; methods declare which forms they read."""
        return f"{self.kind}+{self.quant['dtype']}" if self.quant else self.kind

    def quantize(self, fmt: str, align: int = 1, fill: bool = True) -> None:
        """Replace every row matrix by row-wise ``fmt`` storage (quantizing the current values if ``fill``)."""
        for name in self.row_matrices():
            w = getattr(self, name)
            store = QuantizedRows(w.shape[0], w.shape[1], fmt, align)
            if fill:
                store.fill(w.detach())
            delattr(self, name)
            self.stores[name] = store

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters updated through sparse (row) gradients during training."""
        return [getattr(self, n) for n in self.row_matrices() if n not in self.stores]

    def forward(self, ids: Tensor, offsets: Tensor | None = None) -> Tensor:
        """Sum-pooled bags: ``ids`` is ``[B, L]`` with -1 padding, or flat ids with bag ``offsets``."""
        if offsets is not None:
            ids = offsets_to_bags(ids, offsets)
        return pool(self.lookup(ids.clamp(min=0)), ids)

    def dense_blocks(self) -> Iterator[tuple[int, Tensor]]:
        """``(first row, rows)`` blocks of the full ``rows x dim`` table, in order (bounded memory)."""
        with torch.no_grad():
            for s in range(0, self.rows, 1 << 16):
                yield s, self.lookup(torch.arange(s, min(s + (1 << 16), self.rows)))

    def dense_weight(self) -> Tensor:
        """The full ``rows x dim`` table this kind represents (for tests, export materialization)."""
        return torch.cat([b for _, b in self.dense_blocks()])

    def stored_bytes(self) -> int:
        """Exact bytes of everything stored for this table (all tensors, by dtype, padding included)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def row_bytes(self, name: str) -> int:
        """Bytes of one stored row of matrix ``name`` (FBGEMM fused-row layout when quantized)."""
        if name in self.stores:
            return self.stores[name].stored_row_bytes()
        t = getattr(self, name)
        return (t.shape[1] if t.dim() > 1 else 1) * t.element_size()

    def lookup_cost(self) -> dict[str, Any]:
        """Estimated bytes moved and FLOPs per looked-up id: GPU 32-byte sectors, CPU 64-byte lines."""
        reads = [(self.row_bytes(n), k) for n, k in self.access()]
        return {"rows_read": sum(k for _, k in reads),
                "bytes_useful": round(sum(b * k for b, k in reads), 2),
                "bytes_read_gpu": round(sum(units_touched(b, 32) * 32 * k for b, k in reads), 2),
                "bytes_read_cpu": round(sum(units_touched(b, 64) * 64 * k for b, k in reads), 2),
                "flops": self.flops()}

    def spec(self, name: str, role: str = "sparse_feature") -> TableSpec:
        params = self.config() | ({"quant": self.quant} if self.quant else {})
        return TableSpec(name=name, rows=self.rows, dim=self.dim, kind=self.kind, role=role, params=params)


class DenseTable(Table):
    """A plain ``rows x dim`` float table. One made on the meta device (``deferred=True``) holds no values:
    its initialization is only recorded, and drawn later in row blocks by whoever holds its rows
    (:meth:`initial_rows`; TorchRec's shards in ``recompress.sharding``)."""

    kind = "dense"
    DRAW_ROWS_BYTES = 1 << 24  # initial values drawn 16 MB at a time

    def __init__(self, rows: int, dim: int, weight: Tensor | None = None, deferred: bool = False) -> None:
        super().__init__(rows, dim)
        if deferred:
            weight = torch.empty(rows, dim, device="meta")
        self.weight = nn.Parameter(torch.empty(rows, dim) if weight is None else weight.detach().clone())
        self.init_draw: tuple[Tensor, float] | None = None  # (generator state, bound) of a deferred initialization

    def lookup(self, ids: Tensor) -> Tensor:
        return self.gather("weight", ids)

    def config(self) -> dict[str, Any]:
        return {}

    def reset_parameters(self, gen: torch.Generator) -> None:
        bound = self.rows ** -0.5
        if self.weight.is_meta:  # record it, and move the generator on as drawing the values would
            self.init_draw = (gen.get_state(), bound)
            for _ in self._draws(gen, bound):
                pass
            return
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=gen)

    def initial_rows(self) -> Iterator[tuple[int, Tensor]]:
        """``(first row, rows)`` blocks of a deferred initialization: the values ``reset_parameters`` would have
        drawn (CPU uniform draws are sequential, so blocks of one stream are the whole draw)."""
        state, bound = self.init_draw
        gen = torch.Generator()
        gen.set_state(state)
        yield from self._draws(gen, bound)

    def _draws(self, gen: torch.Generator, bound: float) -> Iterator[tuple[int, Tensor]]:
        step = max(1, self.DRAW_ROWS_BYTES // (4 * self.dim))
        for start in range(0, self.rows, step):
            yield start, torch.empty(min(step, self.rows - start), self.dim).uniform_(-bound, bound, generator=gen)

    def dense_weight(self) -> Tensor:
        return self.matrix("weight")


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
        return self.gather("left", ids) @ self.right

    def row_matrices(self) -> tuple[str, ...]:
        return ("left",)

    def flops(self) -> int:
        return 2 * self.inner * self.dim

    def config(self) -> dict[str, Any]:
        return {"inner": self.inner}

    def reset_parameters(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            bound = self.rows ** -0.5
            self.left.uniform_(-bound, bound, generator=gen)
            self.right.normal_(0.0, self.inner ** -0.5, generator=gen)

    def collapse(self) -> DenseTable:
        """The product as one dense table (computed in float64, so exact to float32 rounding)."""
        with torch.no_grad():
            w = (self.matrix("left").double() @ self.right.double()).float()
        return DenseTable(self.rows, self.dim, w)


def collapse_factorized(tables: nn.ModuleDict, names: list[str]) -> list[str]:
    """Replace the named factorized tables by their dense product in place; returns those collapsed."""
    done = []
    for n in names:
        if isinstance(tables[n], FactorizedTable):
            tables[n] = tables[n].collapse()
            done.append(n)
    return done


def empty_table(spec: TableSpec, unallocated: bool = False) -> Table:
    """An uninitialized table with the shapes and storage ``spec`` describes (weights are loaded afterwards).

    ``unallocated``: its stored tensors are shapes only (on the meta device), for a loader that assigns
    tensors of its own (a memory-mapped file); a kind with buffers it derives rather than stores is built
    allocated, as those are not in any file."""
    if unallocated:
        with torch.device("meta"):
            table = empty_table(spec)
        stored = table.state_dict()
        if all(n in stored for n, _ in table.named_buffers()):
            return table
    from . import hashed, tt  # noqa: F401  (their kinds register themselves)
    try:
        cls = Table.KINDS[spec.kind]
    except KeyError:
        raise ValueError(f"unknown table kind {spec.kind!r}") from None
    params = dict(spec.params)
    quant = params.pop("quant", None)
    table = cls(spec.rows, spec.dim, **params)
    if quant:
        table.quantize(quant["dtype"], quant.get("align", 1), fill=False)
    return table

