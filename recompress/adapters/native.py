"""recompress's own format (spec.json + weights.safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recompress.checkpoint import is_native, load_checkpoint, model_shell, read_spec

from .found import Found, FoundTable

NAME = "recompress"
READS_OBJECT = False  # recognized by its files' names
LAYOUT = "a folder with spec.json and weights.safetensors"


def sniff(path: Path, obj: Any) -> bool:
    return is_native(path)


def describe(path: Path, obj: Any) -> Found:
    spec, _ = read_spec(path)
    model = model_shell(spec)
    roles = {t.name: t.role for t in spec.tables}
    tables = [FoundTable(n, t.rows, t.dim, "float32" if "+" not in t.form else t.form.split("+")[1], t.stored_bytes(),
                         t.form, roles.get(n, "sparse_feature")) for n, t in model.tables.items()]
    found = Found(NAME, spec.family, tables, build=lambda hp: load_checkpoint(path), upstream=False)
    for k, v in spec.hparams.items():
        found.set(k, v, "checkpoint")
    return found
