"""recompress's own format (spec.json + weights.safetensors)."""

from __future__ import annotations

from pathlib import Path

from recompress.checkpoint import Checkpoint, is_native, load_checkpoint

NAME = "recompress"


def sniff(path: Path) -> bool:
    return is_native(path)


def read(path: Path) -> Checkpoint:
    return load_checkpoint(path)
