"""``evaluate``: one checkpoint or export folder + a prepared dataset -> a results dict (JSON-ready).

Everything model-specific comes from the family: how the test split is laid out (and under which
protocol), its metrics, its latency inputs. Accuracy is computed for every backend on the same rows.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from recompress.export.manifest import MANIFEST, checkpoint_in, is_export, read_manifest, versions
from recompress.export.onnx import PRECISIONS as ORT_PRECISIONS

from recompress.adapters import detect_format, load_any
from recompress.adapters.native import NAME as NATIVE
from recompress.checkpoint import Checkpoint
from recompress.errors import UserError
from recompress.evaluation import Scored, score
from recompress.models import family_of
from recompress.progress import say
from recompress.spec import ModelSpec
from recompress.stats import paired_delta, predictions_record

from .latency import ROTATE, measure
from .predictors import OrtPredictor, Predictor, TorchPredictor, TrtPredictor


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _dense_bytes(model: torch.nn.Module) -> int:
    table_keys = {f"tables.{k}" for k in model.tables}
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
               if not any(k.startswith(p + ".") for p in table_keys))


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


def evaluate(path: str | Path, data: Any, *, batch_sizes: list[int] | None = None, threads: int = 2,
             repeats: int = 200, latency: bool = True, protocol: str | None = None, negatives: int = 100,
             users: int | None = None, candidates: int | None = None, attention: str | None = None,
             hp: dict[str, str] | None = None, split: str = "test") -> dict[str, Any]:
    """Accuracy (test split), bytes and latency for a checkpoint (torch) or an ONNX export (ORT + torch); latency at
    ``batch_sizes`` (default: the family's)."""
    path = Path(path)
    predictors: list[Predictor] = []
    ckpt: Checkpoint | None = None
    upstream = checkpoint_in(path, hp)  # e.g. --target dlrm: a file the adapters read
    if upstream is not None:
        path, hp = upstream
    manifest = read_manifest(path) if is_export(path) else None
    if manifest is not None:
        if manifest["target"] == "trt":  # the engine, and ONNX Runtime on the graph it was built from
            predictors.append(TrtPredictor(path / manifest["file"], manifest))
            if manifest.get("precision", "fp32") in ORT_PRECISIONS:
                predictors.append(OrtPredictor(path / manifest["onnx"], threads))
        else:
            predictors.append(OrtPredictor(path / manifest["file"], threads))
        src = source_checkpoint(path, manifest)
        if src is not None:  # an upstream file with the --hp values it was exported with (a recompress checkpoint
            # keeps those of the file it was made from in its provenance, and takes none)
            given = manifest["model_spec"].get("provenance", {}).get("hparam_overrides")
            ckpt = load_any(src, given if detect_format(src) != NATIVE else None)
        kind = manifest["target"]
        spec = ModelSpec.from_json(json.dumps(manifest["model_spec"]), str(path / MANIFEST))
        table_bytes = manifest["table_bytes"]
        exported = manifest.get("exported_table_bytes")
        costs = manifest.get("lookup_cost")
    else:
        ckpt = load_any(path, hp)
        kind, spec = "checkpoint", ckpt.spec
        table_bytes = {n: t.stored_bytes() for n, t in ckpt.model.tables.items()}
        exported = None
        costs = {n: t.lookup_cost() for n, t in ckpt.model.tables.items()}
    family = family_of(spec)
    family.check(spec, data)
    batch_sizes = list(batch_sizes or family.latency_batch_sizes)
    if latency:
        for b in batch_sizes:
            family.check_latency(spec.hparams, data, b)
    if ckpt is not None:
        predictors.append(TorchPredictor(ckpt.model, threads, family=family, attention=attention))
    protocol = protocol or family.default_protocol(data)
    if kind != "checkpoint" and manifest["options"].get("scoring") == "naive" and protocol == "full":
        raise UserError(f"{path} is a naive graph, which runs the history once per candidate: full ranking would "
                        f"run {data.num_items + 1:,} histories per test user",
                        "evaluate it with --protocol sampled --users N, or evaluate the model's amortized export "
                        "where it has one")
    scored: dict[str, Scored] = {p.name: score(family, p, spec.hparams, data, split, protocol, negatives=negatives,
                                              users=users, desc=f"scoring {split} ({p.name}, {protocol})")
                                 for p in predictors}
    first = scored[predictors[0].name]
    results: dict[str, Any] = {
        "artifact": {"path": str(path), "kind": kind},
        "model": {"family": spec.family, "emb_dim": spec.hparams.get("emb_dim", spec.hparams.get("dim")),
                  "methods": [h.get("method") for h in spec.history]},
        "data": {"path": str(data.path), "fingerprint": data.fingerprint, "split": split, "rows": len(first.values),
                 "protocol": protocol, "negatives": negatives if protocol == "sampled" else None, "users": users,
                 "synthetic": bool(data.meta.get("synthetic"))},
        "primary": family.primary,
        "accuracy": {name: s.metrics(family.metrics) for name, s in scored.items()},
        "predictions": predictions_record(first.values, first.kind, predictors[0].name, first.truth),
        "export_vs_checkpoint": (paired_delta(family.primary, first.truth, first.values, scored["torch"].values)
                                 if len(scored) > 1 and "torch" in scored else None),
        "engine_vs_onnxruntime": (paired_delta(family.primary, first.truth, scored["tensorrt"].values,
                                               scored["onnxruntime"].values)
                                  if {"tensorrt", "onnxruntime"} <= set(scored) else None),
        "bytes": {"embeddings": int(sum(table_bytes.values())),
                  "embeddings_exported": int(sum(exported.values())) if exported else None,
                  "dense": _dense_bytes(ckpt.model) if ckpt is not None else None,
                  "file": _folder_bytes(path), "tables": table_bytes},
        "lookup": _lookup_summary(costs),
        "environment": {**versions(), "machine": platform.machine(), "cpus": os.cpu_count()},
    }
    if latency:
        pairs = [("torch", p.name) for p in predictors if p.name != "torch"] if ckpt is not None else []
        pool = lambda b: family.latency_inputs(spec.hparams, data, b, ROTATE, candidates=candidates)
        looped = [p.name for p in predictors if getattr(p, "loops_rows", lambda x: False)(pool(2)[0])]
        if looped:
            say(f"[yellow]note:[/yellow] {', '.join(looped)} takes candidates shared by the batch ([1, M]) and these "
                "requests bring each history its own, so it runs them one row at a time (export with "
                "--candidates-layout per-row to batch them)")
        lat = measure(predictors, pool, list(batch_sizes), repeats, pairs)
        results["latency"] = {"threads": threads, "repeats": repeats, "candidates": candidates, "one_row_at_a_time": looped,
                              "backends": lat["backends"],
                              "speedup_vs_torch": {k.split("/")[1]: v for k, v in lat["ratios"].items()}}
    return results


def test_truth(results: dict[str, Any], data: Any) -> np.ndarray | None:
    """The labels a ``scores`` record is paired on (ranks records carry their own truth)."""
    split = results["data"].get("split", "test")
    return np.asarray(data.arrays(split)[2]) if results["predictions"]["kind"] == "scores" else None
