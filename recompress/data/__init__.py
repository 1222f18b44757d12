"""Datasets: prepared folders every other command reads (CTR rows, or item sequences), the readers that
produce them (Criteo TSV, sequence files) and synthetic generators."""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recompress.errors import UserError

if TYPE_CHECKING:
    from .ctr import CTRDataset
    from .sequences import SequenceDataset

META = "meta.json"
KINDS = {"ctr": ("ctr", "CTRDataset"), "sequences": ("sequences", "SequenceDataset")}  # imported when opened: the
# CLI reads this package's small modules (sequence_layouts) at start-up, before numpy is needed


def __getattr__(name: str) -> Any:
    for module, cls in KINDS.values():
        if name == cls:
            return getattr(import_module(f"{__name__}.{module}"), cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_dataset(path: str | Path) -> CTRDataset | SequenceDataset:
    """Open a prepared dataset folder (see ``recompress data --help`` to make one)."""
    path = Path(path)
    if path.is_dir() and (path / META).is_file():
        try:
            kind = json.loads((path / META).read_text()).get("kind", "ctr")
        except json.JSONDecodeError:
            raise UserError(f"{path / META} is not valid JSON", "prepare the dataset again") from None
        if kind not in KINDS:
            raise UserError(f"{path} holds a dataset of unknown kind {kind!r}", "prepare it with this recompress")
        module, cls = KINDS[kind]
        return getattr(import_module(f"{__name__}.{module}"), cls)(path)
    if path.is_file():
        raise UserError(f"{path} is a raw file, not a prepared dataset",
                        f"prepare it first: recompress data criteo|sequences {path} -o DATASET_DIR")
    raise UserError(f"{path} is not a prepared dataset (no {META})",
                    "make one with 'recompress data criteo', 'data sequences' or 'data synthetic'")


__all__ = ["CTRDataset", "SequenceDataset", "open_dataset"]
