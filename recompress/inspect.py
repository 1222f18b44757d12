"""``inspect``: a description of any checkpoint or export folder, without running anything from it: the
format, family, tables (rows, width, dtype, bytes, kind), every hyper-parameter with where it came from,
and what the user must still supply with ``--hp``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapters import describe as describe_checkpoint
from .export.manifest import checkpoint_in, is_export, read_manifest


def describe(source: str | Path, hp: dict[str, str] | None = None) -> dict[str, Any]:
    path = Path(source)
    upstream = checkpoint_in(path, hp)  # an export in an upstream layout: describe the file it wrote
    if upstream is not None:
        return describe(*upstream)
    if is_export(path):
        m = read_manifest(path)
        spec = m["model_spec"]
        tables = [{**t, "kind": t["kind"] + (f"+{t['params']['quant']['dtype']}" if "quant" in t["params"] else ""),
                   "dtype": t["params"]["quant"]["dtype"] if "quant" in t["params"] else "float32",
                   "bytes": m["table_bytes"].get(t["name"])} for t in spec["tables"]]
        return {"format": f"{m['target']} export", "kind": "export", "family": spec["family"],
                "hparams": spec["hparams"], "hparam_source": {k: "source checkpoint" for k in spec["hparams"]},
                "missing": [], "tables": tables, "embedding_bytes": sum(m["table_bytes"].values()),
                "history": spec["history"], "files": m["files"], "parity": m["parity"], "source": m["source"],
                "notes": _export_notes(m)}
    found = describe_checkpoint(path, hp)
    info: dict[str, Any] = {
        "format": found.format, "family": found.family, "hparams": found.hparams, "hparam_source": found.sources,
        "missing": [{"hp": k, "values": list(v), "why": found.why_missing[k]} for k, v in found.missing.items()],
        "tables": [{"name": t.name, "role": t.role, "kind": t.kind, "rows": t.rows, "dim": t.dim, "dtype": t.dtype,
                    "bytes": t.bytes, "parts": list(t.parts)} for t in found.tables],
        "notes": found.notes}
    if not found.upstream:  # our own checkpoint: validated in full, with its history
        ckpt = found.checkpoint()
        for t, (name, table) in zip(info["tables"], ckpt.model.tables.items()):
            t.update(params=table.config(), lookup_cost=table.lookup_cost(), parts=[name])
        info.update(history=ckpt.spec.history, metrics=ckpt.spec.metrics, provenance=ckpt.spec.provenance)
    info["embedding_bytes"] = sum(t["bytes"] for t in info["tables"])
    info.setdefault("history", [])
    return info


def _export_notes(m: dict[str, Any]) -> list[str]:
    """What an export's manifest says of its graph: dense layers, precision, parity, source."""
    opts, p = m.get("options") or {}, m["parity"]
    dense = opts.get("dense") or "fp32"
    parity = (f"max |diff| {p['max_abs_diff']:.2e} on {p['samples']} samples ({p.get('runtime') or m['target']})"
              if p.get("passed") else f"not checked ({p.get('skipped')})")
    source = (m.get("source") or {}).get("path")
    return [f"dense layers {dense}" + (" (ONNX Runtime's dynamic quantization)" if dense == "int8" else "")
            + f"; compute precision {opts.get('precision') or 'fp32'}",
            f"parity with the source checkpoint: {parity}",
            f"exported from {source}" if source else "exported from a checkpoint in memory (no file recorded)"]
