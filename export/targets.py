"""The export targets: name -> module (imported when used). Add a target by adding one module and a line here."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from recompress.errors import UserError

TARGETS: dict[str, str] = {"onnx": "recompress.export.onnx", "trt": "recompress.export.tensorrt",
                           "dlrm": "recompress.export.dlrm_file", "torchrec": "recompress.export.torchrec_file"}


def load_target(name: str) -> ModuleType:
    if name not in TARGETS:
        raise UserError(f"unknown export target {name!r}", f"choose from {', '.join(TARGETS)}")
    return import_module(TARGETS[name])
