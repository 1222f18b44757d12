"""Embedding tables: one interface (``Table``) and every stored kind.

Models hold tables and know only the interface; the compress stage builds tables of other kinds from
trained ones. Kinds register themselves when their module is imported; ``empty_table(spec)`` imports
them all, so it can rebuild any kind from a checkpoint's spec. Names are imported on first use, so the
torch-free byte accounting (``rowformat``) can be read without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["DenseTable", "FactorizedTable", "Table", "collapse_factorized", "empty_table", "offsets_to_bags", "pool"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module(".base", __name__), name)
    raise AttributeError(name)
