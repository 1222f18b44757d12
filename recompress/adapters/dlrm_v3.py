"""generative-recommenders' ``dlrm_v3`` checkpoints (``dlrm_v3/checkpoint.py`` ``save_dmp_checkpoint``): a
folder ``{timestamp}/`` with ``non_sparse.ckpt`` (``dense_dict``, ``optimizer_dict``, ``sparse_tensor_keys``)
and ``sparse/``, a DCP folder of the embedding tables (``sparse_dict._embedding_collection.embeddings.
{feature}.weight``). Both parts are read (the sparse one offline, ``shards``) and described; given one part
alone, the error names the other. Not rebuilt: DlrmHSTU (STU layers, multitask heads) is not a recompress
family, and its hyper-parameters live in Python configs, not in the files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recompress.errors import UserError

from . import shards
from .found import Found, FoundTable
from .torch_files import is_torch_file, safe_torch_load

NAME = "dlrm_v3"
READS_OBJECT = False  # recognized by its files' names (both parts are read in describe)
LAYOUT = "a generative-recommenders dlrm_v3 checkpoint folder (non_sparse.ckpt + sparse/ DCP folder)"
TABLE = re.compile(r"^sparse_dict\.(?:.*\.)?embeddings\.([^.]+)\.weight$")


def _dense_part(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "dense_dict" in obj and "sparse_tensor_keys" in obj


def sniff(path: Path, obj: Any) -> bool:
    if path.is_dir() and ((path / "non_sparse.ckpt").is_file() or (path / "sparse").is_dir()):
        return True
    if path.is_file() and path.name == "non_sparse.ckpt":
        return True
    return shards.is_dcp(path) and path.name == "sparse"


def describe(path: Path, obj: Any) -> Found:
    folder = path.parent if path.is_file() or path.name == "sparse" else path
    dense, sparse = folder / "non_sparse.ckpt", folder / "sparse"
    if path != folder:
        raise UserError(f"{path} is one part of a dlrm_v3 checkpoint", f"pass the folder that holds both parts: {folder}")
    missing = [p.name for p in (dense, sparse) if not p.exists()]
    if missing:
        have = "the sparse part (sparse/)" if "sparse" not in missing else "the dense part (non_sparse.ckpt)"
        raise UserError(f"{folder} holds {have} of a dlrm_v3 checkpoint but not {', '.join(missing)}",
                        "save_dmp_checkpoint writes both into one timestamped folder; copy it whole")
    if not is_torch_file(dense) or not shards.is_dcp(sparse):
        raise UserError(f"{folder}: non_sparse.ckpt is not a torch file or sparse/ is not a DCP folder",
                        "the checkpoint is damaged")
    dense_obj, tensors = safe_torch_load(dense, lazy=True), shards.read_dcp(sparse)  # described only
    if not _dense_part(dense_obj):
        raise UserError(f"{dense} has no dense_dict/sparse_tensor_keys", "is this a dlrm_v3 non_sparse.ckpt?")
    tables = [FoundTable(m.group(1), int(t.shape[0]), int(t.shape[1]), str(t.dtype).removeprefix("torch."),
                         t.numel() * t.element_size(), parts=(k,)) for k, t in tensors.items() if (m := TABLE.match(k))]
    found = Found(NAME, "dlrm_v3 (DlrmHSTU)", tables, build=lambda hp: _refuse(folder))
    found.notes.append(f"dense part: {len(dense_obj['dense_dict'])} tensors; sparse part: {len(tensors)} tensors")
    found.notes.append("not rebuilt: DlrmHSTU is not a recompress family (its hyper-parameters are in "
                       "generative-recommenders' Python configs)")
    return found


def _refuse(folder: Path) -> Any:
    raise UserError(f"{folder} is a dlrm_v3 (DlrmHSTU) checkpoint, which recompress describes but does not rebuild",
                    "'recompress inspect' lists its tables")
