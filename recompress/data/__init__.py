"""Datasets: prepared folders every other command reads (CTR rows, or item sequences), the readers that
produce them (Criteo TSV, sequence files) and synthetic generators."""

from __future__ import annotations

import json
from pathlib import Path

from recompress.errors import UserError

from .ctr import META, CTRDataset
from .sequences import SequenceDataset

KINDS = {"ctr": CTRDataset, "sequences": SequenceDataset}


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
        return KINDS[kind](path)
    if path.is_file():
        raise UserError(f"{path} is a raw file, not a prepared dataset",
                        f"prepare it first: recompress data criteo|sequences {path} -o DATASET_DIR")
    raise UserError(f"{path} is not a prepared dataset (no {META})",
                    "make one with 'recompress data criteo', 'data sequences' or 'data synthetic'")


__all__ = ["CTRDataset", "SequenceDataset", "open_dataset"]
