"""TorchRec state dicts: ``EmbeddingBagCollection`` tables (``...embedding_bags.{table}.weight``: float, or
uint8 rows of its quantized inference collection, see ``tables/tbe_rows``), plain or
merged from per-rank ``ShardedTensor`` files or a DCP folder (``shards``), with TorchRec's ``DLRM``
(``torchrec/models/dlrm.py``: ``dense_arch.model._mlp.{j}._linear``, ``over_arch.model.0._mlp.{j}._linear``
and ``over_arch.model.1``) rebuilt as recompress's DLRM. TorchRec orders the pairwise dots as
``triu_indices(F + 1, F + 1, offset=1)`` (row-major, dense feature first); recompress orders them as dlrm
does (lower triangle), so the over-arch's first layer gets its columns permuted: the same function.
Sparse features follow the tables' order in the state dict (one feature per table). A collection without
its model (or with an ``EmbeddingCollection``) is described, not built; DCN and projection interactions
are refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from recompress.errors import UserError

from recompress.tables import tbe_rows

from .dlrm_common import UpTable, dlrm_found
from .found import Found, FoundTable
from .torch_files import indexed, state_dict_of

NAME = "torchrec"
LAYOUT = ("a TorchRec state dict (EmbeddingBagCollection tables, DLRM's dense_arch/over_arch), also as per-rank "
          "ShardedTensor files or a DCP folder")
BAG = re.compile(r"^(.*\.)?embedding_bags\.([^.]+)\.weight$")
SEQ = re.compile(r"^(.*\.)?embeddings\.([^.]+)\.weight$")
MODEL_KEYS = ("model_state_dict", "state_dict", "model")


def _state(obj: Any) -> dict[str, torch.Tensor] | None:
    return state_dict_of(obj, *MODEL_KEYS) or state_dict_of(obj)


def sniff(path: Path, obj: Any) -> bool:
    sd = _state(obj) if obj is not None else None
    return bool(sd) and any(BAG.match(k) or SEQ.match(k) for k in sd) and not any(k.startswith("sparse_dict.") for k in sd)


def triu_permutation(tables: int) -> list[int]:
    """For each pairwise dot in recompress's (dlrm's) order, its column in TorchRec's ``triu_indices`` order."""
    f = tables + 1
    torchrec = {(a, b): k for k, (a, b) in enumerate((a, b) for a in range(f) for b in range(a + 1, f))}
    return [torchrec[(j, i)] for i in range(f) for j in range(i)]


def describe(path: Path, obj: Any) -> Found:
    sd = _state(obj)
    assert sd is not None
    bags = [(m.group(2), k) for k in sd if (m := BAG.match(k))]
    seqs = [(m.group(2), k) for k in sd if (m := SEQ.match(k)) and not BAG.match(k)]
    if any(k.startswith("inter_arch.crossnet.") for k in sd):
        raise UserError(f"{path} is TorchRec's DLRM_DCN (a cross-net interaction)", "recompress rebuilds the dot "
                        "interaction (torchrec.models.dlrm.DLRM) only")
    if any(k.startswith("inter_arch.interaction_branch") for k in sd):
        raise UserError(f"{path} is TorchRec's DLRM_Projection", "recompress rebuilds the dot interaction only")
    dense = [(sd[k], sd[k[:-len("weight")] + "bias"]) for _, k in indexed(sd, "dense_arch.model._mlp", "._linear.weight")]
    over = [(sd[k], sd[k[:-len("weight")] + "bias"]) for _, k in indexed(sd, "over_arch.model.0._mlp", "._linear.weight")]
    if "over_arch.model.1.weight" in sd:
        over.append((sd["over_arch.model.1.weight"], sd["over_arch.model.1.bias"]))
    if bags and dense and over and not seqs:
        d = int(dense[-1][0].shape[0])
        fmts = {name: _quantized(name, sd[k], d, path) for name, k in bags if sd[k].dtype == torch.uint8}
        ambiguous = [n for n, f in fmts.items() if len(f) > 1]
        tables = [_up_table(name, sd[k], k, d, fmts.get(name)) for name, k in bags]
        perm = triu_permutation(len(tables))
        if over[0][0].shape[1] != d + len(perm):
            raise UserError(f"{path}: over_arch input width {over[0][0].shape[1]} is not D + F + F(F-1)/2 = "
                            f"{d + len(perm)} for {len(tables)} tables of width {d}", "the state dict is inconsistent")
        columns = [*range(d), *(d + p for p in perm)]
        found = dlrm_found(NAME, tables, dense, over, where=str(path), top_columns=columns)
        found.notes.append("the over-arch's first layer is read with its pairwise-dot columns in dlrm's order")
        if ambiguous:  # the rows decode at build time, once the format is known
            found.build = lambda hp: _build_quantized(hp, bags, sd, d, dense, over, path, columns)
            found.need("quantized_rows", ("int8", "int4"), f"tables {', '.join(ambiguous)} are uint8 rows of width {d}, "
                       "which int8 and int4 pad to the same bytes; TorchRec keeps the type in its configs")
        return found
    found = Found(NAME, "none", [FoundTable.of(name, sd[k], k) for name, k in bags + seqs],
                  build=lambda hp: _no_model(path))
    found.notes.append("a TorchRec embedding collection without the DLRM around it (or with sequence embeddings): "
                       "its tables are listed; recompress builds TorchRec's DLRM only")
    return found


def _quantized(name: str, w: torch.Tensor, dim: int, path: Path) -> list[str]:
    fmts = tbe_rows.formats_of(int(w.shape[1]), dim)
    if not fmts:
        raise UserError(f"{path}: table {name} is uint8 [{w.shape[0]}, {w.shape[1]}], which is no TBE row layout of "
                        f"width {dim} (int8: {tbe_rows.row_width('int8', dim)} B, int4: {tbe_rows.row_width('int4', dim)} B)",
                        "recompress reads TorchRec's int8 and int4 tables")
    return fmts


def _up_table(name: str, w: torch.Tensor, key: str, dim: int, fmts: list[str] | None, fmt: str | None = None) -> UpTable:
    """A float table, or a quantized one in TorchRec's fused TBE rows (uint8; ``recompress.tables.tbe_rows``)."""
    if not fmts:
        return UpTable(name, "dense", {"weight": w}, (key,))
    fmt = fmt or fmts[0]
    return UpTable(name, fmt, tbe_rows.unpack(w, dim, fmt), (key,), dim=dim)


def _build_quantized(hp: dict[str, Any], bags: list[tuple[str, str]], sd: dict[str, torch.Tensor], dim: int,
                     dense: list[Any], over: list[Any], path: Path, columns: list[int]) -> Any:
    fmt = hp["quantized_rows"]
    tables = [_up_table(name, sd[k], k, dim, tbe_rows.formats_of(int(sd[k].shape[1]), dim) if sd[k].dtype == torch.uint8
                        else None, fmt) for name, k in bags]
    return dlrm_found(NAME, tables, dense, over, where=str(path), top_columns=columns).build(hp)


def _no_model(path: Path) -> Any:
    raise UserError(f"{path} holds TorchRec embedding tables but no model recompress can rebuild around them",
                    "save the whole torchrec.models.dlrm.DLRM (DLRMTrain) state dict; 'recompress inspect' lists the tables")
