"""``inspect``: a description of any checkpoint or export folder, without running it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapters import detect_format, load_any
from .export.manifest import MANIFEST, read_manifest


def describe(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if (path / MANIFEST).is_file():
        m = read_manifest(path)
        spec = m["model_spec"]
        tables = [{**t, "kind": t["kind"] + (f"+{t['params']['quant']['dtype']}" if "quant" in t["params"] else ""),
                   "bytes": m["table_bytes"].get(t["name"])} for t in spec["tables"]]
        return {"format": f"{m['target']} export", "family": spec["family"], "hparams": spec["hparams"],
                "tables": tables, "embedding_bytes": sum(m["table_bytes"].values()), "history": spec["history"],
                "files": m["files"], "parity": m["parity"], "source": m["source"]}
    fmt = detect_format(path)
    ckpt = load_any(path)
    roles = {t.name: t.role for t in ckpt.spec.tables}
    tables = [{"name": n, "role": roles.get(n), "kind": t.form, "rows": t.rows, "dim": t.dim, "bytes": t.stored_bytes(),
               "params": t.config(), "lookup_cost": t.lookup_cost()}
              for n, t in ckpt.model.tables.items()]
    return {"format": fmt, "family": ckpt.spec.family, "hparams": ckpt.spec.hparams, "tables": tables,
            "embedding_bytes": sum(t["bytes"] for t in tables), "history": ckpt.spec.history,
            "metrics": ckpt.spec.metrics, "provenance": ckpt.spec.provenance}
