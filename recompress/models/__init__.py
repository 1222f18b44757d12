"""Model families' modules and their ``Family`` implementations (declared in ``recompress/families.py``)."""

from __future__ import annotations

from torch import nn

from recompress.errors import UserError
from recompress.spec import ModelSpec
from recompress.tables import Table

from .family import Family, family_of


def build_model(spec: ModelSpec, tables: dict[str, Table] | None = None) -> nn.Module:
    """An uninitialized model with every shape taken from ``spec`` (its tables ``tables`` when given)."""
    family = family_of(spec)
    try:
        return family.from_spec(spec) if tables is None else family.build(spec, tables)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"the model spec is inconsistent: {e}", "re-create the checkpoint") from None


__all__ = ["Family", "build_model", "family_of"]
