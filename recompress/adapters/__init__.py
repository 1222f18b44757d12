"""Checkpoint adapters: any supported on-disk format -> Checkpoint (model + ModelSpec).

Add a format by writing a module with ``NAME``, ``sniff(path) -> bool`` and ``read(path) -> Checkpoint``
and listing it in ADAPTERS. Upstream pickles are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from recompress.checkpoint import Checkpoint
from recompress.errors import UserError

from . import dlrm_ref, native, nvidia_dlrm

ADAPTERS: list[ModuleType] = [native, nvidia_dlrm, dlrm_ref]


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist", "check the path")
    for adapter in ADAPTERS:
        if adapter.sniff(path):
            return adapter.NAME
    raise UserError(f"{path} is not a checkpoint format recompress knows",
                    f"supported: {', '.join(a.NAME for a in ADAPTERS)} (see 'recompress inspect --help')")


def load_any(path: str | Path) -> Checkpoint:
    """Read a checkpoint in any supported format, validated; the source files are never modified."""
    name = detect_format(path)
    adapter = next(a for a in ADAPTERS if a.NAME == name)
    return adapter.read(Path(path))
