"""Tensors left in their files. Read lazily, a tensor of a torch zip file, of per-rank shard files or of a
DCP folder becomes a meta tensor (shape and dtype, no memory) that carries where its bytes are: a
:class:`Stored`, the pieces (``Span``) that make it up at their offsets. ``load()`` reads it whole; a 2-D
floating-point tensor whose every piece is stored row by row also reads by row blocks (``stored[a:b]``, the
:class:`~recompress.blockfile.Rows` the streamed compression takes), so that an embedding table never has to
be in memory whole; ``verify()`` then checks what was read against the zip records' CRC-32, as reading the
records whole would. ``materialize`` reads every lazy tensor of an object except those a caller streams.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from recompress.blockfile import (MAP_BYTES, PrivateMap, Scratch, check_finite, nonfinite, nonfinite_error, read_into,
                                  readable, row_blocks)
from recompress.errors import UserError

ATTR = "_recompress_stored"
NONFINITE = "_recompress_nonfinite"  # on a tensor that ``materialize`` mapped: its NaN/Inf values, counted then
BLOCK_BYTES = 1 << 24
UNNAMED = "a stored tensor"  # in messages, for a tensor whose reader has not named it


def _read_at(fd: int, path: Path, offset: int, out: Tensor) -> None:
    """``read_into``, refusing a file that ends first."""
    if not read_into(fd, offset, out):
        raise UserError(f"{path} ends inside a tensor (truncated?)", "copy the checkpoint again")


class Record:
    """A zip record's bytes in a file and the CRC-32 its archive records for them. Reads that continue where the
    checked part ends extend the check (streamed compression reads a table block after block); ``verify`` reads
    what was not seen so and refuses a mismatch, as ``zipfile`` does when it reads a record whole."""

    def __init__(self, path: Path, begin: int, length: int, crc: int) -> None:
        self.path, self.begin, self.length, self.crc = path, begin, length, crc
        self.seen, self.running, self.ok = 0, 0, False

    def saw(self, offset: int, data: Tensor) -> None:
        """``data`` was read from byte ``offset`` of the file."""
        if not self.ok and offset == self.begin + self.seen and data.numel():
            raw = memoryview(data.reshape(-1).view(torch.uint8).numpy())[:self.length - self.seen]
            self.running, self.seen = zlib.crc32(raw, self.running), self.seen + len(raw)

    def verify(self) -> None:
        if self.ok:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            while self.seen < self.length:
                block = torch.empty(min(BLOCK_BYTES, self.length - self.seen), dtype=torch.uint8)
                _read_at(fd, self.path, self.begin + self.seen, block)
                self.saw(self.begin + self.seen, block)
        finally:
            os.close(fd)
        if self.running != self.crc:
            raise UserError(f"{self.path}: a tensor's bytes do not match the CRC-32 its archive records (damaged)",
                            "copy the checkpoint again")
        self.ok = True


@dataclass(frozen=True)
class Span:
    """A tensor stored in ``path`` from byte ``begin`` (its first element), viewed with ``shape``/``stride``;
    ``record``: the zip record that holds it, whose checksum covers it."""

    path: Path
    begin: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    record: Record | None = field(default=None, compare=False)

    @property
    def row_major(self) -> bool:
        """Stored contiguously, row after row (strides of size-1 dimensions do not matter)."""
        expect = 1
        for n, st in reversed(list(zip(self.shape, self.stride))):
            if n != 1 and st != expect:
                return False
            expect *= n
        return True

    def read(self, start: int = 0, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        """Rows ``[start, stop)``, or the whole tensor; row-major spans read straight into ``out`` if given
        (contiguous, of those rows' shape)."""
        stop = (self.shape[0] if self.shape else 1) if stop is None else stop
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if self.row_major:
                if out is None:
                    out = torch.empty((stop - start, *self.shape[1:]) if self.shape else (), dtype=self.dtype)
                offset, seen = self.begin + start * math.prod(self.shape[1:]) * self.dtype.itemsize, out
                _read_at(fd, self.path, offset, seen)
            else:  # a strided view (never a table of ours): its storage's extent, then the view copied
                extent = sum((n - 1) * st for n, st in zip(self.shape, self.stride)) + 1 if all(self.shape) else 0
                offset, seen = self.begin, torch.empty(extent, dtype=self.dtype)
                _read_at(fd, self.path, offset, seen)
                out = torch.as_strided(seen, self.shape, self.stride).clone()[start:stop]
        finally:
            os.close(fd)
        if self.record is not None:
            self.record.saw(offset, seen)
        return out


class Stored:
    """A tensor of ``size`` made of pieces ``(offsets, Span)`` that cover it exactly once (the caller checks)."""

    def __init__(self, size: tuple[int, ...], dtype: torch.dtype, pieces: list[tuple[tuple[int, ...], Span]],
                 where: str) -> None:
        self.size, self.dtype, self.pieces, self.where = tuple(size), dtype, pieces, where
        self.shape = torch.Size(self.size)
        self.name = UNNAMED  # in messages; the reader that knows what it is names it

    @property
    def streams(self) -> bool:
        """Readable by row blocks: a 2-D floating-point tensor stored row by row."""
        return len(self.size) == 2 and self.dtype.is_floating_point and all(s.row_major for _, s in self.pieces)

    def load(self) -> Tensor:
        """The whole tensor, read and checked against its records' checksums (one piece: with its own strides,
        as loading the file whole gives it)."""
        if len(self.pieces) == 1 and self.pieces[0][1].shape == self.size:
            out = self.pieces[0][1].read()
        else:
            out = torch.empty(self.size, dtype=self.dtype)
            for offsets, span in self.pieces:
                out[tuple(slice(o, o + n) for o, n in zip(offsets, span.shape))] = span.read()
        self.verify()
        return out

    def mapped(self, maps: dict[Path, PrivateMap]) -> Tensor:
        """:meth:`load`, except that a tensor of MAP_BYTES or more in several row-major pieces is assembled in a
        file's pages (:meth:`_assembled`), and one stored as one row-major piece of MAP_BYTES or more is not copied:
        it is a private map of its file (one per file in ``maps``), read once in row blocks whose pages are
        then given back: checked against its record's checksum, and its NaN/Inf values counted (:func:`check`
        refuses them where a model uses the tensor)."""
        span = self.pieces[0][1]
        nbytes = math.prod(self.size) * self.dtype.itemsize
        if len(self.pieces) > 1 and self.streams and nbytes >= MAP_BYTES:
            return self._assembled()
        if (len(self.pieces) != 1 or span.shape != self.size or not span.row_major or nbytes < MAP_BYTES
                or span.begin % self.dtype.itemsize):
            return self.load()
        if span.path not in maps:
            maps[span.path] = readable(span.path, lambda: PrivateMap(span.path))
        at, row = maps[span.path], nbytes // self.size[0]
        t = at.tensor(span.begin, self.dtype, self.size)
        bad = 0
        for first, block in row_blocks(t):
            offset = span.begin + first * row
            if span.record is not None:
                span.record.saw(offset, block)
            bad += nonfinite(block)
            at.release(offset, offset + len(block) * row)
        self.verify()
        setattr(t, NONFINITE, bad)  # refused by ``check`` if a model is built from it, not before
        return t

    def _assembled(self) -> Tensor:
        """A tensor saved in several pieces (per-rank shards, row- or column-wise) assembled in row blocks into
        the pages of an unlinked file in TMPDIR (``blockfile.Scratch``), not the process's own memory; checked
        against its records' checksums, its NaN/Inf values counted as a mapped tensor's are."""
        out = Scratch.temporary(f"{self.name} of {self.where}", "which is assembled there from its "
                                "pieces").empty(self.size, self.dtype)
        bad = 0
        for first, block in row_blocks(out):
            self._rows(first, first + len(block), block)
            bad += nonfinite(block)
        self.verify()
        setattr(out, NONFINITE, bad)
        return out

    def verify(self) -> None:
        """Check what was read against the archive's checksums (reading whatever was not read in order)."""
        for _, span in self.pieces:
            if span.record is not None:
                span.record.verify()

    def __len__(self) -> int:
        return self.size[0]

    def __getitem__(self, rows: slice) -> Tensor:
        """Rows ``[start, stop)`` as float32, assembled from the pieces that hold them, checked for NaN/Inf."""
        start, stop, step = rows.indices(self.size[0])
        if step != 1 or not self.streams:
            raise IndexError("stored tensors are read by contiguous row ranges of row-major 2-D tensors")
        out = self._rows(start, stop, torch.empty((max(0, stop - start), self.size[1]), dtype=self.dtype))
        check_finite(self.name, out, self.where)
        return out.float()

    def _rows(self, start: int, stop: int, out: Tensor) -> Tensor:
        """Rows ``[start, stop)`` read into ``out`` (contiguous, of those rows' shape) from the pieces holding
        them."""
        for (r0, c0), span in self.pieces:
            lo, hi = max(start, r0), min(stop, r0 + span.shape[0])
            if lo < hi and span.shape[1] == self.size[1]:  # whole rows: read in place
                span.read(lo - r0, hi - r0, out[lo - start:hi - start])
            elif lo < hi:  # a column-wise chunk: its part of each row
                out[lo - start:hi - start, c0:c0 + span.shape[1]] = span.read(lo - r0, hi - r0)
        return out


def lazy(stored: Stored) -> Tensor:
    """A meta tensor standing for ``stored`` (which it carries)."""
    t = torch.empty(stored.size, dtype=stored.dtype, device="meta")
    setattr(t, ATTR, stored)
    return t


def stored_of(t: Any) -> Stored | None:
    return getattr(t, ATTR, None) if isinstance(t, Tensor) and t.is_meta else None


def rows_of(t: Any) -> Stored | None:
    """What the streamed compression reads of ``t`` by row blocks, if ``t`` is left in its file and can be."""
    s = stored_of(t)
    return s if s is not None and s.streams else None


def merged(size: tuple[int, ...], chunks: Iterable[tuple[tuple[int, ...], Tensor]], where: str) -> Tensor | None:
    """The lazy tensor made of lazy ``chunks`` (offsets, meta tensor of one piece), or None if one is in memory."""
    pieces = []
    for offsets, chunk in chunks:
        s = stored_of(chunk)
        if s is None or len(s.pieces) != 1:
            return None
        pieces.append((tuple(o + p for o, p in zip(offsets, s.pieces[0][0])), s.pieces[0][1]))
    dtypes = {s.dtype for _, s in pieces}
    return lazy(Stored(size, dtypes.pop(), pieces, where)) if len(dtypes) == 1 else None


def loaded(t: Any) -> Any:
    """``t`` read into memory if it is a lazy tensor."""
    s = stored_of(t)
    return s.load() if s is not None else t


def as_float32(name: str, t: Tensor, where: str) -> Tensor:
    """``t`` as float32, which the models read: a 2-D table of another dtype (fp16/bf16, saved so by its
    trainer) of MAP_BYTES or more as float32 is converted in row blocks into a file's pages in TMPDIR
    (``blockfile.Scratch``), not the process's own memory. Callers ``check`` ``t`` for NaN/Inf first."""
    if t.dtype == torch.float32 or t.is_meta:
        return t
    if t.dim() != 2 or t.numel() * 4 < MAP_BYTES:
        return t.float()
    out = Scratch.temporary(f"{name} of {where}", f"which is converted there from {t.dtype} to float32"
                            ).empty(tuple(t.shape), torch.float32)
    for first, block in row_blocks(out):
        block.copy_(t[first:first + len(block)])
    return out


def check(name: str, t: Tensor, where: str) -> None:
    """Refuse NaN/Inf values in a tensor a model is built from: counted as it was mapped (:meth:`Stored.mapped`),
    else counted now; a tensor left in its file is checked block by block as it is read."""
    if t.is_meta:
        return
    bad = getattr(t, NONFINITE, None)
    if bad is None:
        check_finite(name, t, where)
    elif bad:
        raise nonfinite_error(name, bad, where)


def unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors``, each one whose memory overlaps an earlier one's replaced by a copy: tables saved over one
    storage (one tensor under two keys, overlapping views) are mapped over the same memory, and a model must
    not hold them so (training one would change the other; safetensors refuses to save shared tensors)."""
    taken: list[tuple[int, int]] = []
    out = {}
    for key, t in tensors.items():
        if not t.is_meta and t.numel():
            lo = t.data_ptr()
            hi = lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
            if any(lo < b and a < hi for a, b in taken):
                t = t.clone()
                lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            taken.append((lo, hi))
        out[key] = t
    return out


def materialize(obj: Any, keep: set[int] = frozenset(), skip: Callable[[Any], bool] = lambda key: False) -> Any:  # type: ignore[assignment]
    """``obj`` with every lazy tensor in memory (:meth:`Stored.mapped`: a big one mapped from its file), except
    those whose Stored's id is in ``keep`` and those under a mapping key that ``skip`` names; containers are
    updated in place (they are the reader's own)."""
    maps: dict[Path, PrivateMap] = {}

    def walk(value: Any, key: str) -> Any:
        s = stored_of(value)
        if s is not None:
            if s.name == UNNAMED:
                s.name = key
            return value if id(s) in keep else s.mapped(maps)
        if isinstance(value, MutableMapping):
            for k, v in value.items():
                if not skip(k):
                    value[k] = walk(v, str(k))
        elif isinstance(value, list):
            value[:] = [walk(v, key) for v in value]
        elif isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(walk(v, key) for v in value)
        return value

    return walk(obj, UNNAMED)
