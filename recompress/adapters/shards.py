"""Tensors split across ranks, merged offline without a process group (nothing in the files runs):

- a folder of per-rank ``torch.save`` files of a sharded state dict: ``ShardedTensor`` values (TorchRec's
  ``DistributedModelParallel``: each rank's file holds its local shards with their offsets and the global
  metadata) or ``DTensor`` values (FSDP2, TorchRec with DTensor output: the local tensor, the global shape,
  the placements and the rank's mesh coordinates); replicated tensors are taken from the first file that has
  them;
- a ``torch.distributed.checkpoint`` (DCP) folder: ``.metadata`` (read by the restricted unpickler; torch's
  own reader unpickles it with ``pickle.load``) and ``*.distcp`` files holding each chunk as a
  ``torch.save`` record at a recorded offset.

Either way every chunk is placed at its offsets in a tensor of the global size, and a tensor whose chunks
do not cover it exactly is refused, naming what is missing. Read lazily, chunks stay in their files and
the tensor is a lazy one made of them (``stored``): nothing of the size of a table is read or allocated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from recompress.errors import UserError

from . import safe_pickle, stored
from .safe_pickle import Stub

SHARDED, DTENSOR = "ShardedTensor", "DTensor"


def is_dcp(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def _place(name: str, size: tuple[int, ...], pieces: list[tuple[tuple[int, ...], torch.Tensor]], where: str) -> torch.Tensor:
    """The tensor of ``size`` made of ``pieces`` (offsets, chunk), refused unless they cover it exactly once;
    checked before the size, which the file states, is allocated."""
    if not pieces:
        raise UserError(f"{where}: no chunk of {name} was found", "copy every rank's file (or the whole DCP folder)")
    boxes = []
    for offsets, chunk in pieces:
        if len(offsets) != len(size) or chunk.dim() != len(size) or \
                any(o < 0 or o + c > s for o, c, s in zip(offsets, chunk.shape, size)):
            raise UserError(f"{where}: a chunk of {name} at {list(offsets)} of shape {list(chunk.shape)} does not fit "
                            f"its size {list(size)}", "the files are damaged or from different runs")
        boxes.append([(o, o + c) for o, c in zip(offsets, chunk.shape)])
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if all(lo < hi2 and lo2 < hi for (lo, hi), (lo2, hi2) in zip(a, b)):
                raise UserError(f"{where}: the chunks of {name} cover it twice in places",
                                "pass every rank's file of one save, and nothing else")
    total, have = math.prod(size), sum(c.numel() for _, c in pieces)
    if have != total:
        raise UserError(f"{where}: the chunks of {name} cover it with gaps ({total - have:,} of {total:,} values missing)",
                        "pass every rank's file of one save, and nothing else")
    left = stored.merged(size, pieces, where)  # every chunk left in its file: so is the tensor
    if left is not None:
        return left
    out = torch.empty(size, dtype=pieces[0][1].dtype)
    for offsets, chunk in pieces:
        out[tuple(slice(o, o + c) for o, c in zip(offsets, chunk.shape))] = stored.loaded(chunk)
    return out


def is_sharded(v: Any) -> bool:
    return isinstance(v, Stub) and type(v).__qualname__ in (SHARDED, DTENSOR)


Pieces = list[tuple[tuple[int, ...], torch.Tensor]]


def _sharded_tensor(key: str, values: list[tuple[Path, Stub]]) -> tuple[tuple[int, ...], Pieces]:
    """(global size, [(offsets, local tensor)]) of a ShardedTensor from every rank's file: each local shard
    records its offsets."""
    sizes, pieces = set(), []
    for f, st in values:
        with safe_pickle.refusals(f, "ShardedTensor"):
            local, meta = st.state[0], st.state[1]
            sizes.add(tuple(int(s) for s in meta.attr("size")))
            for shard in local:
                tensor, md = shard.attr("tensor"), shard.attr("metadata")
                if not isinstance(tensor, torch.Tensor):
                    raise safe_pickle.BadFile(f"a local shard of {key} holds a {type(tensor).__name__}, not a tensor")
                pieces.append((tuple(int(o) for o in md.attr("shard_offsets")), tensor))
    return _one_size(key, sizes), pieces


def _dtensor(key: str, values: list[tuple[Path, Stub]]) -> tuple[tuple[int, ...], Pieces]:
    """(global size, [(offsets, local tensor)]) of a DTensor from every rank's file. A DTensor records the global
    shape, its placements (Shard(d) or Replicate per mesh dimension) and the rank's coordinates on the mesh;
    Shard(d) cuts dimension d as ``torch.chunk`` does (chunks of ceil(n / k), the last ones shorter or empty),
    so a rank's offset along d is its coordinate times that chunk (an empty one's is n). Replicas are taken
    once."""
    ranks, sizes = [], set()
    for f, st in values:
        with safe_pickle.refusals(f, "DTensor"):
            spec = st.attr("_spec")
            size = tuple(int(n) for n in spec.attr("tensor_meta").args[0])  # TensorMeta(shape, stride, dtype)
            placements = list(spec.attr("placements"))
            kinds = [type(p).__qualname__ for p in placements]
            bad = [kind for kind in kinds if kind not in ("Shard", "Replicate")]
            if bad:
                raise UserError(f"{f}: {key} is a DTensor placed as {', '.join(kinds)} ({bad[0]} is not read)",
                                "save it with Shard(d) or Replicate placements (full_tensor() gathers any other)")
            dims = [int(p.attr("dim")) if kind == "Shard" else None for p, kind in zip(placements, kinds)]
            coords = [int(c) for c in spec.attr("mesh").attr("_coordinate_on_dim")]
            local = st.attr("_local_tensor")
            sharded = [d for d in dims if d is not None]
            if not isinstance(local, torch.Tensor) or len(coords) != len(dims) or min(coords, default=0) < 0 \
                    or any(not 0 <= d < len(size) for d in sharded):
                raise safe_pickle.BadFile(f"{key}'s DTensor record is inconsistent")
            if len(sharded) != len(set(sharded)):
                raise UserError(f"{f}: {key} is sharded twice along one dimension ({', '.join(kinds)})",
                                "save it with one mesh dimension per tensor dimension, or as a DCP folder")
        sizes.add(size)
        ranks.append((coords, dims, local))
    size = _one_size(key, sizes)
    if len({len(r[0]) for r in ranks}) != 1:
        raise UserError(f"{key}: the files place it on meshes of different shapes", "the files come from different runs")
    mesh = [max(r[0][i] for r in ranks) + 1 for i in range(len(ranks[0][0]))]
    pieces: dict[tuple[int, ...], torch.Tensor] = {}
    for coords, dims, local in ranks:
        offsets = [0] * len(size)
        for i, d in enumerate(dims):
            if d is not None:  # torch's own rule: chunks of ceil(n / k); one starting past the end is empty, at n
                offsets[d] = min(coords[i] * -(-size[d] // mesh[i]), size[d])
        pieces.setdefault(tuple(offsets), local)
    return size, list(pieces.items())


def _one_size(key: str, sizes: set[tuple[int, ...]]) -> tuple[int, ...]:
    if len(sizes) != 1:
        raise UserError(f"{key} has global sizes {sorted(sizes)} in different files", "the files come from different runs")
    return sizes.pop()


def has_shards(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(is_sharded(v) for v in obj.values())


def merge_rank_files(files: list[Path]) -> dict[str, Any]:
    """One state dict from per-rank files of a sharded state dict (``files`` in any order), its tensors left
    in the files (``stored``)."""
    from .torch_files import safe_torch_load
    return merge_objects([(f, safe_torch_load(f, lazy=True)) for f in files])


def merge_objects(objects: list[tuple[Path, Any]]) -> dict[str, Any]:
    """One state dict from per-rank state dicts (path, object), sharded values stitched by offset."""
    files = [f for f, _ in objects]
    for f, obj in objects:
        if not isinstance(obj, Mapping):
            raise UserError(f"{f} holds a {type(obj).__name__}, not a state dict", "pass a folder of per-rank state dicts")
    keys = list(dict.fromkeys(k for _, obj in objects for k in obj))
    out: dict[str, Any] = {}
    for k in keys:
        values = [(f, obj[k]) for f, obj in objects if k in obj]
        if is_sharded(values[0][1]):
            kind = type(values[0][1]).__qualname__
            for f, v in values:
                if not is_sharded(v) or type(v).__qualname__ != kind:
                    raise UserError(f"{f}: {k} is not a {kind} there but is in {values[0][0].name}",
                                    "the files come from different runs")
            size, pieces = (_sharded_tensor if kind == SHARDED else _dtensor)(k, values)
            out[k] = _place(k, size, pieces, f"{files[0].parent}")
        else:
            out[k] = values[0][1]
    if not any(is_sharded(obj[k]) for _, obj in objects for k in obj):
        raise UserError(f"{files[0].parent} holds {len(files)} torch files that are not shards of one state dict",
                        "pass one checkpoint file, or a folder of one save's per-rank files")
    return out


def read_dcp(path: Path) -> dict[str, Any]:
    """A DCP folder's tensors by their flattened names (nested dicts were saved as ``a.b.c``), left in the data
    files (``stored``): only the chunks' records are read."""
    meta = safe_pickle.load_pickle((path / ".metadata").read_bytes(), path / ".metadata")
    with safe_pickle.refusals(path / ".metadata", "DCP metadata"):
        return _read_dcp(path, meta)


