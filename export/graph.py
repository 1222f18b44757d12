"""The deployment graph: the same function as the trained model, re-expressed for inference runtimes.

Measured on ONNX Runtime CPU (docs/benchmarks.md): a ReduceSum over a middle axis with a small inner
size is ~13x slower than over the last axis, and Gather along axis 1 ~3x slower than along axis 0.
ORT also rewrites a Transpose + reduction back into that slow form, and int64 comparisons are slow.
So, when every table is a plain dense table of one width (the usual case, also after MLET collapses),
all tables become one concatenated table looked up by a single Gather (as FBGEMM's batched tables do)
with a zero row in front of each table, so a padding id (-1) plus the table's start lands on zeros with
no comparison or mask; bags are summed by one 2-D GEMM ([B, T, L*d] @ [I_d; ...; I_d]); and the
interaction's lower triangle is taken with a row gather. Hashing-trick tables and row-wise quantized
storage fuse the same way (see FusedTables); other kinds (tt, qr, freqhash, factorized) keep their own
lookup, and their bags are summed by the same GEMM. Parity with the trained
model is checked by the export runner, so this rewrite can never change results silently.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from recompress.compress.rowwise import QuantizedRows
from recompress.compress.hashed import PRIME, HashedTable
from recompress.compress.tables import DenseTable
from recompress.models.dlrm import DLRM


class FusedTables(nn.Module):
    """All tables' rows in one ``[sum(rows + 1), d]`` matrix, a zero row before each; ``[B, T, L]`` -> ``[B, T, d]``.

    Dense tables index it directly, so a padding id (-1) plus the table's start lands on its zero row.
    Hashing-trick tables join the same matrix: every table's id goes through ``((a*id + b) mod p) mod m``
    with per-table constants (a dense table is a = 1, b = 0, m = rows), and padding is masked instead.
    Row-wise quantized storage (all tables in one format) fuses the same way: stored rows, scales and
    biases are concatenated, and a zero row (data, scale and bias 0) decodes to zeros.
    """

    def __init__(self, tables: list[DenseTable | HashedTable]) -> None:
        super().__init__()
        quant = tables[0].quant
        sizes = [t.buckets if isinstance(t, HashedTable) else t.rows for t in tables]
        if quant:
            self.store: QuantizedRows | None = QuantizedRows(sum(n + 1 for n in sizes), tables[0].dim,
                                                             quant["dtype"], quant["align"])
            self.store.graph_form = tables[0].stores["weight"].graph_form
            for name, buf in self.store.named_buffers():
                buf.copy_(torch.cat([p for t in tables for p in (torch.zeros_like(buf[:1]),
                                                                  getattr(t.stores["weight"], name))]))
        else:
            self.store = None
            zero = tables[0].weight.new_zeros(1, tables[0].dim)
            self.weight = nn.Parameter(torch.cat([p for t in tables for p in (zero, t.weight.detach())]),
                                       requires_grad=False)
        starts = torch.tensor([n + 1 for n in sizes]).cumsum(0) - torch.tensor(sizes)
        self.register_buffer("starts", starts.view(1, -1, 1))
        self.hashed = any(isinstance(t, HashedTable) for t in tables)
        if self.hashed:
            hp = [(t.a, t.b, t.buckets) if isinstance(t, HashedTable) else (1, 0, t.rows) for t in tables]
            for i, name in enumerate(("mul", "add", "mod")):
                self.register_buffer(name, torch.tensor([h[i] for h in hp]).view(1, -1, 1))
        self.dim = tables[0].dim

    @staticmethod
    def fusable(tables: list[nn.Module]) -> bool:
        return all(type(t) in (DenseTable, HashedTable) for t in tables) and len({json.dumps(t.quant) for t in tables}) == 1

    def forward(self, sparse: Tensor) -> Tensor:
        if self.hashed:
            ids = (sparse.clamp(min=0) * self.mul + self.add) % PRIME % self.mod + self.starts
        else:
            ids = sparse + self.starts  # padding -1 hits the zero row
        rows = self.store(ids) if self.store is not None else nn.functional.embedding(ids, self.weight)
        if self.hashed:
            rows = rows * (sparse >= 0).unsqueeze(-1).to(rows.dtype)
        return bag_sum(rows)


def bag_sum(rows: Tensor) -> Tensor:
    """``[B, T, L, d]`` -> ``[B, T, d]`` as one 2-D GEMM against L stacked identities (fast in ORT)."""
    b, t, bag, d = rows.shape
    return rows.reshape(b, t, bag * d) @ torch.eye(d).repeat(bag, 1)


class InferenceDLRM(nn.Module):
    """``(dense, sparse) -> probability`` for a trained DLRM, arranged for fast inference graphs."""

    def __init__(self, model: DLRM) -> None:
        super().__init__()
        self.model = model
        tables = list(model.tables.values())
        self.fused = FusedTables(tables) if FusedTables.fusable(tables) else None
        self.register_buffer("tri_index", model.tri_index.clone(), persistent=False)

    def pooled(self, sparse: Tensor) -> Tensor:
        if self.fused is not None:
            return self.fused(sparse)
        ids = sparse.clamp(min=0).unbind(1)
        rows = torch.stack([t.lookup(i) for t, i in zip(self.model.tables.values(), ids)], dim=1)  # [B, T, L, d]
        return bag_sum(rows * (sparse >= 0).unsqueeze(-1).float())

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        m = self.model
        x = m.embed_dense(dense)
        feats = torch.cat([x.unsqueeze(1), self.pooled(sparse)], dim=1)
        z = torch.bmm(feats, feats.transpose(1, 2)).flatten(1).t().index_select(0, self.tri_index).t()
        parts = [x, z]
        if m.pad:
            parts.append(x.new_zeros(x.shape[0], m.pad))
        return torch.sigmoid(m.top(torch.cat(parts, dim=1)).squeeze(-1))
