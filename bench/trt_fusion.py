"""Benchmark (not a test): which SASRec attention shapes TensorRT builds as fused attention (fp16).

    python bench/trt_fusion.py --out bench/results/trt_fusion.json

For history length L x heads x head size: an untrained SASRec with Amazon Beauty's 12,102-row item table
(12,101 items and the padding row) and 2 blocks, exported with ``--target trt`` at the default precision
(fp16); records how many of its attention layers the engine holds as fused attention, and the fallback note
where none fused.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

LENGTHS = (10, 50, 200)
SHAPES = [(1, 32), (1, 50), (1, 64), (1, 128), (2, 16), (2, 32), (2, 64), (2, 100), (2, 128), (4, 32), (4, 64),
          (8, 128)]  # (heads, dim); head size dim / heads


def sasrec(heads: int, dim: int, length: int) -> object:
    from recompress.checkpoint import Checkpoint
    from recompress.families import get_family
    from recompress.spec import ModelSpec

    fam = get_family("sasrec")
    hp = {**fam.hparams({"dim": dim, "heads": heads, "max_len": length, "blocks": 2}), "num_items": 12101,
          "has_times": False, "tied_output": True}
    spec = ModelSpec(family="sasrec", hparams=hp, tables=fam.spec_tables({"item": (12102, dim, "item"),
                                                                          "position": (length + 1, dim, "position")}))
    m = fam.from_spec(spec)
    fam.init(m, 0)
    return Checkpoint(m.eval(), spec, None)


def main() -> None:
    from recompress.export import export_checkpoint

    from recompress.errors import UserError

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    results = []
    for length, (heads, dim) in ((n, s) for n in LENGTHS for s in SHAPES):
        shape = {"max_len": length, "heads": heads, "dim": dim, "head_size": dim // heads}
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            try:
                m = export_checkpoint(sasrec(heads, dim, length), "trt", Path(tmp) / "e", samples=64, opts={})
            except UserError as e:
                results.append({**shape, "error": str(e)[:600]})
                print(json.dumps(results[-1]), flush=True)
                continue
        lay = m["engine"]["layers"]
        results.append({**shape, "precision": m["precision"],
                        "fused_attention": lay["fused_attention"], "attention_layers": len(lay["attention"]),
                        "attention_fallback": lay["attention_fallback"], "parity": m["parity"].get("max_abs_diff"),
                        "flavor": m["engine"]["flavor"], "version": m["engine"]["version"]})
        print(json.dumps(results[-1]), flush=True)
    Path(a.out).write_text(json.dumps({"machine": "2 CPU cores, no GPU", "model": "sasrec, 12,102 item rows, 2 blocks, "
                                       "untrained", "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
