"""generative-recommenders' ``DlrmHSTU`` (``modules/dlrm_hstu.py``, the dlrm_v3 ranker), rebuilt on padded tensors.

One row of a batch is a user: ``C`` contextual tokens (one per contextual feature: its table's row through a
per-slot linear map, zeroed while the history plus candidates are shorter than ``min_uih``), the user's history
(``lengths`` items: each item row through the content MLP), then ``M`` candidates (the same content MLP), as
upstream's jagged sequence ``[contextual | history | candidates]``. Tokens are scaled by sqrt(width) and get a
position row (contextual slot j: j; history item t of L: C + L - t; every candidate: C) and a time-bucket row
(sqrt of (query time - timestamp) / 60 s, clamped). STU layers (pointwise SiLU attention divided by the batch's
longest sequence ``C + max(lengths) + M``, as upstream's jagged kernels divide by the batch's max_seq_len; target
aware: a candidate attends the contextual and history tokens and itself, never other candidates; U-gated group or
layer norm; ``[u, attention, gated]`` through the output weight, residual). Each candidate's output gets
hour-of-day and day-of-week features of the query time, a linear map and a layer norm; times an MLP of the
candidate's item row, a prediction MLP gives one logit per task (regression tasks as they are, binary ones through
a sigmoid). Upstream's layout in memory (candidates right after each history) differs; the mask, positions and
normalizer make the arithmetic the same.

Time buckets: ``kernel=pytorch`` clamps at width - 1, as upstream's PyTorch kernel (``ts_embeddings.size(1) - 1``,
what dlrm_v3's ``make_model`` selects for training and evaluation); ``kernel=triton`` at the table's last row, as
its Triton kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recompress.tables import Table

from .sequential import Dropout

CONTENT_HIDDEN, ITEM_HIDDEN, HEAD_HIDDEN = 256, 512, 512  # upstream's fixed MLP widths
POSITION_ROWS, TIME_BUCKETS = 8192, 2048
TIME_FEATURES = ((3600.0, 24.0), (86400.0, 7.0))  # hour of day, day of week (TimestampLayerNormPostprocessor)


class SwishLayerNorm(nn.Module):
    """``x * sigmoid(layer_norm(x))`` (upstream's SwishLayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps))


def mlp(d_in: int, hidden: int, d_out: int, final_norm: bool) -> nn.Sequential:
    """Linear, SwishLayerNorm, Linear (and a LayerNorm): upstream's content, item and prediction MLPs."""
    layers: list[nn.Module] = [nn.Linear(d_in, hidden), SwishLayerNorm(hidden), nn.Linear(hidden, d_out)]
    return nn.Sequential(*layers, nn.LayerNorm(d_out, eps=1e-5)) if final_norm else nn.Sequential(*layers)


class STULayer(nn.Module):
    """One target-aware STU layer (``modules/stu.py`` STULayer, ``ops/pytorch`` hstu_mha and compute_output)."""

    def __init__(self, width: int, heads: int, linear_dim: int, qk_dim: int, group_norm: bool, dropout: float) -> None:
        super().__init__()
        self.heads, self.linear_dim, self.qk_dim, self.group_norm = heads, linear_dim, qk_dim, group_norm
        self.uvqk_weight = nn.Parameter(torch.empty(width, (2 * linear_dim + 2 * qk_dim) * heads))
        self.uvqk_beta = nn.Parameter(torch.zeros((2 * linear_dim + 2 * qk_dim) * heads))
        self.input_norm_weight, self.input_norm_bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        self.output_weight = nn.Parameter(torch.empty(3 * linear_dim * heads, width))
        norm = heads if group_norm else heads * linear_dim
        self.output_norm_weight, self.output_norm_bias = nn.Parameter(torch.ones(norm)), nn.Parameter(torch.zeros(norm))
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor, norm: Tensor) -> Tensor:
        """``x`` [B, N, width]; ``allowed`` [B, N, N] (query, key); ``norm`` the attention's divisor."""
        b, n, _ = x.shape
        h, dv, dq = self.heads, self.linear_dim, self.qk_dim
        normed = F.layer_norm(x, x.shape[-1:], self.input_norm_weight, self.input_norm_bias, 1e-6)
        u, v, q, k = (normed @ self.uvqk_weight + self.uvqk_beta).split([dv * h, dv * h, dq * h, dq * h], dim=-1)
        u = F.silu(u)
        q, k = q.reshape(b, n, h, dq).transpose(1, 2), k.reshape(b, n, h, dq).transpose(1, 2)
        scores = F.silu(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(dq))) / norm
        scores = scores * allowed.unsqueeze(1).to(scores.dtype)
        attn = (scores @ v.reshape(b, n, h, dv).transpose(1, 2)).transpose(1, 2).reshape(b, n, h * dv)
        if self.group_norm:
            normed_attn = F.group_norm(attn.reshape(b * n, h, dv), h, self.output_norm_weight, self.output_norm_bias,
                                       1e-6).reshape(b, n, h * dv)
        else:
            normed_attn = F.layer_norm(attn, (h * dv,), self.output_norm_weight, self.output_norm_bias, 1e-6)
        y = self.dropout(torch.cat([u, attn, u * normed_attn], dim=-1))
        return x + y @ self.output_weight


