"""The native checkpoint: a folder with ``spec.json`` (ModelSpec) and ``weights.safetensors``.

Loading never unpickles. Every tensor is checked against the spec (names, shapes, finiteness)
before the model sees it, so a damaged or mismatched checkpoint fails with one clear line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .blockfile import check_finite
from .errors import UserError
from .models import build_model
from .outputs import output_dir
from .spec import ModelSpec

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.safetensors"


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


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a native checkpoint folder, validating it completely."""
    path = Path(path)
    spec, weights_path = read_spec(path)
    model = build_model(spec)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            keys = set(f.keys())
            check_keys(weights_path, expected, keys)
            state = {}
            for k in sorted(keys):
                t = f.get_tensor(k)
                check_shape(weights_path, k, t.shape, expected[k])
                check_finite(k, t, str(weights_path))
                state[k] = t
    except SafetensorError as e:
        raise UserError(f"{weights_path} is not a readable safetensors file ({e})",
                        "the file is truncated or corrupt; copy it again or re-create it") from None
    except (OSError, RuntimeError) as e:
        raise UserError(f"{weights_path} could not be read ({e})",
                        "the file is truncated or corrupt; copy it again or re-create it") from None
    model.load_state_dict(state)
    model.eval()
    return Checkpoint(model, spec, path)
