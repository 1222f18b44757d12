"""Shared helpers for upstream torch-pickle checkpoints: safe loading and building our DLRM from tensors."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch

from recompress.checkpoint import Checkpoint, check_finite
from recompress.errors import UserError
from recompress.models.dlrm import DLRM, default_hparams
from recompress.spec import ModelSpec
from recompress.tables import DenseTable


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:160]
        raise UserError(f"{path} holds objects the safe loader refuses ({first})",
                        "recompress never unpickles arbitrary objects; re-save the state_dict with plain tensors") from None
    except Exception as e:  # noqa: BLE001 - any failure inside torch's unpickler (a hostile file raised
        # LookupError, OverflowError, MemoryError, TypeError, AssertionError) is the file's fault, not a crash
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{path} is not a readable torch file ({type(e).__name__}: {first})",
                        "the file is truncated, corrupt or not a checkpoint") from None


def file_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def dlrm_from_tensors(tables: list[torch.Tensor], bottom: list[tuple[torch.Tensor, torch.Tensor]],
                      top: list[tuple[torch.Tensor, torch.Tensor]], *, pad: int, source: str,
                      source_hash: str, where: str, extra: dict[str, Any]) -> Checkpoint:
    """Our DLRM from upstream tensors: linear layers as (weight [out, in], bias [out]) pairs."""
    if not tables or not bottom or not top:
        raise UserError(f"{where}: no embedding tables or MLP layers found", "is this a DLRM checkpoint?")
    dim = int(tables[0].shape[1])
    for i, t in enumerate(tables):
        if t.dim() != 2 or t.shape[1] != dim:
            raise UserError(f"{where}: table {i} has shape {list(t.shape)}, expected [rows, {dim}]",
                            "mixed-dimension tables are not supported yet")
    for name, tensor in [*[(f"table {i}", t) for i, t in enumerate(tables)],
                         *[(f"mlp {i}", w) for i, (w, _) in enumerate(bottom + top)]]:
        check_finite(name, tensor, where)
    hp = default_hparams(int(bottom[0][0].shape[1]), dim, [int(w.shape[0]) for w, _ in bottom],
                         [int(w.shape[0]) for w, _ in top])
    hp["interaction_pad"] = pad
    f = len(tables) + 1
    got = int(top[0][0].shape[1]) - pad
    if got == dim + f * (f + 1) // 2:
        hp["interaction_itself"] = True
    elif got != dim + f * (f - 1) // 2:
        raise UserError(f"{where}: top MLP input width {got + pad} matches no dot interaction of "
                        f"{len(tables)} tables at width {dim}", "only the 'dot' interaction is supported")
    model = DLRM(hp, {f"emb_{i}": DenseTable(int(t.shape[0]), dim, t.float()) for i, t in enumerate(tables)})
    linears = [m for m in [*model.bottom, *model.top] if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for lin, (w, b) in zip(linears, bottom + top):
            if tuple(w.shape) != tuple(lin.weight.shape):
                raise UserError(f"{where}: layer shape {list(w.shape)} breaks the MLP chain",
                                "the checkpoint is inconsistent")
            lin.weight.copy_(w)
            lin.bias.copy_(b)
    spec = ModelSpec(family="dlrm", hparams=hp, tables=[],
                     provenance={"source_format": source, "source_hash": source_hash,
                                 "hparam_source": {k: "shape" for k in hp}, **extra})
    from recompress.checkpoint import refresh_tables
    refresh_tables(model, spec)
    model.eval()
    return Checkpoint(model, spec)
