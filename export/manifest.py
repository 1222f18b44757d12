"""``manifest.json``: what an export folder holds, where it came from, and how well it matches torch."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from recompress.errors import UserError
from recompress.outputs import kind_of

MANIFEST = "manifest.json"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("recompress", "torch", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` is an export recompress wrote: a ``manifest.json`` that names its target and file (any
    other ``manifest.json``, someone else's, leaves the folder what it otherwise is)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return False
    if kind_of(Path(folder)) == "export":  # ours, even with a damaged manifest (read_manifest says so)
        return True
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(m, dict) and {"target", "file", "parity"} <= m.keys()


def checkpoint_in(folder: str | Path, hp: dict[str, str] | None = None) -> tuple[Path, dict[str, str]] | None:
    """For an export in an upstream layout (``--target dlrm|torchrec``: a checkpoint the adapters read), its file
    and the hyper-parameters to read it with (its manifest's; ``hp`` win); None for any other folder."""
    if not is_export(folder):
        return None
    m = read_manifest(folder)
    if not m.get("artifact_is_checkpoint"):
        return None
    return Path(folder) / m["file"], {**(m.get("hp") or {}), **(hp or {})}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST if folder.is_dir() else None
    if path is None or not path.is_file():
        raise UserError(f"{folder} is not an export folder (no {MANIFEST})",
                        "pass a folder written by 'recompress export'")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg})", "re-run the export") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    check_files(folder, files if isinstance(files, dict) else {})
    return manifest


def check_files(folder: Path, files: dict[str, int]) -> None:
    """Refuse an export whose files are not the sizes its manifest records (truncated, half-copied, missing)."""
    for name, size in files.items():
        f = folder / name
        have = f.stat().st_size if f.is_file() else None
        if have != size:
            said = "is missing" if have is None else f"is {have:,} bytes; its manifest records {size:,}"
            raise UserError(f"{f} {said}: the export is damaged or incomplete",
                            "export it again (or copy the whole folder again)")
