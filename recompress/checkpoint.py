"""The native checkpoint: a folder with ``spec.json`` (ModelSpec) and ``weights.safetensors``.

Loading never unpickles. Every tensor is checked against the spec (names, shapes, finiteness)
before the model sees it, so a damaged or mismatched checkpoint fails with one clear line.
"""

from __future__ import annotations

import errno
import hashlib
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .blockfile import TensorFile, check_finite
from .errors import UserError
from .models import build_model
from .outputs import output_dir
from .spec import ModelSpec
from .tables import empty_table

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.safetensors"
CHECK_BYTES = 1 << 24  # rows checked for NaN/Inf at a time while loading (then their pages are given back)
MAP_BYTES = 1 << 24  # tensors this large are mapped from the weights file; smaller ones are read (copied)


@dataclass
class Checkpoint:
    """A model with its spec, as every stage after the adapters sees it."""

    model: nn.Module
    spec: ModelSpec
    path: Path | None = None


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


def check_keys(weights_path: Path, expected: dict[str, tuple[int, ...]], found: set[str]) -> None:
    """The weights file holds exactly the tensors the spec implies."""
    missing, extra = sorted(set(expected) - found), sorted(found - set(expected))
    if missing or extra:
        raise UserError(f"{weights_path} disagrees with {SPEC_FILE}: missing {missing[:3]}, unexpected {extra[:3]}",
                        "the spec and weights come from different models; re-create the checkpoint")


def check_shape(weights_path: Path, key: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise UserError(f"{weights_path}: tensor {key!r} has shape {list(shape)} but {SPEC_FILE} "
                        f"implies {list(expected)}", "the spec and weights disagree; re-create the checkpoint")


def model_shell(spec: ModelSpec) -> nn.Module:
    """The model ``spec`` describes, its tables' stored tensors shapes only (nothing of their size is
    allocated): what describing a checkpoint needs, and what loading one assigns its mapped tensors to."""
    return build_model(spec, {t.name: empty_table(t, unallocated=True) for t in spec.tables})


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a native checkpoint folder, validating it completely.

    Tensors of MAP_BYTES or more are not copied: each is a private, copy-on-write map of the weights file
    (the file is never changed), paged in when used. Finiteness is checked in row blocks whose pages are
    then given back, so loading a table costs no memory that grows with its rows; evaluating it costs the
    pages its lookups touch, and only what a caller writes (fine-tuning) becomes the process's own memory.
    As with any mapped file, the file must not be rewritten in place while the model is in use (recompress
    never does: it writes a new folder and renames it); a truncated file would end the process (SIGBUS).
    """
    path = Path(path)
    spec, weights_path = read_spec(path)
    model = model_shell(spec)
    expected = model.state_dict()
    try:
        f = TensorFile(weights_path)
        check_keys(weights_path, {k: tuple(v.shape) for k, v in expected.items()}, set(f.keys()))
        state = {}
        for k in sorted(expected):
            check_shape(weights_path, k, f.entries[k].shape, tuple(expected[k].shape))
            t = f.mapped(k) if f.entries[k].nbytes >= MAP_BYTES else f.read(k)
            step = max(1, CHECK_BYTES // max(1, f.entries[k].row_bytes))
            for s in range(0, len(t) if t.dim() else 0, step):
                check_finite(k, t[s:s + step], str(weights_path))
                f.release(k, s, s + step)
            if not t.dim():
                check_finite(k, t, str(weights_path))
            state[k] = t if t.dtype == expected[k].dtype else t.to(expected[k].dtype)
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise UserError(f"{weights_path} could not be mapped into memory ({e})",
                            "the system refuses to map a file this large (vm.overcommit_memory=2?); compress it "
                            "without --data first: data-free methods stream it in row blocks") from None
        raise UserError(f"{weights_path} could not be read ({e})",
                        "the file is truncated or corrupt; copy it again or re-create it") from None
    model.load_state_dict(state, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors {left} were not loaded from {weights_path}")
    model.eval()
    return Checkpoint(model, spec, path)
