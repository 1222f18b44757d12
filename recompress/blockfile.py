"""safetensors files read and written in row blocks, so a table never has to be in memory whole.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON
header ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the tensors'
bytes back to back. :class:`TensorFile` reads rows ``[start, stop)`` of one tensor with a positioned read
into a fresh buffer (the page cache holds the file, not this process); :class:`TensorWriter` lays out every
tensor first, then takes blocks in any order with positioned writes and checks at the end that every
tensor received as many rows as it has. Files it writes are ordinary safetensors files.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from torch import Tensor

from .errors import UserError

DTYPES: dict[str, torch.dtype] = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                                  "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                                  "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # safetensors' own limit
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)  # Python < 3.13 lacks it
MAP_BYTES = 1 << 24  # tensors this large are mapped from their file when a checkpoint is loaded; smaller ones are read
CHECK_BYTES = 1 << 24  # rows of a mapped tensor checked for NaN/Inf at a time (then their pages are given back)
T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file

    @property
    def row_bytes(self) -> int:
        n = 1
        for s in self.shape[1:]:
            n *= s
        return n * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return (self.shape[0] if self.shape else 1) * self.row_bytes


def nonfinite(t: Tensor) -> int:
    """How many NaN/Inf values a floating-point tensor (or block of rows) holds; 0 for other dtypes."""
    if not t.is_floating_point() or torch.isfinite(t).all():
        return 0
    return int((~torch.isfinite(t)).sum())


def nonfinite_error(name: str, bad: int, where: str) -> UserError:
    return UserError(f"{where}: tensor {name!r} has {bad} NaN/Inf values",
                     "the source model diverged or is damaged; use an earlier checkpoint")


def check_finite(name: str, t: Tensor, where: str) -> None:
    """Refuse NaN/Inf values in a floating-point tensor (or block of rows)."""
    bad = nonfinite(t)
    if bad:
        raise nonfinite_error(name, bad, where)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number a header may hold")


def _bad(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a readable safetensors file ({why})",
                     "the file is truncated or corrupt; copy it again or re-create it")


def readable(path: Path, read: Callable[[], T]) -> T:
    """``read()``, its OSError (a file that cannot be opened, or mapped) as a user error."""
    try:
        return read()
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise UserError(f"{path} could not be mapped into memory ({e})",
                            "the system refuses to map a file this large (vm.overcommit_memory=2?); compress it "
                            "without --data first: data-free methods stream it in row blocks") from None
        raise UserError(f"{path} could not be read ({e})",
                        "the file is truncated or corrupt; copy it again or re-create it") from None


class PrivateMap:
    """A whole file mapped private and writable. Tensors over it (:meth:`tensor`) are paged in when touched
    and can give their pages back (:meth:`release`); writes to them stay in this process (copy on write), so
    the file is never changed; no swap is reserved for those copies, so a file may be larger than memory. The
    map lives as long as a tensor over it (closing it then raises BufferError, it does not crash). As with
    any mapped file, the file must not be rewritten in place while such a tensor is in use (recompress never
    does: it writes a new folder and renames it); a truncated file would end the process (SIGBUS)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE | MAP_NORESERVE,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)  # exported while tensors use it: closing the map then fails, not them

    def tensor(self, begin: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        """The tensor of ``shape`` whose bytes start at byte ``begin`` (a multiple of the dtype's size)."""
        count = 1
        for n in shape:
            count *= n
        if begin + count * dtype.itemsize > len(self.view):
            raise UserError(f"{self.path} ends inside a tensor (truncated?)", "copy the checkpoint again")
        return torch.frombuffer(self.view, dtype=dtype, count=count, offset=begin).view(shape)

    def release(self, begin: int, end: int) -> None:
        """Give back the whole pages within bytes ``[begin, end)`` (read from the file again if touched). Only
        for bytes never written to: it drops writes."""
        lo, hi = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            self.map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def can_map_privately(nbytes: int) -> bool:
    """Whether the kernel grants this process, now, a private writable map of ``nbytes`` without MAP_NORESERVE
    (how ONNX Runtime maps an external initializer): an anonymous one is accounted the same way, so one is
    asked for and given back untouched."""
    try:
        probe = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        return False
    probe.close()
    return True


def writable_map_limit(proc: Path = Path("/proc")) -> tuple[int, str] | None:
    """The largest private writable map of a file the kernel grants without MAP_NORESERVE (how ONNX Runtime maps
    an external initializer), and the policy that sets it: under ``vm.overcommit_memory`` 0, its default
    heuristic, RAM + swap for one map (Linux >= 5.2; a container's /proc may show its own limit instead); under
    2, strict accounting, what is left to commit (for all maps together). None where any map is granted (1) or
    the policy cannot be read. Used to explain a failure, not to predict one."""
    try:
        mode = (proc / "sys/vm/overcommit_memory").read_text().strip()
        info = {k: int(v.split()[0]) << 10 for k, v in
                (line.split(":", 1) for line in (proc / "meminfo").read_text().splitlines() if ":" in line)}
        if mode == "0":
            return info["MemTotal"] + info.get("SwapTotal", 0), "RAM + swap (vm.overcommit_memory = 0)"
        if mode == "2":
            return (max(0, info["CommitLimit"] - info["Committed_AS"]),
                    "what is left to commit (vm.overcommit_memory = 2)")
    except (OSError, ValueError, KeyError, IndexError):  # not Linux's /proc, or not as it writes it
        return None
    return None


def row_blocks(t: Tensor) -> Iterator[tuple[int, Tensor]]:
    """``(first row, rows)`` over ``t`` in blocks of CHECK_BYTES (a 0-dim tensor: itself, once): how a mapped
    tensor is checked, so that it is read once and never held whole."""
    if not t.dim():
        yield 0, t
        return
    step = max(1, CHECK_BYTES // max(1, t[:1].numel() * t.element_size()))
    for s in range(0, len(t), step):
        yield s, t[s:s + step]


def read_into(fd: int, offset: int, out: Tensor) -> bool:
    """Fill the contiguous tensor ``out`` with the file's bytes from ``offset`` (positioned reads into its own
    memory: no copy, and the page cache, not this process, holds the file); False if the file ends first."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            return False
        done += got
    return True


class TensorFile:
    """Read-only access to a safetensors file's tensors, whole or by rows (dimension 0)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None
        self.map: PrivateMap | None = None
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(self.path, "shorter than its header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise _bad(self.path, f"header of {n} bytes in a {size}-byte file")
            try:
                header = json.loads(f.read(n), parse_constant=_no_constant)
            except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
                raise _bad(self.path, f"header is not JSON: {str(e)[:200]}") from None
            if not isinstance(header, dict):
                raise _bad(self.path, f"header is a JSON {type(header).__name__}, not an object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, Entry] = {}
        end = 8 + n
        ranges = []
        for name, info in header.items():
            try:
                dtype, shape, (b, e) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise _bad(self.path, f"tensor {name!r} has an unreadable entry ({err!r})") from None
            if not all(type(v) is int and v >= 0 for v in (*shape, b, e)):
                raise _bad(self.path, f"tensor {name!r} has a shape or byte range that is not whole numbers >= 0")
            entry = Entry(dtype, shape, end + b)
            if e - b != entry.nbytes or end + e > size:
                raise _bad(self.path, f"tensor {name!r} does not fit its byte range")
            self.entries[name] = entry
            ranges.append((b, e, name))
        at = 0  # as safetensors requires: the tensors tile the data, no gaps, no overlaps
        for b, e, name in sorted(ranges):
            if b != at:
                raise _bad(self.path, f"tensor {name!r} {'overlaps the one before it' if b < at else 'leaves a gap'}")
            at = e

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` (the whole tensor by default), as a new tensor."""
        e = self.entries[name]
        if not e.shape:
            start, stop, shape = 0, 1, ()
        else:
            stop = e.shape[0] if stop is None else min(stop, e.shape[0])
            shape = (max(0, stop - start), *e.shape[1:])
        out = torch.empty(shape, dtype=e.dtype)
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        if not read_into(self.fd, e.begin + start * e.row_bytes, out):
            raise _bad(self.path, f"tensor {name!r} is cut short")
        return out

    def mapped(self, name: str) -> Tensor:
        """Tensor ``name`` backed by a private map of the file: its pages are read when first touched and
        can be dropped again (:meth:`release`), and writes to it stay in this process (copy on write), so
        the file is never changed. A tensor whose bytes are not aligned for its dtype is read instead."""
        e = self.entries[name]
        if e.nbytes == 0 or e.begin % e.dtype.itemsize:
            return self.read(name)
        if self.map is None:
            self.map = PrivateMap(self.path)
        return self.map.tensor(e.begin, e.dtype, e.shape)

    def release(self, name: str, start: int, stop: int) -> None:
        """Give back the pages of rows ``[start, stop)`` of mapped tensor ``name`` that no other rows share
        (:meth:`PrivateMap.release`)."""
        e = self.entries[name]
        if self.map is not None:
            self.map.release(e.begin + start * e.row_bytes, e.begin + min(stop, e.shape[0] if e.shape else 1) * e.row_bytes)

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


class Rows(Protocol):
    """What a data-free method reads of a table: its shape and contiguous row slices (a Tensor serves); the
    streamed path calls ``verify`` on its sources once it has read them."""

    @property
    def shape(self) -> torch.Size: ...

    def __getitem__(self, rows: slice) -> Tensor: ...

    def verify(self) -> None:
        """After the rows were read: refuse them if the file's own checksums say they were damaged."""


class FileRows:
    """One 2-D tensor of a :class:`TensorFile`, read by row slices (``rows[s:e]``) as float32, each block
    checked for NaN/Inf: what a data-free method needs of a table too big to load (``shape`` and slicing
    are all it uses, so a Tensor serves as well)."""

    def __init__(self, file: TensorFile, name: str) -> None:
        self.file, self.name = file, name
        self.shape = torch.Size(file.entries[name].shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> Tensor:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("FileRows reads contiguous row ranges only")
        block = self.file.read(self.name, start, stop)
        check_finite(self.name, block, str(self.file.path))
        return block.float()

    def verify(self) -> None:
        """Nothing to check: safetensors records no checksum (each tensor's byte range was checked on opening)."""


class TensorWriter:
    """Write a safetensors file whose tensors (``layout``: name -> dtype, shape) arrive as row blocks."""

    def __init__(self, path: str | Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset, self.entries = 0, {}
        for name in sorted(layout, key=lambda k: (-layout[k][0].itemsize, k)):  # as safetensors orders them:
            dtype, shape = layout[name]                                          # every tensor aligned
            entry = Entry(dtype, tuple(shape), offset)
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + entry.nbytes]}
            self.entries[name] = entry
            offset += entry.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self.written = dict.fromkeys(layout, 0)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.write(self.fd, struct.pack("<Q", len(raw)) + raw)
        os.ftruncate(self.fd, self.base + offset)

    def write(self, name: str, start: int, block: Tensor) -> None:
        """Rows ``[start, start + len(block))`` of tensor ``name`` (a 0-d tensor: ``start`` 0, the value)."""
        e = self.entries[name]
        block = block.detach().contiguous().cpu()
        rows = block.shape[0] if e.shape else 1
        if block.dtype != e.dtype or tuple(block.shape[1:] if e.shape else block.shape) != e.shape[1:] \
                or start < 0 or start + rows > (e.shape[0] if e.shape else 1):
            raise ValueError(f"block {block.dtype} {list(block.shape)} at row {start} does not fit {name} "
                             f"{e.dtype} {list(e.shape)}")
        data = memoryview(block.reshape(-1).view(torch.uint8).numpy()) if block.numel() else memoryview(b"")
        done = 0  # written from the tensor's own memory (a bytes copy would double a large tensor)
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], self.base + e.begin + start * e.row_bytes + done)
        self.written[name] += rows

    def __enter__(self) -> TensorWriter:  # noqa: PYI034
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Flush and close; after a clean exit every tensor must have received all its rows (the caller
        stages the file, so a failed write leaves nothing behind)."""
        try:
            if kind is None:
                short = [n for n, e in self.entries.items() if self.written[n] != (e.shape[0] if e.shape else 1)]
                if short:
                    raise RuntimeError(f"{self.path}: rows missing or written twice in {short[:3]}")
                os.fsync(self.fd)
        finally:
            os.close(self.fd)


class Scratch:
    """Where big temporary tensors are made. With a ``folder``, one of MAP_BYTES or more is a shared map of a
    file there that is unlinked at once: its pages are the page cache's, which the kernel writes back to disk
    and drops under pressure, not this process's own memory (on a tmpfs they are memory after all), and
    nothing is left behind. Otherwise, and for smaller ones, ordinary memory. ``purpose``: (what is made, why
    there, the fix) for the message when the folder's disk has no room: an error, or with ``fallback`` a
    warning and ordinary memory (as before there was a folder). ``admit(shape, dtype)``, if given, is asked
    before a tensor is made in the folder, and may refuse it (raise) before any disk is reserved."""

    def __init__(self, folder: Path | None = None,
                 purpose: tuple[str, str, str] = ("a tensor", "made there", "free that much space there"),
                 fallback: bool = False, admit: Callable[[tuple[int, ...], torch.dtype], None] | None = None) -> None:
        self.folder, self.purpose, self.fallback, self.admit = folder, purpose, fallback, admit

    @classmethod
    def temporary(cls, what: str, why: str) -> Scratch:
        """In the temporary folder (TMPDIR), falling back to memory where it has no room."""
        return cls(Path(tempfile.gettempdir()), (what, why, "set TMPDIR to a folder with that much free space"),
                   fallback=True)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        numel = math.prod(shape)
        if self.folder is None or numel * dtype.itemsize < MAP_BYTES:
            return torch.empty(shape, dtype=dtype)
        if self.admit is not None:
            self.admit(shape, dtype)
        fd, name = tempfile.mkstemp(prefix=".scratch-", dir=self.folder)
        try:
            self._reserve(fd, numel * dtype.itemsize)
            return torch.from_file(name, shared=True, size=numel, dtype=dtype).view(shape)
        except UserError as e:
            if not self.fallback:
                raise
            from .progress import say
            say(f"warning: {e.message}; kept in memory instead ({e.hint})")
            return torch.empty(shape, dtype=dtype)
        finally:
            os.close(fd)
            os.unlink(name)

    def _reserve(self, fd: int, nbytes: int) -> None:
        """Give the file ``nbytes`` of disk now: a write to a mapped page the disk has no room for would end the
        process (SIGBUS); refused here instead, with one clear message."""
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: as it comes
                os.ftruncate(fd, nbytes)
                return
            what, why, fix = self.purpose
            raise UserError(f"{self.folder}: could not reserve disk for {what} of {nbytes:,} bytes, {why} "
                            f"({e.strerror})", fix) from None
