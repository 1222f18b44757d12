"""Sequence dataset layouts (``data sequences --layout``): whose ids, users, order and evaluation rules a prepared
dataset follows, so that a model trained elsewhere sees the ids and users it was trained on.

A layout is one module here defining ``LAYOUT``, a :class:`Layout`, listed in ``MODULES``: how each user's
interactions are ordered, which readers and options it takes, and :meth:`Layout.plan`, which turns what the
reader found (:class:`Read`) into what ``sequences.write_sequences`` writes (:class:`Plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from recompress.errors import UserError

if TYPE_CHECKING:  # the CLI lists the layouts at start-up, before numpy is needed
    import numpy as np

MODULES = ("native", "sasrec", "recbole", "gr", "torchrec")  # the default first
MAX_ID = 2**31 - 1  # items are stored as int32
OPTIONS = {"items": "names the catalogue of", "seed": "draws the negatives of"}  # settings only some layouts take


@dataclass
class Read:
    """What a reader found: users in order of first appearance, their items and timestamps (or None) in the
    layout's order, and the items in order of first appearance in the file's rows (of the users with at least
    ``Layout.min_items``, where ``Layout.first_seen_of_kept``)."""

    source: Path
    fmt: str
    users: list[str]
    item_lists: list[list[str]]
    time_lists: list[list[float]] | None
    first_seen: list[str]


@dataclass
class Plan:
    """What to write: ``keep_ids`` (the file's integer ids are the rows), ``item_order`` (rows in this order),
    ``catalogue`` (the ids full ranking ranks), ``negatives`` (the sampled protocol's, per user), ``meta``."""

    users: list[str]
    item_lists: list[list[str]]
    time_lists: list[list[float]] | None
    meta: dict[str, Any] = field(default_factory=dict)
    keep_ids: bool = False
    item_order: list[str] | None = None
    catalogue: list[int] | None = None
    negatives: np.ndarray | None = None


class Layout:
    """One layout. ``order``: how a user's interactions are sorted (``time``: ties in file order; ``recbole``: the
    timestamp min-max scaled to float32; ``quicksort``: NumPy's quicksort of the timestamps); ``formats``: the
    readers it takes (None: any); ``options``: the optional settings of ``OPTIONS`` it takes; ``cuts``: whether
    ``--max-len`` may cut sequences."""

    name: ClassVar[str]
    help: ClassVar[str]  # a phrase for --layout's help
    min_items: ClassVar[int] = 3
    order: ClassVar[str] = "time"
    formats: ClassVar[tuple[str, ...] | None] = None
    options: ClassVar[tuple[str, ...]] = ()
    cuts: ClassVar[bool] = True
    first_seen_of_kept: ClassVar[bool] = False

    def parse(self, **options: Any) -> dict[str, Any]:
        """The layout's options, checked before anything is read or written."""
        return options

    def inputs(self, options: dict[str, Any]) -> list[Path]:
        """Files the options name (never overwritten)."""
        return []

    def plan(self, read: Read, *, min_items: int, **options: Any) -> Plan:
        return Plan(read.users, read.item_lists, read.time_lists)


def names() -> list[str]:
    return [get_layout(m).name for m in MODULES]


def get_layout(name: str) -> Layout:
    """The layout called ``name`` (its module ``native`` for ``recompress``)."""
    module = {"recompress": "native"}.get(name, name)
    if module not in MODULES:
        raise UserError(f"unknown layout {name!r}", f"choose from {', '.join(names())}")
    return import_module(f"{__name__}.{module}").LAYOUT


def check_options(layout: Layout, given: dict[str, Any]) -> None:
    """Refuse an option the layout does not take, naming the layouts that do, and any other setting."""
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise UserError(f"sequence files take no setting {unknown[0]!r}", "settings of sequence files: format, "
                        f"max_len, min_items, layout, {', '.join(OPTIONS)}")
    for opt in OPTIONS:
        if given.get(opt) is not None and opt not in layout.options:
            owners = [n for n in names() if opt in get_layout(n).options]
            raise UserError(f"--{opt} {OPTIONS[opt]} --layout {' or '.join(owners)}",
                            f"pass --layout {owners[0]}, or leave --{opt} out")
