"""Parity for targets whose artifact is a checkpoint in an upstream layout: read it back through the adapter
that reads that layout (with the ``--hp`` it needs) and score the parity batch with the family's scorer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def run(folder: Path, manifest: dict[str, Any], inputs: dict[str, torch.Tensor]) -> np.ndarray:
    from recompress.adapters import load_any
    from recompress.models import family_of
    ckpt = load_any(folder / manifest["file"], manifest.get("hp") or None)
    with torch.no_grad():
        return family_of(ckpt.spec).scorer(ckpt.model).eval()(**inputs).numpy()
