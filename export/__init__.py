"""Export stage: a Checkpoint -> a folder with the artifact and ``manifest.json``.

Targets are listed in ``targets.py`` (one module each, ``NAME``, ``build(ckpt, folder, inputs, opts) -> dict``
and ``run(folder, manifest, inputs)``); ``runner.export_checkpoint`` does what every target shares: the
output folder, sample inputs, the parity check against the stored checkpoint and the manifest. Names are
imported on first use, so the CLI can list the targets without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {"export_checkpoint": "runner", "read_manifest": "manifest", "MANIFEST": "manifest"}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
