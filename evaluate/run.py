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
from recompress.progress import progress
from recompress.stats import predictions_record
from recompress.training import check_compatible

from .latency import ROTATE, measure
from .predictors import Inputs, OrtPredictor, Predictor, TorchPredictor

def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _dense_bytes(model: torch.nn.Module) -> int:
    table_keys = {f"tables.{k}" for k in model.tables}
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
               if not any(k.startswith(p + ".") for p in table_keys))


def test_batches(data: CTRDataset, batch: int = 4096):
    dense, sparse, label = data.arrays("test")
    for s in range(0, len(label), batch):
        yield {"dense": np.array(dense[s:s + batch], np.float32),
               "sparse": np.array(sparse[s:s + batch], np.int64)[..., None]}


def predict_test(p: Predictor, data: CTRDataset, batch: int = 4096) -> np.ndarray:
    n = data.size("test")
    out = []
    with progress(f"scoring test rows ({p.name})", n) as advance:
        for inputs in test_batches(data, batch):
            out.append(p(inputs))
            advance(len(out[-1]))
    return np.concatenate(out)


def input_pool(data: CTRDataset, batch: int, seed: int = 0) -> list[Inputs]:
    """``ROTATE`` batches of real test rows for latency measurements."""
    dense, sparse, _ = data.arrays("test")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(dense), size=(ROTATE, batch), replace=len(dense) < ROTATE * batch)
    return [{"dense": np.array(dense[np.sort(i)], np.float32), "sparse": np.array(sparse[np.sort(i)], np.int64)[..., None]}
            for i in idx]


def source_checkpoint(folder: Path, manifest: dict[str, Any]) -> Path | None:
    """The checkpoint an export came from, if it is still there (found relative to the export first, so a
    folder moved together with its checkpoint still finds it)."""
    src = manifest["source"]
    for p in (folder / src["relative"] if src.get("relative") else None, src.get("path")):
        if p and Path(p).exists():
            return Path(p)
    return None


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
        src = source_checkpoint(path, manifest)
        if src is not None:
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
    labels = np.asarray(data.arrays("test")[2])
    probs = {p.name: predict_test(p, data) for p in predictors}
    results: dict[str, Any] = {
        "artifact": {"path": str(path), "kind": kind},
        "model": {"family": spec_d["family"], "emb_dim": spec_d["hparams"].get("emb_dim"),
                  "methods": [h.get("method") for h in spec_d.get("history", [])]},
        "data": {"path": str(data.path), "fingerprint": data.fingerprint, "split": "test", "rows": int(len(labels)),
                 "synthetic": bool(data.meta.get("synthetic"))},
        "accuracy": {name: accuracy_metrics(labels, p) for name, p in probs.items()},
        "predictions": predictions_record(probs[predictors[0].name], predictors[0].name),
        "bytes": {"embeddings": int(sum(table_bytes.values())),
                  "embeddings_exported": int(sum(exported.values())) if exported else None, "dense": dense_bytes,
                  "file": _folder_bytes(path), "tables": table_bytes},
        "lookup": _lookup_summary(costs),
        "environment": {**versions(), "machine": platform.machine(), "cpus": os.cpu_count()},
    }
    if latency:
        pairs = [("torch", p.name) for p in predictors if p.name != "torch"] if ckpt is not None else []
        lat = measure(predictors, lambda b: input_pool(data, b), list(batch_sizes), repeats, pairs)
        results["latency"] = {"threads": threads, "repeats": repeats, "backends": lat["backends"],
                              "speedup_vs_torch": {k.split("/")[1]: v for k, v in lat["ratios"].items()}}
    return results
