"""Shared helpers for upstream torch files: recognizing them, loading them safely, cleaning their keys."""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from recompress.errors import UserError

from . import safe_pickle

LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save before the zip format (torch < 1.6)
WRAPPERS = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, TorchRec's DLRMTrain and others


def is_torch_file(path: Path) -> bool:
    """A ``torch.save`` file: a zip with a data.pkl record, or the legacy pickle stream."""
    if not path.is_file():
        return False
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                return any(n.endswith("data.pkl") for n in z.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    with open(path, "rb") as f:
        return f.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC


def safe_torch_load(path: Path, *, lazy: bool = False) -> Any:
    """A torch file's object without running anything: zip files (torch >= 1.6) through recompress's
    restricted unpickler (``safe_pickle``: tensors, containers, numpy values, inert stubs; ``lazy``: large
    tensors left in the file, see ``stored``), legacy files through ``torch.load(weights_only=True)``; both
    refuse a global outside their allow-list by name."""
    if zipfile.is_zipfile(path):
        return safe_pickle.load(path, lazy=lazy)
    with safe_pickle.refusals(path, "torch file"):  # any failure in torch's unpickler is the file's fault
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)\.(\w+)", str(e))
            if found:
                raise safe_pickle.UnsafeGlobal(found.group(1), found.group(2)) from None
            first = str(e).strip().splitlines()[-1][:160]
            raise UserError(f"{path} holds objects the safe loader refuses ({first})", "recompress never unpickles "
                            "arbitrary objects; re-save the state_dict with plain tensors") from None


def clean_keys(state: Mapping[str, Any], drop: tuple[str, ...] = ("total_ops", "total_params", "num_batches_tracked")
               ) -> dict[str, Any]:
    """A state dict's tensors under canonical keys: wrapper prefixes (``module.``, ``_orig_mod.``,
    ``model.``, also DDP's mid-key ``.module.``) removed, profiler counters and batch-norm counters dropped."""
    out = {}
    for k, v in state.items():
        key = str(k)
        stripped = True
        while stripped:
            stripped = False
            for p in WRAPPERS:
                if key.startswith(p):
                    key, stripped = key[len(p):], True
        key = key.replace(".module.", ".")
        if key.rsplit(".", 1)[-1] in drop:
            continue
        out[key] = v
    return out


def state_dict_of(obj: Any, *keys: str) -> dict[str, torch.Tensor] | None:
    """The tensors of ``obj[key]`` for the first of ``keys`` it has (or of ``obj`` itself when ``keys`` is
    empty), if that is a mapping whose values are mostly tensors."""
    for key in keys or (None,):
        sd = obj if key is None else (obj.get(key) if isinstance(obj, Mapping) else None)
        if isinstance(sd, Mapping) and sd and sum(isinstance(v, torch.Tensor) for v in sd.values()) >= len(sd) / 2:
            return clean_keys({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
    return None


def top_keys(obj: Any, limit: int = 8) -> str:
    if not isinstance(obj, Mapping):
        return type(obj).__name__
    keys = [str(k) for k in obj]
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def file_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def indexed(state: Mapping[str, Any], prefix: str, suffix: str) -> list[tuple[int, str]]:
    """``(i, key)`` for keys ``{prefix}.{i}{suffix}``, by i."""
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+){re.escape(suffix)}$")
    return sorted((int(m.group(1)), k) for k in state if (m := pat.match(k)))
