"""The native checkpoint: a folder with ``spec.json`` (ModelSpec) and ``weights.safetensors``.

Loading never unpickles. Every tensor is checked against the spec (names, shapes, finiteness)
before the model sees it, so a damaged or mismatched checkpoint fails with one clear line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor, nn

from .blockfile import MAP_BYTES, TensorFile, check_finite, readable, row_blocks
from .errors import UserError
from .models import build_model
from .outputs import output_dir
from .spec import ModelSpec
from .tables import empty_table

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class Checkpoint:
    """A model with its spec, as every stage after the adapters sees it."""

    model: nn.Module
    spec: ModelSpec
    path: Path | None = None  # the file it was read from (an input no output may overwrite)
    modified: bool = False  # changed in memory since (compressed): no longer what that file holds


def refresh_tables(model: nn.Module, spec: ModelSpec) -> None:
    """Make ``spec.tables`` describe the model's current tables (kinds change under compression)."""
    roles = {t.name: t.role for t in spec.tables}
    spec.tables = [t.spec(name, roles.get(name, "sparse_feature")) for name, t in model.tables.items()]


def save_checkpoint(ckpt: Checkpoint, out: str | Path, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Write ``ckpt`` atomically to the folder ``out`` (never over one of ``inputs``)."""
    refresh_tables(ckpt.model, ckpt.spec)
    tensors = {k: v.detach().contiguous().cpu() for k, v in ckpt.model.state_dict().items()}
    with output_dir(out, kind="checkpoint", overwrite=overwrite, inputs=inputs) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "recompress"})  # one key: multi-key order is random
        (tmp / SPEC_FILE).write_text(ckpt.spec.to_json() + "\n")
    return Path(out)


def is_native(path: Path) -> bool:
    return path.is_dir() and (path / SPEC_FILE).is_file()


def checkpoint_hash(path: Path) -> str:
    """sha256 over the spec and weights files of a native checkpoint, over every file of any other folder (an
    upstream one: DCP, per-rank files, NVIDIA's; names and bytes, in sorted order), or over one file."""
    h = hashlib.sha256()
    folder = path.is_dir() and not is_native(path)
    if folder:
        files = sorted(f for f in path.rglob("*") if f.is_file())
    else:
        files = [path / SPEC_FILE, path / WEIGHTS_FILE] if path.is_dir() else [path]
    for f in files:
        if folder:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_spec(path: Path) -> tuple[ModelSpec, Path]:
    """The spec of the native checkpoint folder ``path`` and the path of its weights file."""
    spec_path, weights_path = path / SPEC_FILE, path / WEIGHTS_FILE
    if not spec_path.is_file() or not weights_path.is_file():
        raise UserError(f"{path} is not a recompress checkpoint (needs {SPEC_FILE} and {WEIGHTS_FILE})",
                        "pass a folder written by 'recompress train' or 'recompress checkpoint'")
    return ModelSpec.from_json(spec_path.read_text(), str(spec_path)), weights_path


def open_weights(weights_path: Path, expected: dict[str, Tensor]) -> TensorFile:
    """The weights file, holding exactly the tensors of the model state ``expected``, with their shapes."""
    f = readable(weights_path, lambda: TensorFile(weights_path))
    missing, extra = sorted(set(expected) - set(f.keys())), sorted(set(f.keys()) - set(expected))
    if missing or extra:
        raise UserError(f"{weights_path} disagrees with {SPEC_FILE}: missing {missing[:3]}, unexpected {extra[:3]}",
                        "the spec and weights come from different models; re-create the checkpoint")
    for k, e in f.entries.items():
        if e.shape != tuple(expected[k].shape):
            raise UserError(f"{weights_path}: tensor {k!r} has shape {list(e.shape)} but {SPEC_FILE} implies "
                            f"{list(expected[k].shape)}", "the spec and weights disagree; re-create the checkpoint")
    return f


def read_tensor(f: TensorFile, key: str, like: Tensor) -> Tensor:
    """Tensor ``key`` of ``f`` in the dtype of the model's ``like``, refused if it holds NaN/Inf.

    One of MAP_BYTES or more is not copied: it is a private, copy-on-write map of the file
    (:class:`~recompress.blockfile.PrivateMap`: the file is never changed), paged in when used; it is
    checked in row blocks whose pages are then given back, so reading a table costs no memory that grows
    with its rows, and only what a caller writes (fine-tuning) becomes the process's own memory. Smaller
    tensors are read.
    """
    e = f.entries[key]
    t = readable(f.path, lambda: f.mapped(key) if e.nbytes >= MAP_BYTES else f.read(key))
    for s, block in row_blocks(t):
        check_finite(key, block, str(f.path))
        if t.dim():
            f.release(key, s, s + len(block))
    return t if t.dtype == like.dtype else t.to(like.dtype)


def model_shell(spec: ModelSpec) -> nn.Module:
    """The model ``spec`` describes, its tables' stored tensors shapes only (nothing of their size is
    allocated): what describing a checkpoint needs, and what loading one assigns its tensors to."""
    return build_model(spec, {t.name: empty_table(t, unallocated=True) for t in spec.tables})


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a native checkpoint folder, validating it completely; its tables are mapped, not copied
    (:func:`read_tensor`)."""
    path = Path(path)
    spec, weights_path = read_spec(path)
    model = model_shell(spec)
    expected = model.state_dict()
    f = open_weights(weights_path, expected)
    state = {k: read_tensor(f, k, expected[k]) for k in sorted(expected)}
    model.load_state_dict(state, assign=True)
    model.eval()
    return Checkpoint(model, spec, path)
