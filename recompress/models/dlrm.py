"""DLRM as in facebookresearch/dlrm: bottom MLP, one pooled table per sparse feature, dot interaction, top MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from recompress.compress.tables import Table, empty_table, pool
from recompress.spec import ModelSpec


def mlp(sizes: list[int], last_activation: bool) -> nn.Sequential:
    """Linear layers at even indices, ReLU between (and after the last one if asked), like dlrm."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def interaction_width(num_tables: int, dim: int, itself: bool, pad: int = 0) -> int:
    """Width of [bottom output, pairwise dots] fed to the top MLP."""
    f = num_tables + 1
    return dim + (f * (f + 1) // 2 if itself else f * (f - 1) // 2) + pad


def default_hparams(num_dense: int, dim: int, bottom: list[int], top: list[int]) -> dict[str, Any]:
    return {"num_dense": num_dense, "emb_dim": dim, "bottom": list(bottom), "top": list(top),
            "interaction_itself": False, "interaction_pad": 0, "bottom_proj": False}


class DLRM(nn.Module):
    """``forward(dense [B, num_dense], sparse [B, T, L] with -1 padding) -> logits [B]``.

    ``hparams``: num_dense, emb_dim, bottom (layer output sizes), top (layer output sizes, last 1),
    interaction_itself, interaction_pad (zero columns appended, as NVIDIA's padded dot does),
    bottom_proj (a bias-free Linear from the bottom MLP's width to emb_dim, used after a width cut).
    """

    family = "dlrm"

    def __init__(self, hparams: dict[str, Any], tables: dict[str, Table]) -> None:
        super().__init__()
        self.hparams = dict(hparams)
        h = self.hparams
        d = h["emb_dim"]
        self.bottom = mlp([h["num_dense"], *h["bottom"]], last_activation=True)
        bottom_out = h["bottom"][-1]
        self.bottom_proj = nn.Linear(bottom_out, d, bias=False) if h.get("bottom_proj") else None
        if self.bottom_proj is None and bottom_out != d:
            raise ValueError(f"bottom MLP ends at {bottom_out} but the embedding width is {d}")
        for name, t in tables.items():
            if t.dim != d:
                raise ValueError(f"table {name} has width {t.dim}, the model's embedding width is {d}")
        self.tables = nn.ModuleDict(tables)
        n = len(tables)
        itself = bool(h.get("interaction_itself"))
        f = n + 1
        li, lj = zip(*[(i, j) for i in range(f) for j in range(i + (1 if itself else 0))])
        self.register_buffer("tri_index", torch.tensor(li) * f + torch.tensor(lj), persistent=False)
        self.pad = int(h.get("interaction_pad", 0))
        self.top = mlp([interaction_width(n, d, itself, self.pad), *h["top"]], last_activation=False)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> DLRM:
        return cls(spec.hparams, {t.name: empty_table(t) for t in spec.tables})

    def embed_dense(self, dense: Tensor) -> Tensor:
        x = self.bottom(dense)
        return self.bottom_proj(x) if self.bottom_proj is not None else x

    def pooled(self, sparse: Tensor) -> Tensor:
        """``[B, T, d]``: every table's bag sums, pooled in one masked reduction."""
        ids = sparse.clamp(min=0).unbind(1)
        rows = torch.stack([t.lookup(i) for t, i in zip(self.tables.values(), ids)], dim=1)  # [B, T, L, d]
        return pool(rows, sparse)

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        x = self.embed_dense(dense)
        feats = torch.cat([x.unsqueeze(1), self.pooled(sparse)], dim=1)  # [B, F, d]
        z = torch.bmm(feats, feats.transpose(1, 2)).flatten(1).index_select(1, self.tri_index)
        parts = [x, z]
        if self.pad:
            parts.append(x.new_zeros(x.shape[0], self.pad))
        return self.top(torch.cat(parts, dim=1)).squeeze(-1)
