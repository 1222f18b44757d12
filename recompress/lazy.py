"""Deferred imports: the CLI builds its options from the method registry without importing torch, so
``recompress --help`` answers at once. A method module writes ``torch = lazy("torch")`` and uses it as usual."""

from __future__ import annotations

import importlib
from typing import Any


class lazy:
    """A module imported on first attribute access."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)
