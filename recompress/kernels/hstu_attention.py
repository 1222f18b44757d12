"""HSTU's pointwise attention fused in one Triton kernel (forward, padded batches).

Computes, per batch row b and head h, what ``recompress.models.hstu.STU`` computes in standard ops:

    y_i = sum_j  allowed(i, j) * SiLU(q_i . k_j + rab(i, j)) / L * v_j     (or / norm)

with the relative bias rab(i, j) = pos_w[clamp(max_len - 1 + j - i, 0, 2 max_len - 2)] plus, when
timestamps are given, ts_w[bucket(t_{i+1} - t_j)] (bucket = floor(ln max(|gap|, 1) / 0.301), exact for
integer gaps, clipped to [0, 128], the last position's next timestamp its own), both computed on the fly from the weight vectors,
never as an [L, L] matrix. The mask is causal over real keys (``real`` [B, L]; a padded query sees only
itself); with ``candidates`` M > 0 the last M positions are candidates (M-FALCON): each attends every
real history key and itself, never another candidate. One program handles BLOCK_M queries of one (b, h)
and walks key blocks up to its causal bound, accumulating in fp32.

CUDA tensors in fp32/bf16/fp16; with ``TRITON_INTERPRET=1`` Triton's interpreter runs it on CPU tensors
(how CI tests it). fp32 inputs use IEEE fp32 dot products (no TF32), so results match the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from recompress.errors import UserError

from recompress.models.hstu import BUCKET_STARTS, TIME_BUCKETS


@triton.jit
def _hstu_fwd(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, tsw_ptr, ts_ptr, starts_ptr, real_ptr,
              length, max_len, hist, inv_len, next_last,
              sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, so_b, so_l, so_h, sts_b, sr_b,
              HEADS: tl.constexpr, A: tl.constexpr, DV: tl.constexpr, BA: tl.constexpr, BDV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_TS: tl.constexpr, EXACT: tl.constexpr,
              PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, BA)
    offs_v = tl.arange(0, BDV)
    row_ok = offs_m < length
    q = tl.load(q_ptr + b * sq_b + offs_m[:, None] * sq_l + h * sq_h + offs_a[None, :],
                mask=row_ok[:, None] & (offs_a[None, :] < A), other=0.0)
    if HAS_TS:
        t_next = tl.load(ts_ptr + b * sts_b + tl.minimum(offs_m + 1, next_last), mask=row_ok, other=0)
    acc = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)
    end = tl.minimum((pid_m + 1) * BLOCK_M, length)  # causal: no query of this block sees a later key
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < length
        k = tl.load(k_ptr + b * sk_b + offs_n[:, None] * sk_l + h * sk_h + offs_a[None, :],
                    mask=col_ok[:, None] & (offs_a[None, :] < A), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        rel = tl.minimum(tl.maximum(max_len - 1 + offs_n[None, :] - offs_m[:, None], 0), 2 * max_len - 2)
        s += tl.load(pos_ptr + rel).to(tl.float32)
        if HAS_TS:
            t_key = tl.load(ts_ptr + b * sts_b + offs_n, mask=col_ok, other=0)
            gap = tl.maximum(tl.abs(t_next[:, None] - t_key[None, :]), 1)
            guess = tl.minimum(tl.maximum((tl.log(gap.to(tl.float32)) / 0.301).to(tl.int32), 0), TIME_BUCKETS)
            if EXACT:  # as in hstu.time_buckets
                guess = guess - (gap < tl.load(starts_ptr + guess)).to(tl.int32)
                guess = guess + (gap >= tl.load(starts_ptr + guess + 1)).to(tl.int32)
            bucket = tl.minimum(tl.maximum(guess, 0), TIME_BUCKETS)
            s += tl.load(tsw_ptr + bucket).to(tl.float32)
        real = tl.load(real_ptr + b * sr_b + offs_n, mask=col_ok, other=0) != 0
        diag = offs_m[:, None] == offs_n[None, :]
        history_rule = (offs_n[None, :] <= offs_m[:, None]) & (real[None, :] | diag)
        candidate_rule = ((offs_n[None, :] < hist) & real[None, :]) | diag
        allowed = tl.where(offs_m[:, None] >= hist, candidate_rule, history_rule) & col_ok[None, :]
        p = tl.where(allowed, s * tl.sigmoid(s) * inv_len, 0.0)
        v = tl.load(v_ptr + b * sv_b + offs_n[:, None] * sv_l + h * sv_h + offs_v[None, :],
                    mask=col_ok[:, None] & (offs_v[None, :] < DV), other=0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    tl.store(o_ptr + b * so_b + offs_m[:, None] * so_l + h * so_h + offs_v[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_v[None, :] < DV))


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def hstu_attention(q: Tensor, k: Tensor, v: Tensor, pos_w: Tensor, max_len: int, real: Tensor,
                   ts_w: Tensor | None = None, timestamps: Tensor | None = None, candidates: int = 0,
                   block_m: int = 64, block_n: int = 64, norm: int | None = None, query_time: bool = False,
                   exact_buckets: bool = True) -> Tensor:
    """``q``, ``k`` [B, L, H, A], ``v`` [B, L, H, DV], ``real`` [B, L] (True = a real item) -> [B, L, H, DV].

    ``pos_w`` [2 max_len - 1] and (optional) ``ts_w`` [129] with int64 ``timestamps`` [B, L] (``[B, L + 1]``
    with ``query_time``: the last is the next item's time) give the relative bias; the last ``candidates``
    positions follow the M-FALCON mask; the sum is divided by ``norm`` (default L); ``exact_buckets=False``
    buckets gaps by the float32 log alone (the research HSTU's rule). Forward only."""
    b, length, heads, a = q.shape
    dv = v.shape[-1]
    if ts_w is not None and timestamps is not None and timestamps.shape[1] != length + query_time:
        raise UserError(f"timestamps have {timestamps.shape[1]} columns for {length} positions",
                        f"send {length + query_time} timestamps per row" + (" (the last: the query's time)" if query_time
                                                                          else ""))
    if length > max_len:
        raise UserError(f"history length {length} exceeds the model's max_len {max_len}",
                        f"send the last {max_len} items, left-padded with 0")
    if not 0 <= candidates <= length:
        raise UserError(f"candidates {candidates} is not in [0, {length}]", "count the candidate positions in the sequence")
    q, k, v = (t.contiguous() if t.stride(-1) != 1 else t for t in (q, k, v))
    out = torch.empty(b, length, heads, dv, dtype=q.dtype, device=q.device)
    has_ts = ts_w is not None and timestamps is not None
    ts = timestamps.contiguous() if has_ts else real  # an unused pointer when there are no timestamps
    real_i8 = real.to(torch.int8).contiguous()
    grid = (triton.cdiv(length, block_m), b * heads)
    starts = torch.tensor(BUCKET_STARTS, dtype=ts.dtype, device=q.device) if has_ts else real_i8
    _hstu_fwd[grid](q, k, v, out, pos_w.contiguous(), ts_w if has_ts else pos_w, ts, starts, real_i8,
                    length, max_len, length - candidates, 1.0 / (norm or length), length - 1 + query_time,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                    ts.stride(0), real_i8.stride(0),
                    HEADS=heads, A=a, DV=dv, BA=_block(a), BDV=_block(dv), BLOCK_M=block_m, BLOCK_N=block_n,
                    HAS_TS=has_ts, EXACT=exact_buckets, PRECISION="ieee" if q.dtype == torch.float32 else None)
    return out
