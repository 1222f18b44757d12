"""Benchmark (GPU only, not a test): the fused Triton HSTU attention kernel against the PyTorch reference
and against softmax attention (``scaled_dot_product_attention``) of the same shape, forward, bf16.

    python bench/hstu_kernel_gpu.py --out $OUT/hstu_kernel.json [--lengths 512,2048,8192] [--peak-tflops 989]
    TRITON_INTERPRET=1 python bench/hstu_kernel_gpu.py --smoke --out /tmp/k.json   # CPU: checks the script runs

Per length L: batch so that B * L = 16,384 tokens, 4 heads of 64 (HSTU-large's head size), causal, all rows
real, relative position bias. Times are medians of CUDA-event timings over rotating inputs, each backend in
turn (backends alternate every round); ratios are to the PyTorch reference and to SDPA from the same run.
Achieved FLOP/s counts the two causal matmuls (2 * 2 * B * H * L^2 * d / 2) against ``--peak-tflops``
(dense bf16 tensor-core peak of the GPU; 989 for H100/H200 SXM). The reference materializes [B, H, L, L].
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F


def reference(q, k, v, pos_w, max_len, real):
    """The decomposed HSTU attention of ``recompress.models.hstu.STU`` ([B, L, H, d] in, out)."""
    length = q.shape[1]
    i = torch.arange(length, device=q.device)[:, None]
    j = torch.arange(length, device=q.device)[None, :]
    bias = pos_w[(max_len - 1 + j - i).clamp(0, 2 * max_len - 2)]
    allowed = (j <= i) & (real[:, None, :] | (i == j))
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) + bias
    attn = F.silu(s) / length * allowed[:, None].to(q.dtype)
    return torch.einsum("bhnm,bmhd->bnhd", attn, v)


def timed(fn, inputs, rounds: int, device: str) -> list[float]:
    out = []
    for r in range(rounds):
        x = inputs[r % len(inputs)]
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*x)
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            fn(*x)
            out.append(float("nan"))
    return out


def make_backends(pos_w, length: int, real, dtype, block: int) -> dict:
    from recompress.kernels.hstu_attention import hstu_attention

    def triton(q, k, v):
        return hstu_attention(q, k, v, pos_w, length, real, block_m=block, block_n=block)

    def torch_reference(q, k, v):
        return reference(q, k, v, pos_w.to(dtype), length, real)

    def sdpa_softmax(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)

    return {"triton": triton, "torch_reference": torch_reference, "sdpa_softmax": sdpa_softmax}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--tokens", type=int, default=16_384)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter): the script runs")
    a = ap.parse_args()
    device = "cpu" if a.smoke else "cuda"
    dtype = torch.float32 if a.smoke else torch.bfloat16
    lengths = [32] if a.smoke else [int(x) for x in a.lengths.split(",")]
    tokens, rounds = (64, 2) if a.smoke else (a.tokens, a.rounds)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)", "dtype": str(dtype),
              "heads": a.heads, "dim": a.dim, "tokens": tokens, "peak_tflops": a.peak_tflops, "lengths": {}}
    for length in lengths:
        b = max(1, tokens // length)
        g = torch.Generator(device=device).manual_seed(length)
        inputs = [tuple(torch.randn(b, length, a.heads, a.dim, device=device, dtype=dtype, generator=g) for _ in range(3))
                  for _ in range(4)]
        pos_w = torch.randn(2 * length - 1, device=device, dtype=torch.float32, generator=g) * 0.02
        real = torch.ones(b, length, dtype=torch.bool, device=device)
        backends = make_backends(pos_w, length, real, dtype, 16 if a.smoke else 64)
        with torch.no_grad():
            err = (backends["triton"](*inputs[0]).float() - backends["torch_reference"](*inputs[0]).float()).abs().max().item()
            for fn in backends.values():  # warm-up and compilation
                timed(fn, inputs, 3, device)
            times = {n: [] for n in backends}
            for r in range(rounds):
                for n in (list(backends) if r % 2 == 0 else list(backends)[::-1]):
                    times[n] += timed(backends[n], inputs[r % 4:r % 4 + 1], 1, device)
        med = {n: statistics.median(t) for n, t in times.items()}
        flops = 2 * 2 * b * a.heads * length * length * a.dim / 2
        result["lengths"][str(length)] = {
            "batch": b, "max_abs_diff_vs_reference": err, "median_ms": med,
            "triton_speedup_vs_reference": med["torch_reference"] / med["triton"],
            "triton_speedup_vs_sdpa": med["sdpa_softmax"] / med["triton"],
            "triton_tflops": flops / (med["triton"] / 1e3) / 1e12,
            "triton_fraction_of_peak": flops / (med["triton"] / 1e3) / 1e12 / a.peak_tflops}
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        print(length, result["lengths"][str(length)])


if __name__ == "__main__":
    main()
