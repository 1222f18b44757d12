"""``evaluate``: one checkpoint or export folder + a prepared dataset -> a results dict (JSON-ready)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recompress.adapters import load_any
from recompress.checkpoint import Checkpoint
from recompress.data.ctr import CTRDataset
from recompress.errors import UserError
from recompress.export.manifest import MANIFEST, read_manifest, versions
from recompress.metrics import accuracy_metrics
from recompress.training import check_compatible

from .latency import measure, ratios
from .predictors import OrtPredictor, Predictor, TorchPredictor


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _dense_bytes(model: torch.nn.Module) -> int:
    table_keys = {f"tables.{k}" for k in model.tables}
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
               if not any(k.startswith(p + ".") for p in table_keys))


def _accuracy(p: Predictor, data: CTRDataset, batch: int = 4096) -> dict[str, Any]:
    dense, sparse, label = data.arrays("test")
    probs = np.concatenate([p(np.array(dense[s:s + batch], np.float32),
                              np.array(sparse[s:s + batch], np.int64)[..., None])
                            for s in range(0, len(label), batch)])
    return accuracy_metrics(np.asarray(label), probs)


def _lookup_summary(costs: dict[str, dict[str, float]] | None) -> dict[str, Any] | None:
    """Per-table lookup costs and their sum for one sample with one id per table."""
    if not costs:
        return None
    keys = ("bytes_useful", "bytes_read_gpu", "bytes_read_cpu", "flops")
    return {"per_sample": {k: round(sum(c[k] for c in costs.values()), 2) for k in keys}, "tables": costs}


def evaluate(path: str | Path, data: CTRDataset, *, batch_sizes: list[int] = (1, 64, 512), threads: int = 2,
             repeats: int = 200, latency: bool = True) -> dict[str, Any]:
    """Accuracy (test split), bytes and latency for a checkpoint (torch) or an ONNX export (ORT + torch)."""
    path = Path(path)
    predictors: list[Predictor] = []
    ckpt: Checkpoint | None = None
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        if manifest["target"] != "onnx":
            raise UserError(f"{path} is a {manifest['target']} export, which needs a GPU to run",
                            "evaluate it on a GPU machine")
        predictors.append(OrtPredictor(path / manifest["file"], threads))
        src = manifest["source"].get("path")
        if src and Path(src).exists():
            ckpt = load_any(src)
        kind, spec_d = "onnx", manifest["model_spec"]
        table_bytes = manifest["table_bytes"]
        exported = manifest.get("exported_table_bytes")
        costs = manifest.get("lookup_cost")
        dense_bytes = _dense_bytes(ckpt.model) if ckpt else None
    else:
        ckpt = load_any(path)
        kind, spec_d = "checkpoint", None
        table_bytes = {n: t.stored_bytes() for n, t in ckpt.model.tables.items()}
        exported = None
        costs = {n: t.lookup_cost() for n, t in ckpt.model.tables.items()}
        dense_bytes = _dense_bytes(ckpt.model)
    if ckpt is not None:
        check_compatible(ckpt.model, data)
        predictors.append(TorchPredictor(ckpt.model, threads))
        spec_d = spec_d or {"family": ckpt.spec.family, "hparams": ckpt.spec.hparams, "history": ckpt.spec.history}
    elif len(data.table_rows) != len(table_bytes):
        raise UserError(f"the dataset has {len(data.table_rows)} sparse features, the model {len(table_bytes)}",
                        "use the dataset the model was trained on")
    else:
        for t, rows in zip(spec_d["tables"], data.table_rows):
            if rows > t["rows"]:
                raise UserError(f"dataset ids for table {t['name']} go up to {rows - 1} but it has {t['rows']} rows "
                                "(ids out of range)", "use the dataset the model was trained on")
    results: dict[str, Any] = {
        "artifact": {"path": str(path), "kind": kind},
        "model": {"family": spec_d["family"], "emb_dim": spec_d["hparams"].get("emb_dim"),
                  "methods": [h.get("method") for h in spec_d.get("history", [])]},
        "data": {"path": str(data.path), "fingerprint": data.fingerprint, "split": "test",
                 "synthetic": bool(data.meta.get("synthetic"))},
        "accuracy": {p.name: _accuracy(p, data) for p in predictors},
        "bytes": {"embeddings": int(sum(table_bytes.values())),
                  "embeddings_exported": int(sum(exported.values())) if exported else None, "dense": dense_bytes, "file": _folder_bytes(path),
                  "tables": table_bytes},
        "lookup": _lookup_summary(costs),
        "environment": {**versions(), "machine": platform.machine(), "cpus": os.cpu_count()},
    }
    if latency:
        lat = measure(predictors, data, list(batch_sizes), repeats)
        results["latency"] = {"threads": threads, "repeats": repeats, "backends": lat,
                              "speedup_vs_torch": ratios(lat)}
    return results
