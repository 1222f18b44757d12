"""NVIDIA DeepLearningExamples DLRM checkpoint folders (raw .bin tables + .pt MLPs + metadata.pt)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from recompress.errors import UserError

from . import stored
from .dlrm_common import UpTable, dlrm_found
from .found import Found
from .torch_files import safe_torch_load

NAME = "nvidia_dlrm"
READS_OBJECT = False  # recognized by its files' names; its tables are read by ``read``
LAYOUT = "a folder with metadata.pt and bottom_model.embeddings.K.bin (NVIDIA DeepLearningExamples DLRM)"
FILES = ("bottom_model.mlp.pt", "top_model.mlp.pt", "top_model.out.pt")


def sniff(path: Path, obj: Any) -> bool:
    return path.is_dir() and (path / "metadata.pt").is_file() and any(path.glob("bottom_model.embeddings.*.bin"))


def read(path: Path) -> dict[str, tuple[str, Tensor]]:
    """Each table's number -> (its .bin file's name, its rows left in the file: a lazy tensor, ``stored``, read
    by blocks or mapped). Sizes are checked against the shape files first."""
    bins = sorted(path.glob("bottom_model.embeddings.*.bin"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    out = {}
    for b in bins:
        k = re.findall(r"\d+", b.name)[0]
        meta_file = path / f"embeddings.{k}.meta.pt"
        if not meta_file.is_file():
            raise UserError(f"{path} has {b.name} but no {meta_file.name} (its shape)", "copy the whole checkpoint folder")
        meta = safe_torch_load(meta_file)
        shape = tuple(meta["shape"]) if isinstance(meta, dict) and "shape" in meta else ()
        if len(shape) != 2 or not all(isinstance(n, int) and n >= 1 for n in shape):
            raise UserError(f"{meta_file} does not give a table's shape (rows, width >= 1): "
                            f"{meta.get('shape') if isinstance(meta, dict) else type(meta).__name__}",
                            "the checkpoint is damaged; copy it again")
        expect = shape[0] * shape[1] * 4
        if b.stat().st_size != expect:
            raise UserError(f"{b} has {b.stat().st_size} bytes but its meta file says {list(shape)} float32 "
                            f"({expect} bytes)", "the file is truncated; copy the checkpoint again")
        span = stored.Span(b, 0, torch.float32, shape, (shape[1], 1))
        out[k] = (b.name, stored.lazy(stored.Stored(shape, torch.float32, [((0, 0), span)], str(b))))
    return out


def describe(path: Path, obj: dict[str, tuple[str, Tensor]]) -> Found:
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}", "copy the whole checkpoint folder")
    meta = safe_torch_load(path / "metadata.pt")
    config = meta.get("config", {}) if isinstance(meta, dict) else {}
    if config.get("interaction_op", "cuda_dot") == "cat":
        raise UserError(f"{path} uses the 'cat' interaction", "only the dot interaction is supported")
    tables = [UpTable(f"emb_{k}", "dense", {"weight": weight}, (name,)) for k, (name, weight) in obj.items()]
    bot = safe_torch_load(path / "bottom_model.mlp.pt")
    top = safe_torch_load(path / "top_model.mlp.pt")
    out = safe_torch_load(path / "top_model.out.pt")
    top_pairs = list(zip(top["weights"], top["biases"])) + [(out["weight"], out["bias"])]
    scalars = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
    found = dlrm_found(NAME, tables, list(zip(bot["weights"], bot["biases"])), top_pairs, where=str(path))
    found.provenance["upstream_config"] = scalars
    found.notes.append(f"upstream config: {scalars}")
    return found
