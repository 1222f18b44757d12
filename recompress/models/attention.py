"""Attention forms: one computation, several ways to write it for a runtime.

A model that can write its attention several ways has ``attention_forms`` (what it accepts, its default
first) and an ``attention`` attribute naming the form in use; :func:`set_attention` is the one switch
(an export target names the form it prefers, used where a model takes it; ``evaluate --attention``
picks the form for torch). Forms:

- ``fused`` (softmax): one ``scaled_dot_product_attention`` call, which the ONNX exporter writes as one
  ``Attention`` node at opset >= 23 (runtimes with a fused kernel use it; TensorRT maps it to its fused
  attention layer) and decomposes at older opsets.
- ``decomposed``: MatMul, mask, Softmax (or HSTU's SiLU / length), MatMul in standard ops.
- ``custom`` (HSTU): one ``recompress.HSTUAttention`` node whose attributes are what a plugin needs
  (``export/hstu_node.py``); the model carries a function body in standard ops, so a runtime without a
  plugin still runs it.
- ``triton`` (HSTU, CUDA, forward only): the fused kernel of ``recompress.kernels.hstu_attention``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from recompress.errors import UserError

FORMS = ("fused", "decomposed", "custom", "triton")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "attention_forms")]


def check_attention(model: nn.Module, form: str | None) -> None:
    """Refuse, by name, a form that some attention-bearing module of ``model`` cannot take."""
    for m in attention_modules(model):
        if form is not None and form not in m.attention_forms:
            raise UserError(f"{type(m).__name__} attention has no {form!r} form",
                            f"choose from {', '.join(m.attention_forms)}")


def set_attention(model: nn.Module, form: str | None, preferred: str | None = None) -> list[str]:
    """Every attention-bearing module of ``model`` to ``form`` (None: ``preferred`` where the module takes
    it, else the module's default, its first form), in place; returns the forms in use."""
    check_attention(model, form)
    used = []
    for m in attention_modules(model):
        m.attention = form or (preferred if preferred in m.attention_forms else m.attention_forms[0])
        used.append(m.attention)
    return sorted(set(used))


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, form: str, dropout: float = 0.0) -> Tensor:
    """``softmax(q k^T / sqrt(dh), masked to allowed) v`` for ``[B, H, Lq, dh]`` tensors, ``allowed``
    broadcasting to ``[B, H, Lq, Lk]`` (True = may attend; every query must allow one key)."""
    if form == "fused":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
    logits = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    if dropout:
        weights = F.dropout(weights, dropout)
    return weights @ v


def multihead(layer: nn.MultiheadAttention, x: Tensor, allowed: Tensor, form: str, kv: Tensor | None = None) -> Tensor:
    """``nn.MultiheadAttention(x, kv, kv)`` (batch first; ``kv`` defaults to ``x``: self-attention) with its own
    parameters and the attention written in ``form``; ``allowed`` is ``[B, L, L]``. In training the attention
    dropout is the layer's, drawn as the layer draws it."""
    b, n, d = x.shape
    heads = layer.num_heads
    if kv is None:
        q, k, v = F.linear(x, layer.in_proj_weight, layer.in_proj_bias).chunk(3, dim=-1)
    else:  # queries from x, keys and values from kv (SASRec.pytorch's 2020 blocks)
        (wq, wkv), (bq, bkv) = layer.in_proj_weight.split([d, 2 * d]), layer.in_proj_bias.split([d, 2 * d])
        q, (k, v) = F.linear(x, wq, bq), F.linear(kv, wkv, bkv).chunk(2, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    out = softmax_attention(q, k, v, allowed.unsqueeze(1), form,
                            layer.dropout if layer.training else 0.0)
    return layer.out_proj(out.transpose(1, 2).reshape(b, n, d))
