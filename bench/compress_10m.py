"""Benchmark (not a test): time and peak memory to compress one 10M x 64 fp32 table on this machine.

    python bench/compress_10m.py --out bench/results/compress_10m.json [--rows 10000000 --dim 64]

Each method runs in its own subprocess, so the peak resident memory (ru_maxrss) is that method's alone.
It is reported above the interpreter's own footprint (python + torch, measured before the table exists) as
a multiple of the table's bytes: the table itself counts as 1x, so 1.3x means 30% working memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

METHODS = {"tt rank 16": ("tt", {"tt_rank": 16}), "tt rank 32": ("tt", {"tt_rank": 32}),
           "int8": ("int8", {}), "int4": ("int4", {})}


def one(method: str, rows: int, dim: int) -> dict:
    from recompress.compress.registry import Context, compress, parse_methods

    from recompress.checkpoint import Checkpoint
    from recompress.models.dlrm import DLRM, default_hparams
    from recompress.spec import ModelSpec
    from recompress.tables import DenseTable

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # interpreter + torch, before the table
    # a trained-like table: a rank-32 signal plus noise, filled in place in chunks
    table = DenseTable(rows, dim)
    basis = torch.randn(32, dim, generator=gen)
    with torch.no_grad():
        for s in range(0, rows, 1 << 18):
            n = min(1 << 18, rows - s)
            table.weight[s:s + n] = torch.randn(n, 32, generator=gen) @ basis * 0.05 + torch.randn(n, dim, generator=gen) * 0.01
    table_bytes = table.stored_bytes()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    hp = default_hparams(1, dim, [dim], [1])
    model = DLRM(hp, {"T": table})
    ckpt = Checkpoint(model, ModelSpec(family="dlrm", hparams=hp, tables=[]))
    name, params = METHODS[method]
    t0 = time.perf_counter()
    ckpt = compress(ckpt, parse_methods(name, params), Context())
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    h = ckpt.spec.history[-1]["tables"]["T"]
    return {"method": method, "rows": rows, "dim": dim, "seconds": round(seconds, 2), "table_bytes": table_bytes,
            "peak_rss_bytes": peak, "peak_over_table": round(peak / table_bytes, 3),
            "rss_before_compress_over_table": round(rss0 / table_bytes, 3),
            "bytes_after": h["bytes_after"], "ratio": round(table_bytes / h["bytes_after"], 1),
            "rel_error": h["rel_error"], "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.rows, a.dim)))
        return
    results = []
    for m in METHODS:
        p = subprocess.run([sys.executable, __file__, "--out", a.out, "--rows", str(a.rows), "--dim", str(a.dim),
                            "--one", m], capture_output=True, text=True, check=True)
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
