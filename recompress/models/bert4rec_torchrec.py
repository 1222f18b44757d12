"""BERT4Rec as TorchRec's example builds it (``examples/bert4rec/models/bert4rec.py``), the ``torchrec`` flavor of
recompress's ``bert4rec`` family.

Input: the item rows of the ``max_len`` window (id 0, the example's padding, is looked up like any id: row 0 is
a trained row there) plus one learned position per slot (every slot, padded or not: rows 1..L of the position
table, row 0 unused), then one layer norm over the whole ``[L, d]`` window (its statistics mix every slot,
padding included, and its weights are per slot). Blocks: pre-LN (``x + attn(norm(x))``, then ``x + ffn(norm(x))``)
with separate query, key and value projections (one ``in_proj`` here), every query attending the window's real
slots (ids > 0), a ReLU feed-forward of width ``ffn_dim`` (the example's ``4 * d``) and no final norm. Output:
a linear layer over every id, untied from the item table: here a second table, ``output`` (as many rows as
``item``), and a per-id bias. Serving (the example's evaluation): the history's last ``L - 1`` items, then the
mask token (id N + 1); the last slot's state scores each candidate by its output row plus its bias.

Training (recompress's cloze, as for RecBole's flavor): the window ending at the last training item, its last
position always masked and the others with probability ``mask_ratio``; masked slots hold the mask token (the
example also swaps 10% of them for a random item and keeps 10%: not done here).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recompress.tables import Table

from .attention import multihead
from .sasrec import FeedForward
from .sequential import Dropout, dot_candidates, dot_negatives


class TorchRecBERT4Rec(nn.Module):
    family = "bert4rec"
    attention_forms = ("fused", "decomposed")

    def __init__(self, hparams: dict[str, Any], tables: dict[str, Table]) -> None:
        super().__init__()
        self.hparams = dict(hparams)
        d, length, p, eps = hparams["dim"], hparams["max_len"], hparams["dropout"], hparams["ln_eps"]
        self.mask_id = hparams["num_items"] + 1
        self.tables = nn.ModuleDict(tables)
        self.input_layernorm = nn.LayerNorm([length, d], eps=eps)
        self.emb_dropout = Dropout(p)
        blocks = range(hparams["blocks"])
        self.attention_layernorms = nn.ModuleList(nn.LayerNorm(d, eps=eps) for _ in blocks)
        self.attention_layers = nn.ModuleList(nn.MultiheadAttention(d, hparams["heads"], dropout=p, batch_first=True)
                                              for _ in blocks)
        self.forward_layernorms = nn.ModuleList(nn.LayerNorm(d, eps=eps) for _ in blocks)
        self.forward_layers = nn.ModuleList(FeedForward(d, p, hparams["ffn_dim"], hparams["activation"]) for _ in blocks)
        self.dropouts = nn.ModuleList(Dropout(p) for _ in range(2 * len(blocks)))  # after attention; after a block
        self.output_bias = nn.Parameter(torch.zeros(self.mask_id + 1))
        self.attention = self.attention_forms[0]

    def encode(self, window: Tensor) -> Tensor:
        """``[B, L]`` ids (0 padding, looked up as a row) -> ``[B, L, d]``; every slot reads every real slot."""
        length = window.shape[1]
        slots = torch.arange(1, length + 1, device=window.device).expand_as(window)
        x = self.emb_dropout(self.input_layernorm(self.tables["item"].lookup(window)
                                                  + self.tables["position"].lookup(slots)))
        allowed = (window > 0).unsqueeze(1).expand(-1, length, -1)
        for i, (ln_a, attn, ln_f, ffn) in enumerate(zip(self.attention_layernorms, self.attention_layers,
                                                        self.forward_layernorms, self.forward_layers)):
            x = x + self.dropouts[2 * i](multihead(attn, ln_a(x), allowed, self.attention))
            x = self.dropouts[2 * i + 1](x + ffn(ln_f(x)))
        return x

    def served(self, history: Tensor) -> Tensor:
        """The example's test input: the history's last ``L - 1`` items, then the mask token."""
        return torch.cat([history[:, 1:], torch.full_like(history[:, :1], self.mask_id)], dim=1)

    def cloze_window(self, data: Any, users: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
        """The training window whose last item is masked: the items up to ``ends``, as ``served`` cuts them."""
        return data.windows(users, ends, length)

    def scored(self, h: Tensor, ids: Tensor, shared: bool | None = None) -> Tensor:
        rows, bias = self.tables["output"].lookup(ids), self.output_bias[ids]
        if shared is None:
            return dot_candidates(h, rows) + bias
        return dot_negatives(h, rows, shared) + bias

    def forward(self, history: Tensor, candidates: Tensor, timestamps: Tensor | None = None) -> Tensor:
        return self.scored(self.encode(self.served(history))[:, -1], candidates)

    def train_logits(self, history: Tensor, targets: Tensor, negatives: Tensor,
                     timestamps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``history``: a masked window; ``targets``: the item each masked slot hid (0 elsewhere)."""
        h = self.encode(history)
        pos = (h * self.tables["output"].lookup(targets)).sum(-1) + self.output_bias[targets]
        return pos, self.scored(h, negatives, negatives.dim() == 1)
