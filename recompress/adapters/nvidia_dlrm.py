"""NVIDIA DeepLearningExamples DLRM checkpoint folders (raw .bin tables + .pt MLPs + metadata.pt)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from recompress.checkpoint import Checkpoint
from recompress.errors import UserError

from .torch_files import dlrm_from_tensors, file_sha256, safe_torch_load

NAME = "nvidia_dlrm"


def sniff(path: Path) -> bool:
    return path.is_dir() and (path / "metadata.pt").is_file() and any(path.glob("bottom_model.embeddings.*.bin"))


def read(path: Path) -> Checkpoint:
    meta = safe_torch_load(path / "metadata.pt")
    config = meta.get("config", {}) if isinstance(meta, dict) else {}
    bins = sorted(path.glob("bottom_model.embeddings.*.bin"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    tables = []
    for b in bins:
        k = re.findall(r"\d+", b.name)[0]
        shape = tuple(safe_torch_load(path / f"embeddings.{k}.meta.pt")["shape"])
        expect = shape[0] * shape[1] * 4
        if b.stat().st_size != expect:
            raise UserError(f"{b} has {b.stat().st_size} bytes but its meta file says {list(shape)} float32 "
                            f"({expect} bytes)", "the file is truncated; copy the checkpoint again")
        tables.append(torch.from_numpy(np.fromfile(b, dtype="<f4").reshape(shape).copy()))
    bot = safe_torch_load(path / "bottom_model.mlp.pt")
    top = safe_torch_load(path / "top_model.mlp.pt")
    out = safe_torch_load(path / "top_model.out.pt")
    top_pairs = list(zip(top["weights"], top["biases"])) + [(out["weight"], out["bias"])]
    dim = int(tables[0].shape[1]) if tables else 0
    f = len(tables) + 1
    width = dim + f * (f - 1) // 2
    pad = int(top_pairs[0][0].shape[1]) - width if config.get("interaction_op", "cuda_dot") != "cat" else 0
    files = sorted(p for p in path.iterdir() if p.is_file())
    return dlrm_from_tensors(tables, list(zip(bot["weights"], bot["biases"])), top_pairs, pad=max(pad, 0),
                             source=NAME, source_hash=file_sha256(files), where=str(path),
                             extra={"upstream_config": {k: v for k, v in config.items()
                                                        if isinstance(v, (int, float, str, bool))},
                                    "source_path": str(path)})
