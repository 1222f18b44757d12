"""Benchmark (not a test): ONNX Runtime session memory for quantized tables in both graph forms.

    python bench/quant_memory.py --out bench/results/quant_memory.json [--rows 2000000 --dim 64]

Exports one DLRM whose embeddings are a single rows x dim table as dense fp32, and as int8 / int4 /
fp16 rows in the ``gather-dequant`` form (gather stored rows, then scale) and, where it exists, the
``dequant-gather`` form (``DequantizeLinear(axis=0)`` on the whole table, then gather: TensorRT's form).
Each session is then created in a fresh process, and the resident memory it adds (RSS after creating the
session and running one batch, minus RSS before) is compared with the file size. That shows whether
ONNX Runtime keeps the table quantized or folds it into a float table at load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

FORMS = [("fp32", None, "gather-dequant"), ("int8", "int8", "gather-dequant"), ("int8", "int8", "dequant-gather"),
         ("int4", "int4", "gather-dequant"), ("fp16", "fp16", "gather-dequant"), ("fp16", "fp16", "dequant-gather")]


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(model_path: str) -> dict:
    import numpy as np
    import onnxruntime as ort  # noqa: F401  (imported before the baseline reading)
    from recompress.export.onnx import make_session
    before = rss()
    sess = make_session(Path(model_path), threads=2)
    after_load = rss()
    rng = np.random.default_rng(0)
    sess.run(None, {"dense": rng.random((512, 13), dtype=np.float32),
                    "sparse": rng.integers(0, 1000, (512, 1, 1), dtype=np.int64)})
    return {"session_load_bytes": after_load - before, "session_after_run_bytes": rss() - before}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure)))
        return
    import torch
    from recompress.compress.registry import Context, compress, parse_methods
    from recompress.export import export_checkpoint

    from recompress.checkpoint import Checkpoint
    from recompress.models.dlrm import DLRM, default_hparams
    from recompress.spec import ModelSpec
    from recompress.tables import DenseTable

    table = DenseTable(a.rows, a.dim)
    table.reset_parameters(torch.Generator().manual_seed(0))
    hp = default_hparams(13, a.dim, [64, a.dim], [64, 1])
    tmp = Path(tempfile.mkdtemp(prefix="qmem-"))
    results = []
    for name, method, form in FORMS:
        model = DLRM(hp, {"T": DenseTable(a.rows, a.dim, table.weight)})
        ckpt = Checkpoint(model, ModelSpec(family="dlrm", hparams=hp, tables=[]))
        if method:
            ckpt = compress(ckpt, parse_methods(method), Context())
        folder = tmp / f"{name}-{form}"
        m = export_checkpoint(ckpt, "onnx", folder, samples=256, opts={"quant_graph": form})
        p = subprocess.run([sys.executable, __file__, "--out", a.out, "--measure", str(folder / "model.onnx")],
                           capture_output=True, text=True, check=True)
        mem = json.loads(p.stdout.strip().splitlines()[-1])
        row = {"format": name, "graph_form": form, "file_bytes": m["files"]["model.onnx"],
               "table_bytes": m["table_bytes"]["T"], "ops": [o for o in m["ops"] if o in ("DequantizeLinear", "Cast")],
               **mem, "session_over_file": round(mem["session_after_run_bytes"] / m["files"]["model.onnx"], 2)}
        results.append(row)
        print(json.dumps(row), flush=True)
    Path(a.out).write_text(json.dumps({"rows": a.rows, "dim": a.dim, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
