"""The one method registry: each compression method declares its parameters once; the CLI options,
recipe keys and validation all come from that declaration. Methods compose left to right."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from recompress.checkpoint import Checkpoint
from recompress.data.ctr import CTRDataset
from recompress.errors import UserError
from recompress.training import TrainConfig


@dataclass(frozen=True)
class Param:
    """One typed method parameter (becomes ``--name`` on the CLI and ``name`` in recipes)."""

    name: str
    type: type
    help: str
    default: Any = None


@dataclass
class Selection:
    """Which tables a method touches: named ones (all if none named) with at least ``min_rows`` rows."""

    names: tuple[str, ...] = ()
    min_rows: int = 0

    def pick(self, ckpt: Checkpoint) -> list[str]:
        tables = ckpt.model.tables
        unknown = [n for n in self.names if n not in tables]
        if unknown:
            raise UserError(f"unknown table(s) {', '.join(unknown)}", f"tables are: {', '.join(tables)}")
        return [n for n, t in tables.items() if (not self.names or n in self.names) and t.rows >= self.min_rows]


@dataclass
class Context:
    """What a method may use besides the checkpoint: data and a fine-tune budget."""

    data: CTRDataset | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    select: Selection = field(default_factory=Selection)


@dataclass(frozen=True)
class Method:
    """A compression method: ``apply(ckpt, params, ctx)`` returns a new Checkpoint.

    ``accepts`` lists the table kinds it can read; ``needs_data(params)`` says whether it must fine-tune.
    """

    name: str
    help: str
    params: tuple[Param, ...]
    accepts: frozenset[str]
    needs_data: Callable[[dict[str, Any]], bool]
    apply: Callable[[Checkpoint, dict[str, Any], Context], Checkpoint]


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def all_params() -> dict[str, Param]:
    """Every parameter of every method, by name (a name means the same thing in every method)."""
    out: dict[str, Param] = {}
    for m in METHODS.values():
        for p in m.params:
            out.setdefault(p.name, p)
    return out


def parse_methods(text: str) -> list[Method]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("no compression method given", f"choose from {', '.join(sorted(METHODS))}")
    out = []
    for n in names:
        if n not in METHODS:
            import difflib
            close = difflib.get_close_matches(n, METHODS, n=1)
            raise UserError(f"unknown method {n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                            f"choose from {', '.join(sorted(METHODS))}")
        out.append(METHODS[n])
    return out


def compress(ckpt: Checkpoint, methods: list[Method], params: dict[str, Any], ctx: Context) -> Checkpoint:
    """Apply ``methods`` in order, validating each one's input kinds and data needs first."""
    for m in methods:
        mine = {p.name: params.get(p.name, p.default) for p in m.params}
        if m.needs_data(mine) and ctx.data is None:
            raise UserError(f"method {m.name} with {mine} fine-tunes on data", "pass --data DATASET_DIR")
        picked = ctx.select.pick(ckpt)
        if not picked:
            raise UserError(f"no table is selected for {m.name}", "relax --tables / --min-rows")
        kinds = {ckpt.model.tables[n].kind for n in picked}
        if not kinds <= m.accepts:
            raise UserError(f"{m.name} cannot read {', '.join(sorted(kinds - m.accepts))} tables "
                            f"(it takes {', '.join(sorted(m.accepts))})", "reorder the methods in the composition")
        ckpt = m.apply(ckpt, mine, ctx)
    return ckpt


from . import lowrank, mlet  # noqa: E402,F401  (each module registers its method)
