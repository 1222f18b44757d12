"""The deployment graph: the same function as the trained model, re-expressed for inference runtimes.

Measured on ONNX Runtime CPU (``bench/ort_ops.py``): a ReduceSum over the bag axis of [B, T, L, d] is
~20x slower than one MatMul with stacked identities, and a Gather on axis 1 ~6x slower than Transpose,
Gather on axis 0, Transpose. So, when every table is a plain dense table of one width (the usual case, also after MLET collapses),
all tables become one concatenated table looked up by a single Gather (as FBGEMM's batched tables do)
with a zero row in front of each table, so a padding id (-1) plus the table's start lands on zeros with
no comparison or mask; bags are summed by one 2-D GEMM ([B, T, L*d] @ [I_d; ...; I_d]); and the
interaction's lower triangle is taken with a row gather. Other kinds fuse the same way by group:
hashing-trick tables join the dense group, QR tables with one op share stacked q and r matrices,
frequency-hashed tables share stacked slot, hot and tail matrices; row-wise quantized storage stacks too.
TT and factorized tables keep their own lookup. Every group's bags are summed by the same GEMM. Parity with the trained
model is checked by the export runner, so this rewrite can never change results silently.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from recompress.blockfile import Scratch
from recompress.models.attention import set_attention
from recompress.tables import DenseTable, Table
from recompress.tables.hashed import PRIME, FreqHashTable, HashedTable, QRTable
from recompress.tables.rowwise import QuantizedRows


def bag_sum(rows: Tensor) -> Tensor:
    """``[B, T, L, d]`` -> ``[B, T, d]`` as one 2-D GEMM against L stacked identities (fast in ORT)."""
    b, t, bag, d = rows.shape
    return rows.reshape(b, t, bag * d) @ torch.eye(d).repeat(bag, 1)


def per_table(values: list[int]) -> Tensor:
    """A ``[1, T, 1]`` constant that broadcasts one value per table over ``[B, T, L]`` ids."""
    return torch.tensor(values).view(1, -1, 1)


STACKED = ("a stacked table", "which export makes there while it runs",
           "export needs that much free space there, and as much again for the exported weights")


class StackedRows(nn.Module):
    """Row matrix ``name`` of several tables stacked into one (float or same-format quantized), with an
    optional zero row before each table (made in ``scratch``); ``forward(local_ids [B, T, L])`` gathers each
    table's rows."""

    def __init__(self, tables: list[Table], name: str, zero_row: bool = False, scratch: Scratch = Scratch()) -> None:
        super().__init__()
        pad = int(zero_row)
        quant = tables[0].quant
        parts = [t.stores[name] if quant else getattr(t, name).detach() for t in tables]
        sizes = [p.data.shape[0] for p in parts]
        if quant:
            with torch.device("meta"):  # shapes only: its buffers are made in scratch
                self.store: QuantizedRows | None = QuantizedRows(sum(sizes) + pad * len(sizes),
                                                                 tables[0].stores[name].cols, quant["dtype"], quant["align"])
            for key, buf in list(self.store.named_buffers()):
                out = scratch.empty(tuple(buf.shape), buf.dtype)
                torch.cat([x for p in parts for x in (torch.zeros((pad, *buf.shape[1:]), dtype=buf.dtype), getattr(p, key))],
                          out=out)
                setattr(self.store, key, out)
        else:
            self.store = None
            dim, dtype = parts[0].shape[1], parts[0].dtype
            weight = scratch.empty((sum(sizes) + pad * len(sizes), dim), dtype)
            torch.cat([x for p in parts for x in (p.new_zeros(pad, dim), p)], out=weight)
            self.register_buffer("weight", weight)
        starts = torch.tensor([n + pad for n in sizes]).cumsum(0) - torch.tensor(sizes)
        self.register_buffer("starts", starts.view(1, -1, 1))

    def forward(self, local: Tensor) -> Tensor:
        idx = local + self.starts
        return self.store(idx) if self.store is not None else nn.functional.embedding(idx, self.weight)


class DenseHashGroup(nn.Module):
    """Dense and hashing-trick tables: one Gather in one stacked matrix.

    All dense: a padding id (-1) lands on the zero row before each table, so no mask is needed. With
    hashed tables, every id goes through ``((a*id + b) mod p) mod m`` (a dense table is a = 1, b = 0,
    m = rows) and padding is masked instead.
    """

    def __init__(self, tables: list[DenseTable | HashedTable], scratch: Scratch) -> None:
        super().__init__()
        self.rows = StackedRows(tables, "weight", zero_row=True, scratch=scratch)
        self.hashed = any(isinstance(t, HashedTable) for t in tables)
        if self.hashed:
            hp = [(t.a, t.b, t.buckets) if isinstance(t, HashedTable) else (1, 0, t.rows) for t in tables]
            for i, name in enumerate(("mul", "add", "mod")):
                self.register_buffer(name, per_table([h[i] for h in hp]))

    def forward(self, sparse: Tensor) -> Tensor:
        if not self.hashed:
            return self.rows(sparse)  # -1 + start: the zero row
        rows = self.rows((sparse.clamp(min=0) * self.mul + self.add) % PRIME % self.mod)
        return rows * (sparse >= 0).unsqueeze(-1).to(rows.dtype)


