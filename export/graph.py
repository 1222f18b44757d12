"""The deployment graph: the same function as the trained model, re-expressed for inference runtimes.

Measured on ONNX Runtime CPU (docs/benchmarks.md): a ReduceSum over a middle axis with a small inner
size is ~13x slower than over the last axis, and Gather along axis 1 ~3x slower than along axis 0.
ORT also rewrites a Transpose + reduction back into that slow form, and int64 comparisons are slow.
So, when every table is a plain dense table of one width (the usual case, also after MLET collapses),
all tables become one concatenated table looked up by a single Gather (as FBGEMM's batched tables do)
with a zero row in front of each table, so a padding id (-1) plus the table's start lands on zeros with
no comparison or mask; bags are summed by one 2-D GEMM ([B, T, L*d] @ [I_d; ...; I_d]); and the
interaction's lower triangle is taken with a row gather. Parity with the trained model is
checked by the export runner, so this rewrite can never change results silently.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recompress.compress.tables import DenseTable
from recompress.models.dlrm import DLRM


class FusedDenseTables(nn.Module):
    """All tables in one ``[sum(rows + 1), d]`` table, a zero row before each; ``[B, T, L]`` ids -> ``[B, T, d]``."""

    def __init__(self, tables: list[DenseTable]) -> None:
        super().__init__()
        zero = tables[0].weight.new_zeros(1, tables[0].dim)
        self.weight = nn.Parameter(torch.cat([p for t in tables for p in (zero, t.weight.detach())]),
                                   requires_grad=False)
        starts = torch.tensor([t.rows + 1 for t in tables]).cumsum(0) - torch.tensor([t.rows for t in tables])
        self.register_buffer("starts", starts.view(1, -1, 1))
        self.dim = tables[0].dim

    def forward(self, sparse: Tensor) -> Tensor:
        rows = nn.functional.embedding(sparse + self.starts, self.weight)  # padding -1 hits the zero row
        b, t, bag = sparse.shape
        return rows.reshape(b, t, bag * self.dim) @ torch.eye(self.dim).repeat(bag, 1)


class InferenceDLRM(nn.Module):
    """``(dense, sparse) -> probability`` for a trained DLRM, arranged for fast inference graphs."""

    def __init__(self, model: DLRM) -> None:
        super().__init__()
        self.model = model
        tables = list(model.tables.values())
        fusable = all(isinstance(t, DenseTable) for t in tables)
        self.fused = FusedDenseTables(tables) if fusable else None
        self.register_buffer("tri_index", model.tri_index.clone(), persistent=False)

    def pooled(self, sparse: Tensor) -> Tensor:
        if self.fused is not None:
            return self.fused(sparse)
        return self.model.pooled(sparse)

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        m = self.model
        x = m.embed_dense(dense)
        feats = torch.cat([x.unsqueeze(1), self.pooled(sparse)], dim=1)
        z = torch.bmm(feats, feats.transpose(1, 2)).flatten(1).t().index_select(0, self.tri_index).t()
        parts = [x, z]
        if m.pad:
            parts.append(x.new_zeros(x.shape[0], m.pad))
        return torch.sigmoid(m.top(torch.cat(parts, dim=1)).squeeze(-1))
