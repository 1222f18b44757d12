"""Checkpoint adapters: any supported on-disk format -> what it holds (:class:`Found`) -> Checkpoint.

Detection is by layout and never runs anything from the file: a folder by the names of its files, a torch
file by the keys and shapes of the object the restricted unpickler (``safe_pickle``) reads from it.
Add a format with one module that defines ``NAME``, ``LAYOUT`` (one line for messages), ``sniff(path,
obj) -> bool`` (``obj``: the torch file's object, or None for a folder or another file) and ``describe(path,
obj) -> Found``, listed in ADAPTERS (the first whose ``sniff`` says yes reads it).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from recompress.checkpoint import Checkpoint
from recompress.errors import UserError

from . import dlrm_ref, native, nvidia_dlrm, recbole, sasrec_pmixer
from .found import Found, parse_hp
from .torch_files import is_torch_file, safe_torch_load, top_keys

ADAPTERS: list[ModuleType] = [native, nvidia_dlrm, recbole, dlrm_ref, sasrec_pmixer]


def _read(path: Path) -> tuple[ModuleType, Any]:
    if not path.exists():
        raise UserError(f"{path} does not exist", "check the path")
    obj = safe_torch_load(path) if is_torch_file(path) else None
    for adapter in ADAPTERS:
        if adapter.sniff(path, obj):
            return adapter, obj
    known = "; ".join(f"{a.NAME} ({a.LAYOUT})" for a in ADAPTERS)
    if obj is not None:
        raise UserError(f"{path} is a torch file, but its contents match no format recompress knows "
                        f"(top-level keys: {top_keys(obj)})", f"supported: {known}")
    raise UserError(f"{path} is not a checkpoint format recompress knows", f"supported: {known}")


def detect_format(path: str | Path) -> str:
    return _read(Path(path))[0].NAME


def describe(path: str | Path, hp: dict[str, str] | None = None) -> Found:
    """What the checkpoint at ``path`` holds, with the user's ``--hp`` values applied; nothing is built."""
    adapter, obj = _read(Path(path))
    found = adapter.describe(Path(path), obj)
    if hp and not found.upstream:
        raise UserError(f"--hp does not apply to {path}: a {found.format} checkpoint records every hyper-parameter",
                        "drop --hp")
    return found.apply(hp or {})


def load_any(path: str | Path, hp: dict[str, str] | None = None) -> Checkpoint:
    """Read a checkpoint in any supported format, validated; the source files are never modified."""
    ckpt = describe(path, hp).checkpoint()
    ckpt.path = ckpt.path or Path(path)
    return ckpt


__all__ = ["ADAPTERS", "Found", "describe", "detect_format", "load_any", "parse_hp"]
