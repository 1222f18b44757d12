"""A restricted unpickler for ``torch.save`` zip files: nothing in a file ever runs.

``torch.load(weights_only=True)`` refuses files that upstream projects really write: facebookresearch/dlrm
``--mlperf-logging`` runs store ``test_auc`` as a numpy scalar, RecBole stores its ``Config`` object. This
reader opens the zip itself, rebuilds tensors from the raw storages, and resolves a pickle's globals only
from the allow-list below; every other global is refused by name, before anything is called.

Allow-list (what each name becomes):

- ``collections.OrderedDict/defaultdict``, ``builtins`` containers and scalars (``dict list tuple set
  frozenset int float complex bool str slice``, whose size the file bounds), ``_codecs.encode`` (bytes in
  protocol-2 pickles), ``torch.Size``, ``torch.device``, ``torch.<dtype>`` (e.g. ``torch.float32``);
- ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``: a tensor over a storage read from the zip
  (bounds-checked), parameters as plain tensors; ``torch.<Type>Storage``: the storage's dtype;
- numpy's own reconstructors: ``numpy(._core|.core).multiarray.scalar`` and ``_reconstruct``,
  ``numpy.dtype``, ``numpy.ndarray`` (numbers and arrays; object arrays hold only allowed objects);
- ``copyreg._reconstructor``, for the stubs only;
- inert stubs, which keep their pickled arguments and state and never call upstream code: every name in
  ``recbole.*`` (its ``Config``, enums and the model class the Config names), ``yaml.loader.*`` (the
  loader class RecBole's Config keeps), ``torch.distributed._shard.*`` and ``torch.distributed.remote_device``
  (a per-rank ``ShardedTensor``: its local shards, their offsets and the global size),
  ``torch.distributed.tensor.*``, ``torch.distributed.device_mesh.*`` and ``torch.distributed._mesh_layout.*``
  (a per-rank ``DTensor``: its local tensor, placements, global shape and the rank's mesh coordinates), and
  ``torch.distributed.checkpoint.*`` (a DCP folder's ``.metadata``: chunk offsets and file positions);
- for those stubs only: ``torch._tensor._rebuild_from_type_v2`` and ``torch._utils._rebuild_wrapper_subclass``
  (how a tensor subclass such as ``ShardedTensor`` pickles), and ``builtins.getattr`` (how an enum member
  pickles); ``torch.serialization._get_layout`` for ``torch.strided`` and the other layouts; ``pathlib``
  paths, as text.

A global outside the list is refused with one of two messages: one that runs code (``os``/``posix``,
``subprocess``, ``builtins.eval``, ``runpy``, ``numpy.load``, ``torch.load``, ...) says the file would run
code and names the callable; any other name says that the file holds a type recompress does not know.
Storages are bounds-checked against their records (a view may not hold more elements than its storage),
a numpy array may not be larger than the pickle that fills it, a compressed record that inflates more than
100-fold is refused (torch writes them uncompressed), and BUILD (setting an object's state) is allowed on
instances the pickle made (stubs, numpy arrays, containers, tensors) only, so no file can change an
allowed callable or type for later files.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recompress.errors import UserError

from . import stored

# modules whose callables execute code, touch files or processes, or reach any other callable
CODE = {"os", "posix", "nt", "subprocess", "sys", "shutil", "runpy", "importlib", "pickle", "_pickle", "marshal",
        "ctypes", "code", "codeop", "pty", "socket", "webbrowser", "types", "functools", "operator", "io",
        "pathlib", "tempfile", "multiprocessing", "signal", "platform", "inspect", "pydoc", "timeit", "cProfile",
        "profile", "pdb", "bdb", "asyncio", "threading", "_thread", "urllib", "http", "ftplib", "smtplib",
        "imp", "zipimport", "site", "sysconfig", "copyreg", "torch.hub", "torch.serialization", "torch.jit",
        "torch.ops", "torch._ops", "numpy.testing", "numpy.f2py", "numpy.distutils", "setuptools", "distutils"}
# containers and scalars: each builds from what the pickle holds, so its size is bounded by the file's (bytes,
# bytearray and range are left out: bytes(2**40) would allocate a terabyte)
SAFE_BUILTINS: dict[str, Any] = {t.__name__: t for t in (dict, list, tuple, set, frozenset, int, float, complex, bool,
                                                        str, slice)}
# functions of otherwise harmless modules that read or write files or unpickle
CODE_NAMES = {("numpy", n) for n in ("load", "save", "savez", "fromfile", "loadtxt", "genfromtxt", "memmap", "frompyfunc",
                                     "vectorize")} | {("torch", n) for n in ("load", "save", "compile", "jit", "hub")}
STUB_PACKAGES = ("recbole", "yaml.loader", "torch.distributed._shard", "torch.distributed.remote_device",
                 "torch.distributed.checkpoint", "torch.distributed.tensor", "torch.distributed.device_mesh",
                 "torch.distributed._mesh_layout")


class Stub:
    """An inert stand-in for an upstream object: its constructor arguments and pickled state, nothing run."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:  # noqa: PYI034
        obj = super().__new__(cls)  # pickle's NEWOBJ calls only this: keep the arguments (a NamedTuple's fields)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def attr(self, name: str) -> Any:
        """An attribute of the pickled object: from its state dict, or a dataclass's ``(None, slots)`` state."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:
            state = state[1]
        if isinstance(state, dict) and name in state:
            return state[name]
        raise BadFile(f"a pickled {type(self).__qualname__} has no {name!r}")



def _stub_class(module: str, name: str) -> type:
    return type(name, (Stub,), {"__module__": module, "__qualname__": name})


class UnsafeGlobal(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name

    @property
    def runs_code(self) -> bool:
        top = self.module.split(".")[0]
        return (self.module in CODE or top in CODE or self.module.rsplit(".", 1)[0] in CODE
                or (self.module, self.name) in CODE_NAMES or (self.module == "builtins" and self.name not in SAFE_BUILTINS))


class BadFile(Exception):
    """The file's structure is broken (not an attack we can name): reported as an unreadable file."""


