"""Export stage: a Checkpoint -> a folder with the artifact and ``manifest.json``.

Targets live in TARGETS (one module each, ``NAME`` and ``build(ckpt, folder, inputs, opts) -> dict``);
``export_checkpoint`` does what every target shares: the atomic output folder, sample inputs, the
parity check against torch and the manifest.
"""

from __future__ import annotations

from .manifest import MANIFEST, read_manifest
from .runner import TARGETS, export_checkpoint

__all__ = ["MANIFEST", "TARGETS", "export_checkpoint", "read_manifest"]