class QRGroup(nn.Module):
    """QR tables with one operation: stacked quotient and remainder matrices, per-table collisions."""

    def __init__(self, tables: list[QRTable], scratch: Scratch) -> None:
        super().__init__()
        self.op = tables[0].op
        self.q, self.r = StackedRows(tables, "q", scratch=scratch), StackedRows(tables, "r", scratch=scratch)
        self.register_buffer("collisions", per_table([t.collisions for t in tables]))

    def forward(self, sparse: Tensor) -> Tensor:
        ids = sparse.clamp(min=0)
        q, r = self.q(ids // self.collisions), self.r(ids % self.collisions)
        rows = q * r if self.op == "mult" else q + r if self.op == "add" else torch.cat([q, r], dim=-1)
        return rows * (sparse >= 0).unsqueeze(-1).to(rows.dtype)


class FreqHashGroup(nn.Module):
    """Frequency-hashed tables: stacked slot maps, hot rows and tails; per-table hash constants."""

    def __init__(self, tables: list[FreqHashTable], scratch: Scratch) -> None:
        super().__init__()
        self.hot, self.tail = StackedRows(tables, "hot", scratch=scratch), StackedRows(tables, "tail", scratch=scratch)
        self.register_buffer("slot", torch.cat([t.slot for t in tables]))
        self.register_buffer("slot_starts", per_table((torch.tensor([t.rows for t in tables]).cumsum(0)
                                                       - torch.tensor([t.rows for t in tables])).tolist()))
        for i, name in enumerate(("a1", "b1", "a2", "b2")):
            self.register_buffer(name, per_table([t.hashes[i // 2][i % 2] for t in tables]))
        self.register_buffer("mod", per_table([t.buckets for t in tables]))

    def forward(self, sparse: Tensor) -> Tensor:
        ids = sparse.clamp(min=0)
        slot = self.slot[ids + self.slot_starts].long()
        hot = self.hot(slot.clamp(min=0))
        tail = self.tail((ids * self.a1 + self.b1) % PRIME % self.mod) + \
            self.tail((ids * self.a2 + self.b2) % PRIME % self.mod)
        rows = torch.where((slot >= 0).unsqueeze(-1), hot, tail)
        return rows * (sparse >= 0).unsqueeze(-1).to(rows.dtype)


class SingleTable(nn.Module):
    """Any other kind (tt, factorized): its own lookup."""

    def __init__(self, table: Table) -> None:
        super().__init__()
        self.table = table

    def forward(self, sparse: Tensor) -> Tensor:
        rows = self.table.lookup(sparse.clamp(min=0))
        return rows * (sparse >= 0).unsqueeze(-1).to(rows.dtype)


def group_key(t: Table) -> str | None:
    """Tables with the same key fuse into one group (None: looked up on its own)."""
    storage = json.dumps(t.quant)
    if type(t) in (DenseTable, HashedTable):
        return f"densehash|{storage}"
    if type(t) is QRTable:
        return f"qr|{t.op}|{storage}"
    if type(t) is FreqHashTable:
        return f"freqhash|{storage}"
    return None


GROUPS = {"densehash": DenseHashGroup, "qr": QRGroup, "freqhash": FreqHashGroup}


class FusedLookup(nn.Module):
    """``[B, T, L]`` ids -> ``[B, T, d]`` pooled rows, by groups of fusable tables, in table order (their stacked
    tables made in ``scratch``)."""

    def __init__(self, tables: list[Table], scratch: Scratch = Scratch()) -> None:
        super().__init__()
        keys = [group_key(t) or f"single|{i}" for i, t in enumerate(tables)]
        order = list(dict.fromkeys(keys))
        self.members = [[i for i, k in enumerate(keys) if k == g] for g in order]
        self.groups = nn.ModuleList(
            GROUPS[g.split("|")[0]]([tables[i] for i in idx], scratch) if not g.startswith("single|")
            else SingleTable(tables[idx[0]])
            for g, idx in zip(order, self.members))
        for g, idx in enumerate(self.members):
            self.register_buffer(f"features{g}", torch.tensor(idx), persistent=False)
        flat = [i for idx in self.members for i in idx]
        self.register_buffer("restore", torch.argsort(torch.tensor(flat)), persistent=False)
        self.in_order = flat == sorted(flat)

    def forward(self, sparse: Tensor) -> Tensor:
        if len(self.groups) == 1:
            return bag_sum(self.groups[0](sparse))
        rows = torch.cat([g(sparse.index_select(1, getattr(self, f"features{i}")))
                          for i, g in enumerate(self.groups)], dim=1)
        return bag_sum(rows if self.in_order else rows.index_select(1, self.restore))


class DequantizeThenGather(nn.Module):
    """Quantized rows in the form TensorRT keeps narrow (engine sizes in docs/benchmarks.md):

    - int8 (FBGEMM's uint8 ``q`` with a scale ``s`` and bias ``b`` per row): ``DequantizeLinear(axis=0)`` on
      the whole table, then Gather, then the gathered bias. TensorRT's DQ is symmetric (int8, positive
      scales, no zero point), so the rows are written exactly as ``s * (q - 128) + (b + 128 s)``; a row with
      ``s = 0`` (constant, or a padding row) becomes ``1 * 0 + b``.
    - fp16/bf16: Gather on the narrow table, then Cast (a Cast before the Gather is folded into a float
      table by TensorRT).

    ONNX Runtime folds or re-dequantizes the int8 form into a float table (see docs/benchmarks.md).
    Outside an ONNX export it computes the same rows as the wrapped storage."""

    def __init__(self, rows: QuantizedRows) -> None:
        super().__init__()
        self.rows = rows  # int8, fp16 or bf16 (export/runner.py refuses int4, which needs opset 21)
        if hasattr(rows, "scale"):
            scale = rows.scale.float()
            flat = scale == 0
            self.register_buffer("q", torch.where(flat.unsqueeze(1), 0, rows.data[:, :rows.cols].to(torch.int16) - 128)
                                 .to(torch.int8))
            self.register_buffer("scale", torch.where(flat, 1.0, scale))
            self.register_buffer("bias", rows.bias.float() + 128 * scale)

    def forward(self, idx: Tensor) -> Tensor:
        r = self.rows
        if not torch.onnx.is_in_onnx_export():
            return r(idx)
        if not hasattr(r, "scale"):
            return r.data[:, :r.cols][idx].float()
        table = torch.onnx.ops.symbolic("DequantizeLinear", (self.q, self.scale), {"axis": 0},
                                        dtype=torch.float32, shape=self.q.shape, version=1)
        return table[idx] + self.bias[idx].unsqueeze(-1)


def dequantize_then_gather(module: nn.Module) -> None:
    """Wrap every QuantizedRows inside ``module`` (in place) in :class:`DequantizeThenGather`."""
    for name, child in list(module.named_children()):
        if isinstance(child, QuantizedRows):
            setattr(module, name, DequantizeThenGather(child))
        elif not isinstance(child, DequantizeThenGather):
            dequantize_then_gather(child)


def copy_sharing_tables(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose tables hold the original's storage in new tensor objects (a table is
    as big as the model: the copy may rearrange modules around them or convert them, never write them)."""
    memo: dict[int, object] = {}
    for m in module.modules():
        if isinstance(m, Table):
            memo.update({id(p): nn.Parameter(p.detach(), p.requires_grad) for p in m.parameters()})
            memo.update({id(b): b.detach() for b in m.buffers()})
    return copy.deepcopy(module, memo)


def deploy(scorer: nn.Module, quant_graph: str = "gather-dequant", attention: str | None = None,
           preferred: str | None = None, scratch: Path | None = None,
           admit: Callable[[tuple[int, ...], torch.dtype], None] | None = None) -> nn.Module:
    """The serving module rearranged for inference runtimes, the trained model left as it is: every module
    that offers a ``fused`` lookup slot (a model looking up several tables at once) gets one
    :class:`FusedLookup` over its tables (big stacked tables made as files' pages in the folder ``scratch``,
    if given: :class:`Scratch`, which asks ``admit`` first), with ``dequant-gather`` quantized rows are
    written DequantizeLinear-then-Gather, and attention is written in form ``attention`` (None: the target's
    ``preferred`` form where a model takes it; ``recompress.models.attention``)."""
    scorer = copy_sharing_tables(scorer)
    set_attention(scorer, attention, preferred)
    for m in scorer.modules():
        if hasattr(m, "fused") and hasattr(m, "tables"):
            m.fused = FusedLookup(list(m.tables.values()), Scratch(scratch, STACKED, admit=admit))
    if quant_graph == "dequant-gather":
        dequantize_then_gather(scorer)
    return scorer
