"""Checkpoint adapters: any supported on-disk format -> what it holds (:class:`Found`) -> Checkpoint.

Detection is by layout and never runs anything from the file: a folder format by the names of its files
(adapters with ``READS_OBJECT = False``), anything else by the keys and shapes of the object read from it:
a torch file through the restricted unpickler (``safe_pickle``), a DCP folder or a folder of per-rank
sharded files merged into one state dict (``shards``). Add a format with one module that defines ``NAME``,
``LAYOUT`` (one line for messages), ``sniff(path, obj) -> bool`` and ``describe(path, obj) -> Found``,
listed in ADAPTERS (the first whose ``sniff`` says yes reads it). A folder format whose tensors are raw files
also defines ``read(path)``: what ``describe`` then gets as ``obj`` (lazy tensors, left in the files).

``sniff`` and ``describe`` see shapes and dtypes only: ``describe`` (hence ``inspect``) reads files lazily,
every tensor a meta tensor that knows where its bytes are (``stored``), so a value read there fails on any
file, tiny test files included; values are for ``Found.build``. ``load_any`` reads everything (a big tensor stored whole and uncompressed
is mapped from its file, not copied: ``stored.materialize``); ``load_streamed`` leaves the plain tables an
adapter reports with ``FoundTable.stored`` in their files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from recompress.blockfile import Rows
from recompress.checkpoint import Checkpoint
from recompress.errors import UserError

from . import (dlrm_ref, dlrm_v3, hstu_research, native, nvidia_dlrm, recbole, sasrec_pmixer, shards, torchrec,
               torchrec_bert4rec)
from .found import Found, parse_hp
from .stored import materialize
from .torch_files import is_torch_file, safe_torch_load, top_keys

OPTIMIZER_NAMES = {"optim", "optimizer", "optimizers", "optimizer_state_dict", "optimizer_states", "optimizer_dict",
                   "opt_state_dict", "opt_state"}
ADAPTERS: list[ModuleType] = [native, nvidia_dlrm, dlrm_v3, recbole, dlrm_ref, sasrec_pmixer, hstu_research,
                               torchrec_bert4rec, torchrec]


def _object(path: Path) -> Any:
    """What a torch file, a DCP folder or a folder of per-rank torch files holds (None for anything else), its
    tensors left in the files (``stored``)."""
    if path.is_file() and not is_torch_file(path) and _head(path) == b"PK\x03\x04":
        raise UserError(f"{path} starts as a zip (torch) file but cannot be read as one", "the file is truncated or "
                        "damaged; copy it again")
    if path.is_dir() and any(path.glob("*.distcp")) and not shards.is_dcp(path):
        raise UserError(f"{path} holds DCP data files (*.distcp) but no .metadata", "copy the whole DCP folder")
    if is_torch_file(path):  # one rank's file of a sharded save is stitched too (and refused if incomplete)
        obj = safe_torch_load(path, lazy=True)
        return shards.merge_objects([(path, obj)]) if shards.has_shards(obj) else obj
    if shards.is_dcp(path):
        return shards.read_dcp(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if is_torch_file(f))
        if files:
            return shards.merge_rank_files(files)
    return None


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _single_file(path: Path) -> Path:
    """A folder (not DCP) holding exactly one torch file, e.g. a training run's: that file, which may carry
    hyper-parameters in its name."""
    if path.is_dir() and not shards.is_dcp(path) and not any(path.glob("*.distcp")):
        files = [f for f in path.iterdir() if is_torch_file(f)]
        if len(files) == 1:
            return files[0]
    return path


def _read(path: Path) -> tuple[ModuleType, Any]:
    if not path.exists():
        raise UserError(f"{path} does not exist", "check the path")
    folders = [a for a in ADAPTERS if not getattr(a, "READS_OBJECT", True)]
    for adapter in folders:  # recognized by their files' names; those with raw tensor files read them here
        if adapter.sniff(path, None):
            return adapter, adapter.read(path) if hasattr(adapter, "read") else None
    obj = _object(_single_file(path))
    for adapter in ADAPTERS:
        if adapter not in folders and obj is not None and adapter.sniff(path, obj):
            return adapter, obj
    known = "; ".join(f"{a.NAME} ({a.LAYOUT})" for a in ADAPTERS)
    if obj is not None:
        raise UserError(f"{path} is a torch file, but what it holds matches no format recompress knows "
                        f"({'it is empty' if isinstance(obj, Mapping) and not obj else 'top-level keys: ' + top_keys(obj)})",
                        f"supported: {known}")
    raise UserError(f"{path} is not a checkpoint format recompress knows", f"supported: {known}")


def detect_format(path: str | Path) -> str:
    return _read(Path(path))[0].NAME


def _found(adapter: ModuleType, path: Path, obj: Any, hp: dict[str, str] | None) -> Found:
    found = adapter.describe(_single_file(path) if getattr(adapter, "READS_OBJECT", True) else path, obj)
    if hp and not found.upstream:
        raise UserError(f"--hp does not apply to {path}: a {found.format} checkpoint records every hyper-parameter",
                        "drop --hp")
    return found.apply(hp or {})


def describe(path: str | Path, hp: dict[str, str] | None = None) -> Found:
    """What the checkpoint at ``path`` holds, with the user's ``--hp`` values applied; nothing is built, and
    large tensors are not read (only their shapes and where they are)."""
    adapter, obj = _read(Path(path))
    return _found(adapter, Path(path), obj, hp)


def load_any(path: str | Path, hp: dict[str, str] | None = None) -> Checkpoint:
    """Read a checkpoint in any supported format, validated; the source files are never modified. Its big
    tensors are private maps of their files (``stored.materialize``), and an optimizer's state saved beside
    the model is never read."""
    adapter, obj = _read(Path(path))
    ckpt = _found(adapter, Path(path), materialize(obj, skip=_optimizer), hp).checkpoint()
    ckpt.path = ckpt.path or Path(path)
    return ckpt


def _optimizer(key: Any) -> bool:
    """A key under which a training script saved its optimizer's state beside the model (dlrm's
    ``opt_state_dict``, RecBole's ``optimizer``, generative-recommenders' ``optimizer_state_dict``, TorchRec
    apps' ``optim``, DCP's flattened ``app.optim.…``): moments as large as the tables, which no adapter builds
    from, so never read. Whole names or dotted parts only: a table may be called ``optimization_goal``."""
    return isinstance(key, str) and any(part.lower() in OPTIMIZER_NAMES for part in key.split("."))


def load_streamed(path: str | Path, hp: dict[str, str] | None = None) -> tuple[Checkpoint, dict[str, Rows]]:
    """``load_any``, except that the plain tables a format stores row by row stay in their files: the model
    holds them on the meta device, and each comes with a reader of its rows by blocks (``{table: rows}``,
    what ``compress.stream`` takes). Every other tensor is read and checked, except an optimizer's state saved
    beside the model, which is left in the file."""
    adapter, obj = _read(Path(path))
    first = _found(adapter, Path(path), obj, None)  # which lazy tensors end up as plain tables
    obj = materialize(obj, {id(t.stored) for t in first.tables if t.stored is not None}, skip=_optimizer)
    found = _found(adapter, Path(path), obj, hp)  # described again over the tensors now in memory
    ckpt = found.checkpoint()
    ckpt.path = ckpt.path or Path(path)
    rows = {t.name: t.stored for t in found.tables if t.stored is not None}
    for table in rows.values():  # named in messages after every table it holds (one tensor may be saved for two)
        table.name = " and ".join(f"{name}.weight" for name, other in rows.items() if other is table)
    return ckpt, rows


__all__ = ["ADAPTERS", "Found", "describe", "detect_format", "load_any", "load_streamed", "parse_hp"]
