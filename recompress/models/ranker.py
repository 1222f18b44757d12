"""The appended-candidate ranker (LinkedIn, "Efficient user history modeling with amortized inference",
arXiv 2412.06924): a causal transformer encodes the history; each candidate is appended to it as one more
token, which in every block attends to the history tokens (their keys and values at that block) and to
itself only, never to other candidates; a CTR-style MLP head scores the candidate's output together with
its item row. One pass scores M candidates for one history, the history computed once (amortized).

Blocks are pre-LN: x + attention(LN x), then x + FFN(LN x) with a width-d ReLU feed-forward. Positions:
history slots 1..L as in SASRec, and slot L+1 for every candidate. In training, the candidate for
position t (the next item, and sampled negatives) sees the history up to t, and the BCE loss is CTR-style:
the next item is a click, the negatives are not.

Serving forms (``attention``): ``fused`` writes the history's causal self-attention as one softmax
attention (one ONNX ``Attention`` node per block); ``decomposed`` as MatMul/Softmax. The candidates'
cross-attention with their own-token term stays in standard ops either way: L^2 + M (L + 1) scores, where
M-FALCON's one sequence of L + M tokens under one mask would cost (L + M)^2 (measured 0.71x the speed at
L = 50, M = 512 in ONNX Runtime, and gigabytes per batch for a shared catalogue; replaced by this form).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from recompress.errors import UserError
from recompress.families import FAMILIES
from recompress.spec import ModelSpec
from recompress.tables import Table

from .attention import softmax_attention
from .sequential import Dropout, SequentialFamily, causal_mask, item_embed, positions


class Block(nn.Module):
    """Pre-LN attention + feed-forward, applied to the history and, with cross-attention, to candidates."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-8), nn.LayerNorm(d, eps=1e-8)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, d), nn.Linear(d, d)
        self.dropout = Dropout(dropout)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        shape = (*x.shape[:-1], self.heads, -1)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def _ffn(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.ff2(self.dropout(torch.relu(self.ff1(self.ln2(x))))))

    def history(self, h: Tensor, allowed: Tensor, form: str = "decomposed") -> tuple[Tensor, Tensor, Tensor]:
        """Causal self-attention over ``h`` [B, L, d] in ``form``; returns (new h, keys, values) of the history."""
        q, k, v = self._split(h)
        if form == "fused":
            out = softmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed.unsqueeze(1),
                                    "fused", self.dropout.p if self.training else 0.0).transpose(1, 2).flatten(-2)
        else:
            logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
            attn = logits.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(-1)
            out = torch.einsum("bhij,bjhd->bihd", self.dropout(attn), v).flatten(-2)
        return self._ffn(h + self.dropout(self.o(out))), k, v

    def candidates(self, c: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        """``c`` [B, T, C, d] candidates, each attending the history keys ``allowed`` [B, T, L] and itself."""
        q, ks, vs = self._split(c)
        b, t, m, heads, dh = q.shape
        scale = 1.0 / math.sqrt(dh)
        # heads first, the T * C candidates as one axis: plain batched MatMuls (with Einsum, ONNX Runtime took 2.6x
        # as long at L = 200, M = 512)
        qh = q.permute(0, 3, 1, 2, 4).reshape(b, heads, t * m, dh)
        hist = (qh @ k.permute(0, 2, 3, 1)).reshape(b, heads, t, m, -1) * scale
        hist = hist.masked_fill(~allowed[:, None, :, None, :], float("-inf"))
        own = (q * ks).sum(-1).permute(0, 3, 1, 2).unsqueeze(-1) * scale
        attn = self.dropout(torch.cat([hist, own], dim=-1).softmax(-1))
        seen = attn[..., :-1].reshape(b, heads, t * m, -1) @ v.transpose(1, 2)
        out = seen.reshape(b, heads, t, m, dh) + attn[..., -1:] * vs.permute(0, 3, 1, 2, 4)
        return self._ffn(c + self.dropout(self.o(out.permute(0, 2, 3, 1, 4).flatten(-2))))


def head_mlp(d: int, hidden: str) -> nn.Sequential:
    """The CTR head: [output, item row, their product] (3d) through ReLU layers of sizes ``hidden`` to 1 logit."""
    sizes = [3 * d, *[int(x) for x in str(hidden).split(",") if x.strip()], 1]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Ranker(nn.Module):
    family = "ranker"
    attention_forms = ("decomposed", "fused")

    def __init__(self, hparams: dict[str, Any], tables: dict[str, Table]) -> None:
        super().__init__()
        self.hparams = dict(hparams)
        d = hparams["dim"]
        self.tables = nn.ModuleDict(tables)
        self.emb_dropout = Dropout(hparams["dropout"])
        self.blocks = nn.ModuleList(Block(d, hparams["heads"], hparams["dropout"]) for _ in range(hparams["blocks"]))
        self.last_layernorm = nn.LayerNorm(d, eps=1e-8)
        self.head = head_mlp(d, hparams["head"])
        self.attention = self.attention_forms[0]

    def _tokens(self, ids: Tensor, slots: Tensor) -> Tensor:
        return item_embed(self, ids) * math.sqrt(self.hparams["dim"]) + self.tables["position"].lookup(slots)

    def _score(self, history: Tensor, cands: Tensor, allowed: Tensor) -> Tensor:
        """``cands`` [B, T, C] item ids, candidate group t seeing history keys ``allowed`` [B, T, L] -> logits."""
        real = (history > 0).unsqueeze(-1).to(torch.float32)
        h = self.emb_dropout(self._tokens(history, positions(history))) * real
        slot = torch.full_like(cands, history.shape[1] + 1)
        c = self.emb_dropout(self._tokens(cands, slot))
        hist_mask = causal_mask(history)
        for block in self.blocks:
            h_next, k, v = block.history(h, hist_mask, self.attention)
            c = block.candidates(c, k, v, allowed)
            h = h_next * real
        out = self.last_layernorm(c)
        e = item_embed(self, cands)
        return self.head(torch.cat([out, e, out * e], dim=-1)).squeeze(-1)

    def forward(self, history: Tensor, candidates: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """CTR logits ``[B, M]`` of ``candidates`` (``[B, M]`` or ``[1, M]``), each seeing the whole history."""
        cands = candidates.expand(history.shape[0], -1)
        allowed = (history > 0).unsqueeze(1)  # [B, 1, L]: every real history item
        return self._score(history, cands.unsqueeze(1), allowed).squeeze(1)

    def train_logits(self, history: Tensor, targets: Tensor, negatives: Tensor,
                     timestamps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if negatives.dim() == 1:  # shared by the batch
            negatives = negatives.expand(*targets.shape, -1)
        cands = torch.cat([targets.unsqueeze(-1), negatives], dim=-1)  # [B, L, 1 + K]
        logits = self._score(history, cands, causal_mask(history))
        return logits[..., 0], logits[..., 1:]


class RankerFamily(SequentialFamily):
    info = FAMILIES["ranker"]
    protocols = ("sampled", "full")  # scoring every item attends every history per item: use --users with full
    layouts = ("per-row", "shared")
    extra_positions = 1
    eval_batch = {"full": 8, "sampled": 256}

    def build(self, spec: ModelSpec, tables: dict[str, Table]) -> nn.Module:
        if spec.hparams.get("fusion", "append") == "concat":
            from .ranker_concat import ConcatRanker
            return ConcatRanker(spec.hparams, tables)
        return Ranker(spec.hparams, tables)

    def scorings_of(self, hparams: dict[str, Any]) -> tuple[str, ...]:
        return ("naive",) if hparams.get("fusion", "append") == "concat" else self.scorings

    def scorer(self, model: nn.Module, scoring: str | None = None) -> nn.Module:
        if model.hparams.get("fusion", "append") != "concat":
            return super().scorer(model, scoring)
        if scoring not in (None, "naive"):
            raise UserError("an early-fusion (concat) ranker has no amortized graph: the candidate is part of "
                            "every history token", "export it with --scoring naive (its only form)")
        return model  # its forward is already one history pass per candidate


FAMILY = RankerFamily()
