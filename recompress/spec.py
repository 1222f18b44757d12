"""Model and table specifications: the JSON half of a native checkpoint (weights are the other half)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

SPEC_VERSION = 1


MAX_ROWS = 1 << 40  # a table of more rows cannot be stored (2^40 rows of one fp32 value is 4 TB)
MAX_DIM = 1 << 16


@dataclass
class TableSpec:
    """One embedding table as the model sees it: ``rows`` ids in, ``dim`` floats out.

    ``kind`` names the stored form (dense, two_layer, lowrank, ...); ``params`` holds that kind's
    configuration (e.g. the hidden width of a two-layer table).
    """

    name: str
    rows: int
    dim: int
    kind: str = "dense"
    role: str = "sparse_feature"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model from its weights, plus where it came from."""

    family: str
    hparams: dict[str, Any]
    tables: list[TableSpec]
    vocab: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["spec_version"] = SPEC_VERSION
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "spec.json") -> ModelSpec:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source} is not valid JSON ({e.msg} at line {e.lineno})",
                            "the checkpoint is damaged; re-create it") from None
        if not isinstance(d, dict) or "family" not in d or "tables" not in d:
            raise UserError(f"{source} is not a recompress model spec (no 'family'/'tables')",
                            "pass a folder written by 'recompress train' or 'recompress checkpoint'")
        version = d.pop("spec_version", SPEC_VERSION)
        if version > SPEC_VERSION:
            raise UserError(f"{source} has spec version {version}, newer than this recompress ({SPEC_VERSION})",
                            "upgrade recompress")
        try:
            tables = [TableSpec(**t) for t in d.pop("tables")]
            spec = cls(tables=tables, **d)
        except TypeError as e:
            raise UserError(f"{source} has unexpected fields: {e}", "re-create the checkpoint") from None
        for t in spec.tables:
            for what, value, top in (("rows", t.rows, MAX_ROWS), ("dim", t.dim, MAX_DIM)):
                if type(value) is not int or not 1 <= value <= top:
                    raise UserError(f"{source}: table {t.name!r} has {what} {value!r}, not an integer in 1..{top:,}",
                                    "the checkpoint is damaged; re-create it")
        return spec