@dataclass(frozen=True, slots=True)
class _Storage:
    dtype: torch.dtype


def _storage_types() -> dict[str, _Storage]:
    names = {"Double": torch.float64, "Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16,
             "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8, "Byte": torch.uint8,
             "Bool": torch.bool, "ComplexFloat": torch.complex64, "ComplexDouble": torch.complex128}
    return {f"{k}Storage": _Storage(v) for k, v in names.items()}


STORAGES = _storage_types()


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    """A tensor over ``storage``; over a storage left in its file (lazy loading), a lazy tensor (``stored``)."""
    if not isinstance(storage, torch.Tensor) or not all(isinstance(v, int) and v >= 0
                                                        for v in (offset, *size, *stride)) or len(size) != len(stride):
        raise BadFile("a tensor record is malformed")
    if all(size):
        end = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
        if end > storage.numel():
            raise BadFile(f"a tensor reaches element {end:,} of a storage of {storage.numel():,} (truncated?)")
        numel = 1
        for s in size:
            numel *= s
        if numel > storage.numel():  # stride 0 repeats elements: copying the view would allocate that much
            raise BadFile(f"a tensor of {numel:,} elements views a storage of {storage.numel():,}")
    at = getattr(storage, STORAGE_AT, None)
    if storage.is_meta and at is not None:
        span = stored.Span(at.path, at.begin + offset * storage.element_size(), storage.dtype, tuple(size), tuple(stride),
                           at)
        return stored.lazy(stored.Stored(tuple(size), storage.dtype, [((0,) * len(size), span)], str(at.path)))
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise BadFile("a parameter record holds no tensor")
    return data


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """``numpy.dtype``, always a private copy (BUILD then sets its state, never a shared builtin dtype's)."""
    return np.dtype(spec, bool(align), True)


def _numpy(name: str) -> Any:
    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:
        from numpy.core import multiarray  # numpy 1
    return getattr(multiarray, name)


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """``copyreg._reconstructor`` for the stubs only (a plain object of any other class is refused)."""
    if not (isinstance(cls, type) and issubclass(cls, Stub)):
        raise BadFile(f"an object of {getattr(cls, '__name__', cls)!r} is rebuilt through copyreg")
    obj = cls()
    obj.args = (state,) if state is not None else ()
    return obj