class DlrmHSTU(nn.Module):
    """The model; ``forward`` scores ``candidates`` [B, M] for each history -> ``[B, M, tasks]``."""

    family = "dlrm_hstu"

    def __init__(self, hparams: dict, tables: dict[str, Table]) -> None:
        super().__init__()
        hp = self.hparams = dict(hparams)
        self.tables = nn.ModuleDict(tables)
        self.item_table, self.contextual = hp["item_table"], list(hp["contextual"])
        d, w = hp["dim"], hp["width"]
        c = len(self.contextual)
        self.contextual_weight = nn.Parameter(torch.empty(c, d, w))
        self.contextual_bias = nn.Parameter(torch.zeros(c, w))
        self.content_mlp = mlp(d, CONTENT_HIDDEN, w, final_norm=True)
        self.position_weight = nn.Parameter(torch.empty(POSITION_ROWS, w))
        self.time_weight = nn.Parameter(torch.empty(TIME_BUCKETS + 1, w))
        self.input_dropout = Dropout(hp["dropout"])
        self.blocks = nn.ModuleList(STULayer(w, hp["heads"], hp["linear_dim"], hp["qk_dim"], hp["group_norm"],
                                             hp["linear_dropout"]) for _ in range(hp["blocks"]))
        self.register_buffer("period_units", torch.tensor([[p for p, _ in TIME_FEATURES]]))
        self.register_buffer("units_per_period", torch.tensor([[u for _, u in TIME_FEATURES]]))
        self.time_combiner = nn.Linear(w + 2 * len(TIME_FEATURES), w)
        self.post_norm = nn.LayerNorm(w, eps=1e-5)
        self.item_mlp = mlp(d, ITEM_HIDDEN, w, final_norm=True)
        self.tasks = [t.split(":") for t in hp["tasks"]]
        self.head = mlp(w, HEAD_HIDDEN, len(self.tasks), final_norm=False)
        self.bucket_max = w - 1 if hp["kernel"] == "pytorch" else TIME_BUCKETS

    def time_features(self, t: Tensor) -> Tensor:
        """``[..., 2 * features]``: cos and sin of the phase of each period at int64 times ``t``."""
        # upstream: torch.div(int64 t, float32 period, rounding_mode="floor"): t rounded to float32 (an integer at
        # these magnitudes), then the exact floor of the quotient, which integer division gives (floor of a rounded
        # float32 quotient is off by one hour where it rounds up to a whole number). Written with //: torch.div with
        # a rounding mode exports inexactly for int64 (the dynamo exporter, opset 18: off by one at 1e9 seconds).
        whole = t.unsqueeze(-1).to(torch.float32).to(torch.int64)
        units = (whole // self.period_units.to(torch.int64)).to(torch.float32)
        angle = torch.remainder(units, self.units_per_period) / self.units_per_period * 2 * 3.14
        return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1).flatten(-2)

    def forward(self, history: Tensor, timestamps: Tensor, lengths: Tensor, context: Tensor, candidates: Tensor,
                query_time: Tensor) -> Tensor:
        """``history``/``timestamps`` [B, L] (the first ``lengths`` entries real), ``context`` [B, C] ids of the
        contextual features, ``candidates`` [B, M], ``query_time`` [B] (int64 seconds)."""
        b, length = history.shape
        m, c = candidates.shape[1], len(self.contextual)
        items = self.tables[self.item_table]
        seq = self.content_mlp(torch.cat([items.lookup(history), items.lookup(candidates)], dim=1))
        if c:
            gate = ((lengths + m) >= self.hparams["min_uih"]).to(seq.dtype).view(b, 1, 1)
            ctx = torch.stack([self.tables[name].lookup(context[:, i]) for i, name in enumerate(self.contextual)], 1)
            ctx = torch.einsum("bcd,cdw->bcw", ctx * gate, self.contextual_weight) + self.contextual_bias
            seq = torch.cat([ctx, seq], dim=1)
        slot = torch.arange(length, device=history.device).unsqueeze(0)
        real = slot < lengths.unsqueeze(1)  # [B, L]
        n = c + length + m
        ones = torch.ones(b, 1, dtype=torch.bool, device=history.device)
        key_real = torch.cat([ones.expand(b, c), real, ones.expand(b, m)], dim=1)
        order = torch.cat([torch.arange(c, device=history.device).expand(b, c), c + slot.expand(b, length),
                           (c + lengths).unsqueeze(1).expand(b, m)], dim=1)  # upstream's clamped ids
        eye = torch.eye(n, dtype=torch.bool, device=history.device).unsqueeze(0)
        allowed = (eye | (order.unsqueeze(2) > order.unsqueeze(1))) & key_real.unsqueeze(1)
        pos = torch.cat([torch.arange(c, device=history.device).expand(b, c),
                         (c + lengths.unsqueeze(1) - slot).clamp(0, POSITION_ROWS - 1),  # padding: any row
                         torch.full((b, m), c, dtype=torch.long, device=history.device)], dim=1)
        times = torch.cat([torch.zeros(b, c, dtype=timestamps.dtype, device=history.device), timestamps,
                           query_time.unsqueeze(1).expand(b, m)], dim=1)
        # upstream: (query - t).clamp(min=1e-6) / 60 in float32, sqrt, truncated: the same buckets, 0 for t >= query
        delta = (query_time.unsqueeze(1) - times).clamp(min=0).to(torch.float32) / 60.0
        bucket = torch.sqrt(delta).to(torch.int32).clamp(0, self.bucket_max)
        x = seq * math.sqrt(seq.shape[-1]) + self.position_weight[pos] + self.time_weight[bucket.long()]
        x = self.input_dropout(x)
        norm = (c + m + lengths.max()).to(x.dtype)
        for block in self.blocks:
            x = block(x, allowed, norm)
        user = x[:, c + length:]
        cand_times = query_time.unsqueeze(1).expand(b, m)
        user = self.post_norm(self.time_combiner(torch.cat([user, self.time_features(cand_times)], dim=-1)))
        logits = self.head(user * self.item_mlp(items.lookup(candidates)))
        binary = torch.tensor([kind == "binary" for _, kind in self.tasks], device=logits.device)
        return torch.where(binary, torch.sigmoid(logits), logits)
