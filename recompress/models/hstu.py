"""HSTU (Zhai et al. 2024, "Actions Speak Louder than Words") as generative-recommenders' research HSTU builds it.

Input: item rows times sqrt(d) plus learned positions, dropout. Each block (a sequential transduction
unit): x' = layer_norm(x) (no affine); [u, v, q, k] = SiLU(x' W) with one matrix W (normal std 0.02);
attention A = SiLU(q k^T + rab) / L per head, masked causally (and to real keys), where rab is a learned
relative-position bias w[L-1 + j - i] plus, when the data has timestamps, a learned bias of the bucketed
time gap bucket(t_{i+1} - t_j) = floor(ln |gap| / 0.301) (exact for integer gaps; 128 buckets, the
next timestamp of the last position is its own); y = A v;
out = x + Linear(dropout(u * layer_norm(y))). The output is L2-normalized, and scored against
L2-normalized item rows of the tied table (cosine similarity; the sampled-softmax loss divides it by the
temperature).

``variant=research`` reads generative-recommenders' research checkpoints as their own code computes them:
positions count from the first real item, the timestamps carry one more column (the time of the item asked
for, so the last position's time bias is bucket(t_query - t_j)), gaps are bucketed by the float32 log
alone, and ``attn_norm`` (their L + gr_output_length + 1) divides the attention instead of the window.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recompress.errors import UserError
from recompress.families import FAMILIES
from recompress.spec import ModelSpec
from recompress.tables import Table

from .hstu_node import hstu_node
from .sequential import (
    Dropout,
    SequentialFamily,
    causal_mask,
    dot_candidates,
    dot_negatives,
    item_embed,
    positions,
)

TIME_BUCKETS = 128


# BUCKET_STARTS[k] = the smallest integer gap g with ln(g) / 0.301 >= k (k = 0 .. TIME_BUCKETS + 1).
BUCKET_STARTS = [math.ceil(math.exp(0.301 * k)) for k in range(TIME_BUCKETS + 2)]


def time_buckets(timestamps: Tensor, query_time: bool = False, exact: bool = True) -> Tensor:
    """``[B, L, L]`` bucket of t_{i+1} - t_j. ``timestamps`` is ``[B, L]`` (the last position's next timestamp
    is its own) or, with ``query_time``, ``[B, L + 1]``: the last is the time the next item is asked for (the
    research HSTU's target timestamp).

    ``exact``: floor(ln max(|gap|, 1) / 0.301) clipped to [0, 128] for integer gaps, on every runtime.
    Otherwise upstream's float32 estimate as it is: its float32 log lands a few gaps (e.g. 417901) one bucket
    off, and torch, ONNX Runtime and TensorRT may round differently there."""
    if query_time:
        timestamps, nxt = timestamps[:, :-1], timestamps[:, 1:]
    else:
        nxt = torch.cat([timestamps[:, 1:], timestamps[:, -1:]], dim=1)
    gap = (nxt.unsqueeze(2) - timestamps.unsqueeze(1)).abs().clamp(min=1)
    guess = (torch.log(gap.to(torch.float32)) / 0.301).long().clamp(0, TIME_BUCKETS)
    if not exact:
        return guess
    starts = torch.tensor(BUCKET_STARTS, dtype=gap.dtype, device=gap.device)
    exact = guess - (gap < starts[guess]).long() + (gap >= starts[guess + 1]).long()
    return exact.clamp(0, TIME_BUCKETS)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``F.normalize(x, dim=-1)`` by broadcasting (F.normalize's expand_as exported with a mislabelled
    dynamic axis, which ONNX Runtime rejects for candidates shared by the batch)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


class STU(nn.Module):
    """One HSTU block."""

    def __init__(self, d: int, heads: int, attn_dim: int, linear_dim: int, max_len: int, dropout: float,
                 time_bias: bool, norm: int | None = None, research: bool = False) -> None:
        super().__init__()
        self.norm, self.research = norm, research
        self.d, self.heads, self.attn_dim, self.linear_dim = d, heads, attn_dim, linear_dim
        self.uvqk = nn.Parameter(torch.empty(d, 2 * heads * (linear_dim + attn_dim)))
        self.o = nn.Linear(heads * linear_dim, d)
        self.pos_w = nn.Parameter(torch.empty(2 * max_len - 1))
        self.ts_w = nn.Parameter(torch.empty(TIME_BUCKETS + 1)) if time_bias else None
        self.dropout = Dropout(dropout)
        self.max_len = max_len

    def rel_bias(self, length: int, timestamps: Tensor | None) -> Tensor:
        i = torch.arange(length, device=self.pos_w.device).unsqueeze(1)
        j = torch.arange(length, device=self.pos_w.device).unsqueeze(0)
        bias = self.pos_w[(self.max_len - 1 + j - i).clamp(0, 2 * self.max_len - 2)].unsqueeze(0)  # [1, L, L]
        if self.ts_w is not None and timestamps is not None:
            bias = bias + self.ts_w[time_buckets(timestamps, query_time=self.research, exact=not self.research)]
        return bias

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, real: Tensor, timestamps: Tensor | None,
               form: str) -> Tensor:
        """SiLU(q k^T + rab) / L, masked to ``allowed``, times v: ``[B, L, H * dim]`` projections -> [B, L, H * dv]."""
        b, length, _ = q.shape
        h, a, v_dim = self.heads, self.attn_dim, self.linear_dim
        if form == "triton":
            if torch.is_grad_enabled() and q.requires_grad:
                raise UserError("the Triton HSTU kernel is forward-only", "train with the decomposed form")
            from recompress.kernels.hstu_attention import hstu_attention
            y = hstu_attention(q.reshape(b, length, h, a), k.reshape(b, length, h, a), v.reshape(b, length, h, v_dim),
                               self.pos_w, self.max_len, real, self.ts_w, timestamps, norm=self.norm,
                               query_time=self.research, exact_buckets=not self.research)
            return y.reshape(b, length, h * v_dim)
        bias = self.rel_bias(length, timestamps)
        norm = self.norm or length
        if form == "custom" and torch.onnx.is_in_onnx_export():  # the node divides by L
            y = hstu_node(q, k, v, bias, allowed, heads=h, attn_dim=a, linear_dim=v_dim)
            return y if norm == length else y * (length / norm)
        qk = torch.einsum("bnhd,bmhd->bhnm", q.reshape(b, length, h, a), k.reshape(b, length, h, a))
        attn = F.silu(qk + bias.unsqueeze(1)) / norm * allowed.unsqueeze(1).to(q.dtype)
        return torch.einsum("bhnm,bmhd->bnhd", attn, v.reshape(b, length, h, v_dim)).reshape(b, length, h * v_dim)

    def forward(self, x: Tensor, allowed: Tensor, real: Tensor, timestamps: Tensor | None, form: str) -> Tensor:
        h, a, v_dim = self.heads, self.attn_dim, self.linear_dim
        u, v, q, k = torch.split(F.silu(F.layer_norm(x, [self.d], eps=1e-6) @ self.uvqk),
                                 [h * v_dim, h * v_dim, h * a, h * a], dim=-1)
        y = self.attend(q, k, v, allowed, real, timestamps, form)
        return x + self.o(self.dropout(u * F.layer_norm(y, [h * v_dim], eps=1e-6)))


class HSTU(nn.Module):
    family = "hstu"
    attention_forms = ("decomposed", "custom", "triton")

    def __init__(self, hparams: dict[str, Any], tables: dict[str, Table]) -> None:
        super().__init__()
        self.hparams = dict(hparams)
        d, heads = hparams["dim"], hparams["heads"]
        self.tables = nn.ModuleDict(tables)
        self.emb_dropout = Dropout(hparams["dropout"])
        uses_time = bool(hparams["time_bias"] and hparams["has_times"])
        self.research = hparams.get("variant") == "research"
        if hparams.get("attn_norm") is not None and hparams["attn_norm"] < 1:
            raise ValueError(f"attn_norm {hparams['attn_norm']} is not a length")
        self.blocks = nn.ModuleList(STU(d, heads, d // heads, d // heads, hparams["max_len"], hparams["dropout"],
                                        uses_time, hparams.get("attn_norm"), self.research)
                                    for _ in range(hparams["blocks"]))
        self.attention = self.attention_forms[0]

    def encode(self, history: Tensor, timestamps: Tensor | None = None) -> Tensor:
        real = (history > 0).unsqueeze(-1).to(torch.float32)
        pos = positions(history, from_first=self.research)
        x = item_embed(self, history) * math.sqrt(self.hparams["dim"]) + self.tables["position"].lookup(pos)
        x = self.emb_dropout(x) * real
        allowed = causal_mask(history)
        for block in self.blocks:
            x = block(x, allowed, history > 0, timestamps, self.attention) * real
        return l2_normalize(x)

    def items(self, ids: Tensor) -> Tensor:
        return l2_normalize(item_embed(self, ids))

    def forward(self, history: Tensor, candidates: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """Cosine similarities ``[B, M]`` of ``candidates`` (``[B, M]`` or ``[1, M]``) after ``history``."""
        return dot_candidates(self.encode(history, timestamps)[:, -1], self.items(candidates))

    def train_logits(self, history: Tensor, targets: Tensor, negatives: Tensor,
                     timestamps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.encode(history, timestamps)
        return (h * self.items(targets)).sum(-1), dot_negatives(h, self.items(negatives), negatives.dim() == 1)


class HSTUFamily(SequentialFamily):
    info = FAMILIES["hstu"]

    def build(self, spec: ModelSpec, tables: dict[str, Table]) -> HSTU:
        return HSTU(spec.hparams, tables)

    def uses_times(self, hparams: dict[str, Any]) -> bool:
        return bool(hparams.get("time_bias") and hparams.get("has_times"))

    def query_time(self, hparams: dict[str, Any]) -> bool:
        return hparams.get("variant") == "research"

    def init_layers(self, model: nn.Module, gen: torch.Generator) -> None:
        """generative-recommenders' rule: uvqk and the relative biases N(0, 0.02), the output projection
        xavier-uniform (bias zero)."""
        for block in model.blocks:
            block.uvqk.normal_(0.0, 0.02, generator=gen)
            block.pos_w.normal_(0.0, 0.02, generator=gen)
            if block.ts_w is not None:
                block.ts_w.normal_(0.0, 0.02, generator=gen)
            fan_out, fan_in = block.o.weight.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            block.o.weight.uniform_(-bound, bound, generator=gen)
            block.o.bias.zero_()


FAMILY = HSTUFamily()