def _stub_type(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, Stub)


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2`` for a stubbed subclass (kept as a stub with its state) or a
    plain tensor/parameter (rebuilt by ``func``, itself from the allow-list)."""
    if _stub_type(new_type):
        obj = new_type()
        obj.__setstate__(state)
        return obj
    if new_type in (torch.Tensor, torch.nn.Parameter) and callable(func):
        return func(*args)
    raise BadFile(f"a tensor of type {getattr(new_type, '__qualname__', new_type)!r} is rebuilt")


def _rebuild_wrapper(cls: Any, *rest: Any) -> Any:
    if not _stub_type(cls):
        raise BadFile(f"a wrapper tensor of type {getattr(cls, '__qualname__', cls)!r} is rebuilt")
    return cls(*rest[:2])  # placeholder: dtype and size; the stub's state arrives next


def _getattr(obj: Any, name: Any) -> Any:
    """``getattr`` on a stubbed class only (an enum member of it, or a class nested in it such as
    ``ShardedTensor.ProcessGroupState``): an inert stub class named for the attribute."""
    if not (_stub_type(obj) and isinstance(name, str) and name.isidentifier()):
        raise UnsafeGlobal("builtins", "getattr")
    return _stub_class(obj.__module__, f"{obj.__qualname__}.{name}")


def _path(*parts: Any) -> str:
    """A pickled ``pathlib`` path (DCP metadata records where it was saved), as plain text."""
    return "/".join(str(p) for p in parts)


LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


def _get_layout(name: Any) -> Any:
    if name not in LAYOUTS:
        raise BadFile(f"unknown tensor layout {name!r}")
    return LAYOUTS[name]


ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): codecs.encode,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("numpy", "dtype"): _dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch._utils", "_rebuild_wrapper_subclass"): _rebuild_wrapper,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("builtins", "getattr"): _getattr,
    **{("pathlib", k): _path for k in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")},
    **{("builtins", k): v for k, v in SAFE_BUILTINS.items()},
    **{("torch", k): v for k, v in STORAGES.items()},
}


# instances this pickle made itself, whose state it may set (a state dict's OrderedDict keeps ``_metadata``)
BUILDABLE = (Stub, np.ndarray, np.dtype, collections.OrderedDict, collections.defaultdict, torch.Tensor)


class _Unpickler(pickle._Unpickler):  # noqa: SLF001 - the Python unpickler, whose BUILD can be checked
    """pickle's unpickler with globals from the allow-list only, numpy arrays no larger than the pickle can
    fill, and BUILD (set an object's state) only on instances the pickle made (``BUILDABLE``): never on an
    allowed callable, class or storage type, which would change it for every later file."""

    dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001

    def __init__(self, data: bytes, storages: Any) -> None:
        super().__init__(io.BytesIO(data))
        self.storages, self.size = storages, len(data)

    def load_build(self) -> None:
        if not isinstance(self.stack[-2], BUILDABLE):
            raise BadFile(f"the pickle sets the state of a {type(self.stack[-2]).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> Any:
        """numpy's ``_reconstruct`` for plain arrays whose bytes (or objects) the pickle itself can hold."""
        if subtype is not np.ndarray or not isinstance(dtype, (bytes, str, np.dtype)):
            raise BadFile(f"a numpy array of type {getattr(subtype, '__name__', subtype)!r} is rebuilt")
        dims = shape if isinstance(shape, tuple) else (shape,)
        if not all(isinstance(n, int) and n >= 0 for n in dims):
            raise BadFile("a numpy array record is malformed")
        count = int(np.prod(dims, dtype=np.float64))
        itemsize = max(np.dtype(dtype).itemsize if not isinstance(dtype, bytes) else 1, 1)
        if count * itemsize > self.size + 64:
            raise BadFile(f"a numpy array of {count:,} elements in a pickle of {self.size:,} bytes")
        return _numpy("_reconstruct")(subtype, shape, dtype)

    def find_class(self, module: str, name: str) -> Any:
        # the Python 2 names protocol <= 2 pickles use, mapped as pickle's own find_class maps them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("scalar", "_reconstruct"):
            return self._reconstruct if name == "_reconstruct" else _numpy(name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if any(module == p or module.startswith(p + ".") for p in STUB_PACKAGES):
            return _stub_class(module, name)
        raise UnsafeGlobal(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise BadFile(f"a storage reference is malformed ({str(pid)[:60]})")
        return self.storages(pid[2], pid[1].dtype, pid[4])


@dataclass(frozen=True)
class Window:
    """Bytes ``[start, start + length)`` of a file (one item of a DCP data file)."""

    path: Path
    start: int = 0
    length: int | None = None  # to the end of the file


class _WindowReader(io.RawIOBase):
    """A read-only, seekable file object over a :class:`Window`, as ``zipfile`` needs."""

    def __init__(self, w: Window) -> None:
        super().__init__()
        self.f, self.path, self.start, self.pos = open(w.path, "rb"), w.path, w.start, 0  # noqa: SIM115 (closed with the reader)
        size = self.f.seek(0, io.SEEK_END)
        self.length = size - w.start if w.length is None else w.length
        if w.start + self.length > size:
            self.f.close()
            raise BadFile(f"the file ends {w.start + self.length - size:,} bytes before the record does (truncated?)")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = max(0, {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n]) if n else 0
        self.pos += got
        return got

    def close(self) -> None:
        self.f.close()
        super().close()


def _data_offset(r: _WindowReader, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) zip record's bytes begin, from the start of the window."""
    r.seek(info.header_offset)
    head = r.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04" or info.compress_type != zipfile.ZIP_STORED:
        raise BadFile(f"the record {info.filename} has no stored local header")
    name, extra = int.from_bytes(head[26:28], "little"), int.from_bytes(head[28:30], "little")
    if r.read(name) != info.orig_filename.encode():  # as zipfile checks before it reads a record
        raise BadFile(f"the record {info.filename}'s local header names another file")
    return info.header_offset + 30 + name + extra


STORAGE_AT = "_recompress_at"  # a stored.Record, on a meta storage left in its file


def load(source: Path | bytes | Window, where: str | Path | None = None, *, lazy: bool = False) -> Any:
    """The object in a ``torch.save`` zip (a file, its bytes, or a window of a file such as one item of a DCP
    data file), through the allow-list (see the module docstring); ``where`` names it in errors. ``lazy``
    (files and windows): every storage stays in the file (however small: a small shard of a big table must
    not make the table eager), and the tensors over them are lazy (``stored``): meta tensors that know where
    their bytes are."""
    where = where or (source.path if isinstance(source, Window) else source)
    with refusals(where, "torch file"):
        handle = io.BytesIO(source) if isinstance(source, bytes) else \
            _WindowReader(source if isinstance(source, Window) else Window(source))
        with handle, zipfile.ZipFile(handle) as z:
            names = z.namelist()
            pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
            if len(pkl) != 1:
                raise BadFile("no data.pkl record")
            root = pkl[0][:-len("data.pkl")]
            if f"{root}byteorder" in names and _member(z, f"{root}byteorder").strip() not in (b"", b"little"):
                raise BadFile("a big-endian file")
            cache: dict[tuple[str, torch.dtype], torch.Tensor] = {}

            def storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
                if (key, dtype) not in cache:
                    name = f"{root}data/{key}"
                    if name not in names:
                        raise BadFile(f"the storage {name} is missing (truncated?)")
                    info, nbytes = z.getinfo(name), numel * dtype.itemsize
                    if lazy and isinstance(handle, _WindowReader) and info.compress_type == zipfile.ZIP_STORED:
                        begin = _data_offset(handle, info)
                        if info.file_size < nbytes or begin + nbytes > handle.length:
                            raise BadFile(f"the storage {name} holds {info.file_size:,} bytes, expected {nbytes:,}")
                        cache[key, dtype] = torch.empty(numel, dtype=dtype, device="meta")
                        setattr(cache[key, dtype], STORAGE_AT,
                                stored.Record(handle.path, handle.start + begin, info.file_size, info.CRC))
                        return cache[key, dtype]
                    raw, itemsize = bytearray(_member(z, name)), torch.empty(0, dtype=dtype).element_size()
                    if len(raw) < numel * itemsize:
                        raise BadFile(f"the storage {name} holds {len(raw):,} bytes, expected {numel * itemsize:,}")
                    cache[key, dtype] = torch.frombuffer(raw, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)
                return cache[key, dtype]

            return _Unpickler(_member(z, pkl[0]), storage).load()


def _member(z: zipfile.ZipFile, name: str) -> bytes:
    """A zip record, refused if compressed more than 100-fold (torch stores records uncompressed)."""
    info = z.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > 100 * max(info.compress_size, 1):
        raise BadFile(f"the record {name} inflates {info.file_size / max(info.compress_size, 1):.0f}-fold")
    return z.read(name)


def load_pickle(data: bytes, where: str | Path) -> Any:
    """A plain pickle (no tensors; e.g. a DCP folder's ``.metadata``), through the same allow-list."""
    def no_storages(key: str, dtype: torch.dtype, numel: int) -> Any:
        raise BadFile("a plain pickle refers to tensor storages")
    with refusals(where, "pickle"):
        return _Unpickler(data, no_storages).load()


@contextmanager
def refusals(where: str | Path, what: str) -> Iterator[None]:
    """Whatever a broken or hostile file raises while it is read, as one clear error."""
    try:
        yield
    except UserError:
        raise
    except UnsafeGlobal as e:
        raise refusal(where, e) from None
    except Exception as e:  # noqa: BLE001 - anything else a broken or hostile file raises is the file's fault
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{where} is not a readable {what} ({type(e).__name__}: {first})",
                        "the file is truncated, corrupt or not a checkpoint") from None


def refusal(path: str | Path, e: UnsafeGlobal) -> UserError:
    """The error for a file whose pickle names a global outside the allow-list."""
    if e.runs_code:
        return UserError(f"{path} would run code when unpickled: it calls {e} (refused; nothing was run)",
                         "do not load this file with torch.load(weights_only=False) or pickle either; ask its "
                         "author for a state_dict of plain tensors")
    return UserError(f"{path} holds an object of type {e} that recompress does not know (refused; nothing was "
                     "run)", "recompress reads tensors, containers, numpy values and RecBole's Config; re-save "
                     "the state_dict with plain tensors, or ask for this type to be added to the allow-list "
                     "in recompress/adapters/safe_pickle.py")
