"""Model families, built from a ModelSpec. Add a family by adding it to FAMILIES."""

from __future__ import annotations

from torch import nn

from recompress.errors import UserError
from recompress.spec import ModelSpec

from .dlrm import DLRM

FAMILIES: dict[str, type[nn.Module]] = {"dlrm": DLRM}


def build_model(spec: ModelSpec) -> nn.Module:
    """An uninitialized model with every shape taken from ``spec``."""
    try:
        cls = FAMILIES[spec.family]
    except KeyError:
        raise UserError(f"unknown model family {spec.family!r}",
                        f"known families: {', '.join(sorted(FAMILIES))}") from None
    try:
        return cls.from_spec(spec)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"the model spec is inconsistent: {e}", "re-create the checkpoint") from None
