"""Benchmark (not a test): TensorRT engine builds on this CPU-only machine (TensorRT-RTX, ahead of time).

    python bench/trt_build.py --out bench/results/trt_build.json [--only NAME ...]

For each model and table form: ``export_checkpoint(..., "trt")`` time (ONNX export + ONNX Runtime parity +
engine build), the engine build alone, the engine file's bytes, the bytes the network holds for table rows
and their type, fused attention layers, and the peak resident memory (each variant in its own process).

Models: a DLRM with the full Criteo Kaggle vocabulary (dlrm's 26 per-table sizes, 33.8M rows, d = 16, dlrm's
Kaggle MLPs 13-512-256-64-16 / 512-256-1; untrained weights: build time and size do not depend on the
values) as dense fp32, int8 rows in both graph forms, fp16 rows and TT rank 16; SASRec and HSTU with a
12,102-item catalogue (Amazon Beauty's), d = 64, 2 blocks, L = 200, in their engine forms.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

KAGGLE = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992, 5461306,
          10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]  # dlrm tools/visualize.py
VARIANTS = {
    "dlrm-kaggle dense": ("dlrm", None, {}),
    "dlrm-kaggle int8": ("dlrm", ("int8", {}), {}),
    "dlrm-kaggle int8 gather-dequant": ("dlrm", ("int8", {}), {"quant_graph": "gather-dequant"}),
    "dlrm-kaggle fp16 rows": ("dlrm", ("fp16", {}), {}),
    "dlrm-kaggle tt rank 16": ("dlrm", ("tt", {"tt_rank": 16}), {}),
    "sasrec fp16 fused": ("sasrec", None, {}),
    "sasrec fp32 (attention decomposable)": ("sasrec", None, {"precision": "fp32"}),
    "sasrec fp16 int8 items": ("sasrec", ("int8", {}), {}),
    "hstu fp32 decomposed": ("hstu", None, {}),
}


def model(kind: str) -> object:
    from recompress.checkpoint import Checkpoint
    from recompress.families import get_family
    from recompress.models.dlrm import DLRM, default_hparams
    from recompress.spec import ModelSpec, TableSpec
    from recompress.tables import DenseTable

    gen = torch.Generator().manual_seed(0)
    if kind == "dlrm":
        hp = default_hparams(13, 16, [512, 256, 64, 16], [512, 256, 1])
        tables = {}
        for i, rows in enumerate(KAGGLE):
            t = DenseTable(rows, 16)
            with torch.no_grad():
                for s in range(0, rows, 1 << 20):
                    n = min(1 << 20, rows - s)
                    t.weight[s:s + n] = torch.randn(n, 16, generator=gen) * 0.05
            tables[f"C{i + 1}"] = t
        m = DLRM(hp, tables)
        spec = ModelSpec(family="dlrm", hparams=hp, tables=[TableSpec(name=n, rows=t.rows, dim=t.dim, role="sparse_feature")
                                                            for n, t in tables.items()])
        return Checkpoint(m.eval(), spec, None)
    fam = get_family(kind)
    hp = fam.hparams({"dim": 64, "heads": 2, "max_len": 200, "blocks": 2})
    hp = {**hp, "num_items": 12101, "has_times": kind == "hstu", "tied_output": True}
    spec = ModelSpec(family=kind, hparams=hp, tables=fam.spec_tables({"item": (12102, 64, "item"),
                                                                              "position": (201, 64, "position")}))
    m = fam.from_spec(spec)
    fam.init(m, 0)
    return Checkpoint(m.eval(), spec, None)


def one(name: str) -> dict:
    from recompress.compress.registry import Context, compress, parse_methods
    from recompress.export import export_checkpoint

    torch.set_num_threads(2)
    kind, method, opts = VARIANTS[name]
    ckpt = model(kind)
    if method:
        ckpt = compress(ckpt, parse_methods(method[0], method[1]), Context())
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        t0 = time.perf_counter()
        m = export_checkpoint(ckpt, "trt", Path(tmp) / "e", samples=256, opts=opts)
        total = time.perf_counter() - t0
    layers = m["engine"]["layers"]
    return {"variant": name, "rows": sum(t.rows for t in ckpt.model.tables.values()),
            "table_bytes_exported": sum(m["exported_table_bytes"].values()), "precision": m["precision"],
            "export_seconds": round(total, 1), "engine_build_seconds": m["engine"]["build_seconds"],
            "engine_bytes": m["engine"]["bytes"], "onnx_bytes": m["files"].get("model.onnx", 0)
            + m["files"].get("model.onnx.data", 0),
            "engine_table_value_bytes": sum(t["value_bytes"] for t in layers["tables"]),
            "engine_table_bytes": layers["table_bytes"],  # values + DQ scales + per-row biases
            "engine_table_dtypes": sorted({t["dtype"] for t in layers["tables"]}),
            "fused_attention": layers["fused_attention"], "attention_layers": len(layers["attention"]),
            "attention_fallback": layers["attention_fallback"], "parity": m["parity"].get("max_abs_diff"),
            "parity_runtime": m["parity"].get("runtime"), "flavor": m["engine"]["flavor"],
            "version": m["engine"]["version"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one)))
        return
    results = []
    for name in a.only or VARIANTS:
        p = subprocess.run([sys.executable, __file__, "--out", a.out, "--one", name], capture_output=True, text=True,
                           check=False)
        if p.returncode:
            results.append({"variant": name, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:500]})
        else:
            results.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    config = {"dlrm": {"tables": KAGGLE, "dim": 16, "bottom": "13-512-256-64-16", "top": "512-256-1"},
              "sequential": {"item_rows": 12102, "items": 12101, "dim": 64, "heads": 2, "blocks": 2, "max_len": 200,
                             "position_rows": 201}, "parity_samples": 256}
    Path(a.out).write_text(json.dumps({"machine": "2 CPU cores, no GPU", "config": config, "results": results},
                                      indent=2) + "\n")


if __name__ == "__main__":
    main()