def _read_dcp(path: Path, meta: Any) -> dict[str, Any]:
    if not isinstance(meta, Stub):
        raise safe_pickle.BadFile(f"it holds a {type(meta).__name__}, not DCP's Metadata")
    tensors, storage = meta.attr("state_dict_metadata"), meta.attr("storage_data")
    pieces: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {}
    for index, info in storage.items():
        fqn, offset = index.attr("fqn"), index.attr("offset")
        if _optional(info, "transform_descriptors"):
            raise UserError(f"{path}: {fqn} is stored with transforms {info.attr('transform_descriptors')}",
                            "save the checkpoint without extensions (compression)")
        file = path / str(info.attr("relative_path"))
        if file.parent != path or not file.is_file():
            raise UserError(f"{path}: {fqn} is in {info.attr('relative_path')!r}, which is missing",
                            "copy the whole DCP folder")
        start, length = int(info.attr("offset")), int(info.attr("length"))
        if start < 0 or length < 0 or start + length > file.stat().st_size:
            raise UserError(f"{file} ends before {fqn}'s chunk (truncated?)", "copy the DCP folder again")
        value = safe_pickle.load(safe_pickle.Window(file, start, length), f"{file} ({fqn})", lazy=True)
        if isinstance(value, torch.Tensor):
            pieces.setdefault(fqn, []).append((tuple(int(o) for o in offset) if offset is not None else (), value))
    out: dict[str, Any] = {}
    for fqn, md in tensors.items():
        if type(md).__qualname__ != "TensorStorageMetadata":
            continue  # bytes items (optimizer steps, Python objects): not weights
        size = tuple(int(s) for s in md.attr("size"))
        got = pieces.get(fqn, [])
        out[fqn] = _place(fqn, size, [(o or (0,) * len(size), t) for o, t in got], str(path))
    return out


def _optional(stub: Stub, name: str) -> Any:
    try:
        return stub.attr(name)
    except safe_pickle.BadFile:
        return None
