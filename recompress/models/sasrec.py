"""SASRec (Kang & McAuley 2018) as pmixer/SASRec.pytorch builds it.

Item rows times sqrt(d) plus learned positions (slot 1..L, 0 for padding), dropout, then ``blocks`` of
causal softmax self-attention (``nn.MultiheadAttention``) and a point-wise feed-forward (two width-d
layers with ReLU and dropout), wired one of three ways (``wiring``): ``post-ln`` (residual, then layer
norm: SASRec.pytorch's default since 2025-05), ``pre-ln`` (its ``--norm_first``), or ``pmixer-2020`` (its
blocks until 2025-05: queries from the layer-normed input, keys and values from the input itself, a
residual from the normed queries, then a layer norm and the feed-forward with its own residual); layer
norms use eps 1e-8; a final layer norm. The item table scores the output (tied): score(c) = h_L . e_c.

The ``recbole`` flavor is RecBole's SASRec: item plus position rows (positions counted from the first item
of the history, no sqrt(d) scaling) through a layer norm, post-LN blocks whose feed-forward has its own
inner width (``ffn_dim``) and activation (GELU), layer norm eps from its config, no final layer norm.

Padding: by default padded positions are masked out as keys and zeroed after every block, so the padding
row's content never matters (it would for hashed or quantized item tables). SASRec.pytorch does neither
(``attend_padding``): its padded positions start at zero, attend causally like any other, and real
positions attend to them; a model it trained is read with ``attend_padding`` so it scores as it did there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from recompress.families import FAMILIES
from recompress.spec import ModelSpec
from recompress.tables import Table

from .attention import multihead
from .sequential import (
    Dropout,
    SequentialFamily,
    causal_mask,
    dot_candidates,
    dot_negatives,
    item_embed,
    positions,
)


WIRINGS = ("post-ln", "pre-ln", "pmixer-2020")
FLAVORS = ("sasrec.pytorch", "recbole")


class FeedForward(nn.Module):
    """SASRec's point-wise feed-forward (its 1x1 convolutions are these two linear layers; RecBole's are
    ``dense_1``/``dense_2`` of any inner width, with GELU)."""

    def __init__(self, d: int, dropout: float, inner: int | None = None, activation: str = "relu") -> None:
        super().__init__()
        inner = inner or d
        self.conv1, self.conv2 = nn.Linear(d, inner), nn.Linear(inner, d)
        self.drop1, self.drop2 = Dropout(dropout), Dropout(dropout)
        self.act = {"relu": torch.relu, "gelu": nn.functional.gelu}[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.conv2(self.drop1(self.act(self.conv1(x)))))


class SASRec(nn.Module):
    family = "sasrec"
    attention_forms = ("fused", "decomposed")

    def __init__(self, hparams: dict[str, Any], tables: dict[str, Table]) -> None:
        super().__init__()
        self.hparams = dict(hparams)
        d, blocks, p = hparams["dim"], hparams["blocks"], hparams["dropout"]
        self.flavor = hparams.get("flavor") or FLAVORS[0]
        if self.flavor not in FLAVORS:
            raise ValueError(f"unknown SASRec flavor {self.flavor!r}")
        recbole = self.flavor == "recbole"
        eps = 1e-8 if hparams.get("ln_eps") is None else hparams["ln_eps"]
        if not eps > 0:
            raise ValueError(f"ln_eps {eps} is not a positive layer norm epsilon")
        self.tables = nn.ModuleDict(tables)
        self.emb_dropout = Dropout(p)
        if recbole:  # layer norm on the input (item + position rows), none at the end
            self.input_layernorm = nn.LayerNorm(d, eps=eps)
        self.attention_layernorms = nn.ModuleList(nn.LayerNorm(d, eps=eps) for _ in range(blocks))
        self.attention_layers = nn.ModuleList(nn.MultiheadAttention(d, hparams["heads"], dropout=p, batch_first=True)
                                              for _ in range(blocks))
        self.forward_layernorms = nn.ModuleList(nn.LayerNorm(d, eps=eps) for _ in range(blocks))
        self.forward_layers = nn.ModuleList(FeedForward(d, p, hparams.get("ffn_dim"), hparams.get("activation") or "relu")
                                            for _ in range(blocks))
        self.last_layernorm = None if recbole else nn.LayerNorm(d, eps=eps)
        self.attention = self.attention_forms[0]
        self.wiring = "post-ln" if recbole else hparams.get("wiring") or ("pre-ln" if hparams.get("norm_first") else "post-ln")
        if self.wiring not in WIRINGS:
            raise ValueError(f"unknown SASRec wiring {self.wiring!r}")
        self.attend_padding = bool(hparams.get("attend_padding")) and not recbole

    def encode(self, history: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """``[B, L]`` item ids (0 = padding) -> ``[B, L, d]``: position i has read items up to i."""
        d = self.hparams["dim"]
        real = (history > 0).unsqueeze(-1).to(torch.float32)
        if self.flavor == "recbole":  # positions count from the first item; no sqrt(d) scaling
            x = self.input_layernorm(item_embed(self, history)
                                     + self.tables["position"].lookup(positions(history, from_first=True)))
        else:
            x = item_embed(self, history) * math.sqrt(d) + self.tables["position"].lookup(positions(history))
        x = self.emb_dropout(x) * real
        allowed = self.allowed(history)
        for ln_a, attn, ln_f, ffn in zip(self.attention_layernorms, self.attention_layers, self.forward_layernorms,
                                         self.forward_layers):
            if self.wiring == "pre-ln":
                x = x + multihead(attn, ln_a(x), allowed, self.attention)
                x = x + ffn(ln_f(x))
            elif self.wiring == "post-ln":
                x = ln_a(x + multihead(attn, x, allowed, self.attention))
                x = ln_f(x + ffn(x))
            else:
                q = ln_a(x)
                x = ln_f(q + multihead(attn, q, allowed, self.attention, kv=x))
                x = x + ffn(x)
            if not self.attend_padding:
                x = x * real
        return self.last_layernorm(x) if self.last_layernorm is not None else x

    def allowed(self, history: Tensor) -> Tensor:
        """``[B, L, L]``: which keys each query attends (causal)."""
        return causal_mask(history, with_padding=self.attend_padding)

    def forward(self, history: Tensor, candidates: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """Scores ``[B, M]`` of ``candidates`` (``[B, M]``, or ``[1, M]`` for every user) after ``history``."""
        return dot_candidates(self.encode(history)[:, -1], item_embed(self, candidates))

    def train_logits(self, history: Tensor, targets: Tensor, negatives: Tensor,
                     timestamps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.encode(history)
        pos = (h * item_embed(self, targets)).sum(-1)
        return pos, dot_negatives(h, item_embed(self, negatives), negatives.dim() == 1)


class SASRecFamily(SequentialFamily):
    info = FAMILIES["sasrec"]

    def build(self, spec: ModelSpec, tables: dict[str, Table]) -> SASRec:
        return SASRec(spec.hparams, tables)


FAMILY = SASRecFamily()
