"""GRU4Rec (Hidasi et al. 2016) as RecBole builds it: item rows (dropout) through ``layers`` stacked GRUs
without biases, each state projected back to the item width by a linear layer, scored by the tied item
table: score(c) = dense(h_L) . e_c. No position table.

RecBole's histories are left-aligned and it reads the state at the last item; recompress's are right-aligned
(left padding). Padded positions feed the GRU zero vectors: with no biases, a zero input on a zero state
leaves the state zero (r = z = 1/2, n = tanh(0) = 0), so the state at the last item is the one RecBole reads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from recompress.families import FAMILIES
from recompress.spec import ModelSpec
from recompress.tables import Table

from .sequential import Dropout, SequentialFamily, dot_candidates, dot_negatives, item_embed


class GRU4Rec(nn.Module):
    family = "gru4rec"

    def __init__(self, hparams: dict[str, Any], tables: dict[str, Table]) -> None:
        super().__init__()
        self.hparams = dict(hparams)
        d, hidden = hparams["dim"], hparams["hidden"]
        self.tables = nn.ModuleDict(tables)
        self.emb_dropout = Dropout(hparams["dropout"])
        self.gru_layers = nn.GRU(d, hidden, hparams["layers"], bias=False, batch_first=True)
        self.dense = nn.Linear(hidden, d)

    def encode(self, history: Tensor) -> Tensor:
        """``[B, L]`` item ids (0 = left padding) -> ``[B, L, d]``: position i has read items up to i."""
        return self.dense(self.gru_layers(self.emb_dropout(item_embed(self, history)))[0])

    def forward(self, history: Tensor, candidates: Tensor, timestamps: Tensor | None = None) -> Tensor:
        return dot_candidates(self.encode(history)[:, -1], item_embed(self, candidates))

    def train_logits(self, history: Tensor, targets: Tensor, negatives: Tensor,
                     timestamps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.encode(history)
        return (h * item_embed(self, targets)).sum(-1), dot_negatives(h, item_embed(self, negatives), negatives.dim() == 1)


class GRU4RecFamily(SequentialFamily):
    info = FAMILIES["gru4rec"]
    positional = False

    def build(self, spec: ModelSpec, tables: dict[str, Table]) -> GRU4Rec:
        return GRU4Rec(spec.hparams, tables)

    def init_layers(self, model: nn.Module, gen: torch.Generator) -> None:
        """RecBole's rule: the first GRU layer's matrices xavier-uniform; the others as PyTorch starts them
        (U(+-1/sqrt(hidden))), like the projection (kaiming-uniform weight, U(+-1/sqrt(fan_in)) bias)."""
        gru = model.gru_layers
        bound = 1.0 / gru.hidden_size ** 0.5
        for name, p in gru.named_parameters():
            if name in ("weight_ih_l0", "weight_hh_l0"):
                limit = (6.0 / (p.shape[0] + p.shape[1])) ** 0.5
                p.uniform_(-limit, limit, generator=gen)
            else:
                p.uniform_(-bound, bound, generator=gen)
        fan_in = model.dense.weight.shape[1]
        model.dense.weight.uniform_(-(1.0 / fan_in) ** 0.5, (1.0 / fan_in) ** 0.5, generator=gen)
        model.dense.bias.uniform_(-(1.0 / fan_in) ** 0.5, (1.0 / fan_in) ** 0.5, generator=gen)


FAMILY = GRU4RecFamily()
