"""HSTU attention as one ONNX node, ``recompress.HSTUAttention``, for runtimes with a kernel for it.

Inputs: ``q``, ``k`` [B, L, H * attn_dim] and ``v`` [B, L, H * linear_dim] (the SiLU'd projections),
``bias`` [B or 1, L, L] (the relative position and time bias, added to every head) and ``allowed``
[B, L, L] (bool, True = query i may attend key j). Output: [B, L, H * linear_dim] =
per head ``(SiLU(q k^T * scale + bias) / L * allowed) v``. The attributes say what a plugin needs:
``num_heads``, ``attn_dim``, ``linear_dim``, ``scale``, ``normalization`` ("length": divide by the padded
length L), ``mask`` ("causal_real_keys": the mask is an input, causal over real keys) and
``bias_layout`` ("dense_b1ll"). The export stage attaches a function body in standard ops
(``recompress.export.functions``), so a runtime without a plugin runs the node too.
"""

from __future__ import annotations

import torch
from torch import Tensor

DOMAIN, OP = "recompress", "HSTUAttention"


def hstu_node(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, allowed: Tensor, *, heads: int, attn_dim: int,
              linear_dim: int) -> Tensor:
    """The node, written while exporting (outside an export, call the decomposed computation instead)."""
    b, length, _ = q.shape
    attrs = {"num_heads": heads, "attn_dim": attn_dim, "linear_dim": linear_dim, "scale": 1.0,
             "normalization": "length", "mask": "causal_real_keys", "bias_layout": "dense_b1ll"}
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{OP}", (q, k, v, bias, allowed), attrs, dtype=q.dtype,
                                   shape=(b, length, heads * linear_dim), version=1)
