"""What every export target shares: atomic output folder, sample inputs, parity against torch, manifest."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from recompress.atomic import atomic_dir
from recompress.checkpoint import Checkpoint
from recompress.compress.rowwise import QuantizedRows
from recompress.compress.tables import DenseTable
from recompress.data.ctr import CTRDataset
from recompress.errors import UserError
from recompress.progress import say

from . import onnx as onnx_target
from .inputs import Scorer, sample_inputs
from .manifest import MANIFEST, versions

TARGETS: dict[str, ModuleType] = {onnx_target.NAME: onnx_target}
QUANT_GRAPHS = ("gather-dequant", "dequant-gather")


def deployable(ckpt: Checkpoint, materialize: bool, quant_graph: str) -> Checkpoint:
    """The checkpoint as it will be exported (every table dense if ``materialize``), after checking that
    ``quant_graph`` can express its quantized rows. The original checkpoint is left as it is."""
    if quant_graph not in QUANT_GRAPHS:
        raise UserError(f"unknown quantized graph form {quant_graph!r}", f"choose from {', '.join(QUANT_GRAPHS)}")
    model = ckpt.model
    if materialize:
        model = copy.deepcopy(model)
        for name, t in model.tables.items():
            if not (type(t) is DenseTable and not t.stores):
                model.tables[name] = DenseTable(t.rows, t.dim, t.dense_weight())
    if quant_graph == "dequant-gather" and any(isinstance(m, QuantizedRows) and m.fmt == "int4" for m in model.modules()):
        raise UserError("the dequant-gather graph form cannot hold int4 rows at opset 18",
                        "export int4 tables with --quant-graph gather-dequant")
    return Checkpoint(model, ckpt.spec, ckpt.path)


def parity(expected: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    diff = np.abs(expected.astype(np.float64) - got.astype(np.float64))
    allowed = atol + rtol * np.abs(expected)
    return {"samples": int(len(expected)), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "atol": atol, "rtol": rtol, "passed": bool((diff <= allowed).all())}


def export_checkpoint(ckpt: Checkpoint, target: str, out: str | Path, *, data: CTRDataset | None = None,
                      samples: int = 2048, atol: float = 1e-5, rtol: float = 1e-4, source_hash: str | None = None,
                      overwrite: bool = False, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``ckpt`` to folder ``out``; raises (and writes nothing) if parity fails."""
    if target not in TARGETS:
        raise UserError(f"unknown export target {target!r}", f"choose from {', '.join(TARGETS)}")
    mod = TARGETS[target]
    opts = dict(opts or {})
    stored = ckpt
    opts["quant_graph"] = opts.get("quant_graph") or QUANT_GRAPHS[0]
    ckpt = deployable(ckpt, bool(opts.get("materialize")), opts["quant_graph"])
    inputs = sample_inputs(ckpt.model, samples, data)
    with torch.no_grad():
        expected = Scorer(ckpt.model).eval()(**inputs).numpy()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        t0 = time.perf_counter()
        say(f"exporting to {target} ...")
        manifest: dict[str, Any] = {"target": target, **mod.build(ckpt, tmp, inputs, opts)}
        manifest["export_seconds"] = round(time.perf_counter() - t0, 2)
        got = mod.run(tmp, manifest, inputs)
        manifest["parity"] = {**parity(expected, got, atol, rtol),
                              "inputs": "test split" if data is not None else "random valid ids"}
        if not manifest["parity"]["passed"]:
            p = manifest["parity"]
            raise UserError(f"{target} output differs from torch by up to {p['max_abs_diff']:.3g} "
                            f"(allowed {atol} + {rtol}*|y|) on {p['samples']} samples; nothing was written",
                            "loosen --atol/--rtol if this precision is acceptable")
        manifest["source"] = {"path": str(ckpt.path) if ckpt.path else None, "sha256": source_hash,
                              "format": ckpt.spec.provenance.get("source_format", "recompress")}
        manifest["model_spec"] = json.loads(ckpt.spec.to_json())
        manifest["table_bytes"] = {n: t.stored_bytes() for n, t in stored.model.tables.items()}
        manifest["exported_table_bytes"] = {n: t.stored_bytes() for n, t in ckpt.model.tables.items()}
        manifest["lookup_cost"] = {n: t.lookup_cost() for n, t in ckpt.model.tables.items()}
        manifest["options"] = {"materialize": bool(opts.get("materialize")),
                               "quant_graph": opts["quant_graph"]}
        manifest["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        manifest["versions"] = versions()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"parity max |diff| {manifest['parity']['max_abs_diff']:.2e} on {manifest['parity']['samples']} samples -> {out}")
    return manifest
