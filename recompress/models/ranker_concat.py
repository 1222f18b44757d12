"""The early-fusion ranker, the baseline the appended-candidate ranker is measured against (``--hp
fusion=concat``; LinkedIn, arXiv 2412.06924, compares the two): the candidate's row is concatenated to every
history item's token (then projected back to width d), the causal transformer runs over that sequence, and
the CTR head scores the last token's output with the candidate's row. Every token depends on the candidate,
so nothing is shared across candidates: M candidates cost M passes over the history (no amortized graph).

Blocks, head, positions and training targets are the appended ranker's: the candidate for position t (the
next item, and sampled negatives) sees the history up to t, with the BCE loss. Training and eager scoring
score windows in groups of similar length, each trimmed to its longest real part (exact: padding keys
are masked and padded queries are dropped), which makes early fusion affordable on short histories and,
when scoring, bounds memory (training keeps every group's activations for backward); an exported graph
reads the whole window.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from recompress.tables import Table

from .ranker import Block, head_mlp
from .sequential import Dropout, causal_mask, item_embed, per_candidate, positions

GROUP_ROWS = 2048  # windows sorted by real length, scored in groups of this many, each trimmed to its longest


def exporting() -> bool:
    return torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()


class ConcatRanker(nn.Module):
    family = "ranker"
    attention_forms = ("decomposed", "fused")

    def __init__(self, hparams: dict[str, Any], tables: dict[str, Table]) -> None:
        super().__init__()
        self.hparams = dict(hparams)
        d = hparams["dim"]
        self.tables = nn.ModuleDict(tables)
        self.fuse = nn.Linear(2 * d, d)
        self.emb_dropout = Dropout(hparams["dropout"])
        self.blocks = nn.ModuleList(Block(d, hparams["heads"], hparams["dropout"]) for _ in range(hparams["blocks"]))
        self.last_layernorm = nn.LayerNorm(d, eps=1e-8)
        self.head = head_mlp(d, hparams["head"])
        self.attention = self.attention_forms[0]

    def _logits(self, windows: Tensor, slots: Tensor, cands: Tensor) -> Tensor:
        """``[N]`` logits of candidate ``cands`` [N] after window ``windows`` [N, W] (slot ids ``slots``)."""
        scale = math.sqrt(self.hparams["dim"])
        real = (windows > 0).unsqueeze(-1).to(torch.float32)
        e = item_embed(self, cands)
        tokens = item_embed(self, windows) * scale + self.tables["position"].lookup(slots)
        h = self.fuse(torch.cat([tokens, (e * scale).unsqueeze(1).expand_as(tokens)], dim=-1))
        h = self.emb_dropout(h) * real
        mask = causal_mask(windows)
        for block in self.blocks:
            h = block.history(h, mask, self.attention)[0] * real
        out = self.last_layernorm(h[:, -1])
        return self.head(torch.cat([out, e, out * e], dim=-1)).squeeze(-1)

    def _trimmed(self, windows: Tensor, slots: Tensor, cands: Tensor) -> Tensor:
        if exporting():
            return self._logits(windows, slots, cands)
        if not len(windows):
            return self._logits(windows, slots, cands)
        real = windows > 0  # left-padded, so a window's real part is what follows its first real item
        lengths = torch.where(real.any(1), windows.shape[1] - real.to(torch.int8).argmax(1), 0)
        order = lengths.argsort()
        parts = []
        for idx in order.split(GROUP_ROWS):
            w = max(int(lengths[idx].max()), 1)
            parts.append(self._logits(windows[idx, -w:], slots[idx, -w:], cands[idx]))
        return torch.cat(parts)[order.argsort()]

    def forward(self, history: Tensor, candidates: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """CTR logits ``[B, M]`` of ``candidates`` (``[B, M]`` or ``[1, M]``): one history pass per candidate."""
        cands = candidates.expand(history.shape[0], -1)
        m = cands.shape[1]
        return self._trimmed(per_candidate(history, m), per_candidate(positions(history), m),
                             cands.reshape(-1)).reshape(cands.shape)

    def train_logits(self, history: Tensor, targets: Tensor, negatives: Tensor,
                     timestamps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Logits of each real position's target and negatives, each after the history up to that position
        (other positions: 0, which the loss masks out)."""
        b, length = history.shape
        if negatives.dim() == 1:  # shared by the batch
            negatives = negatives.expand(b, length, -1)
        rows, cols = ((targets > 0) & (history > 0)).nonzero(as_tuple=True)
        pad = history.new_zeros(b, length - 1)
        windows = torch.cat([pad, history], 1).unfold(1, length, 1)[rows, cols]  # [N, L]: the window ending at t
        slots = torch.cat([pad, positions(history)], 1).unfold(1, length, 1)[rows, cols]
        cands = torch.cat([targets[rows, cols, None], negatives[rows, cols]], dim=-1)  # [N, 1 + K]
        k1 = cands.shape[1]
        logits = self._trimmed(windows.repeat_interleave(k1, 0), slots.repeat_interleave(k1, 0),
                               cands.reshape(-1)).reshape(-1, k1)
        out = logits.new_zeros(b, length, k1).index_put((rows, cols), logits)
        return out[..., 0], out[..., 1:]
