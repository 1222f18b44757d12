"""Typed parameters declared once and turned into CLI options, recipe keys and validation (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """One typed parameter: ``--name`` on the CLI and ``name`` in recipes."""

    name: str
    type: type
    help: str
    default: Any = None
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return f"--{self.name.replace('_', '-')}"
