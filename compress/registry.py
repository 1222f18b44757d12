"""The one method registry: each compression method declares its parameters once; the CLI options,
recipe keys and validation all come from that declaration. Methods compose left to right.

This module and the method modules import torch only when a method runs (``recompress.lazy``), so the
CLI can build its options from the registry at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from recompress.errors import UserError
from recompress.params import Param
from recompress.trainconfig import TrainConfig

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch import Tensor

    from recompress.checkpoint import Checkpoint
    from recompress.data.ctr import CTRDataset

    Blocks = Callable[[], Iterator[tuple[str, int, Tensor]]]  # (tensor key within the table, first row, rows)


FINETUNE = Param("finetune", bool, "fine-tune the model on --data after compressing (budget: --epochs/--steps/--lr)", False)
RATIO = Param("ratio", float, "target: this many times fewer bytes per selected table (tt, hash, qr, freqhash)")


class NoSaving(Exception):
    """A --ratio target cannot be met on this (small) table; the method leaves it as it is."""


def describe(name: str, params: dict[str, Any]) -> str:
    """``hash --ratio 16 --finetune``: a method call as the user would have typed it."""
    flags = [f"{Param(k, object, '').flag}" + ("" if v is True else f" {v}")
             for k, v in params.items() if v is not None and v is not False]
    return " ".join([name, *flags])


@dataclass
class Selection:
    """Which tables a method touches: the named ones, or (none named) every table of a role the model's
    family compresses (a DLRM's sparse features; a sequential model's item table, not its positions),
    with at least ``min_rows`` rows."""

    names: tuple[str, ...] = ()
    min_rows: int = 0

    def pick(self, ckpt: Checkpoint) -> list[str]:
        from recompress.models import family_of
        tables = ckpt.model.tables
        unknown = [n for n in self.names if n not in tables]
        if unknown:
            raise UserError(f"unknown table(s) {', '.join(unknown)}", f"tables are: {', '.join(tables)}")
        roles = {t.name: t.role for t in ckpt.spec.tables}
        wanted = family_of(ckpt.spec).compressible
        return [n for n, t in tables.items()
                if (n in self.names if self.names else roles.get(n, "sparse_feature") in wanted) and t.rows >= self.min_rows]


@dataclass
class Context:
    """What a method may use besides the checkpoint: data and a fine-tune budget."""

    data: CTRDataset | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    select: Selection = field(default_factory=Selection)


@dataclass(frozen=True)
class Method:
    """A compression method: ``apply(ckpt, params, ctx)`` returns a new Checkpoint.

    ``accepts`` lists the table forms (kind, or kind+storage such as ``tt+int8``) it can read; ``ANY_KIND``
    stands for every kind still in float storage, and None for every form;
    ``needs_data(params)`` says whether it needs a dataset (fine-tuning, id frequencies); ``trains(params)``
    whether it runs the training loop (reports then show the baseline trained with the same budget);
    ``fresh``, if given, builds a randomly initialized table of the method's kind for training from scratch;
    ``stream``, if given, is ``apply`` for tables that stay in their file (``compress/stream.py``);
    ``reads_tables``: whether it computes from the tables' values (``check_sharding``).
    """

    name: str
    help: str
    params: tuple[Param, ...]
    accepts: frozenset[str] | None
    needs_data: Callable[[dict[str, Any]], bool]
    apply: Callable[[Checkpoint, dict[str, Any], Context], Checkpoint]
    fresh: Callable[..., Any] | None = None  # (name, rows, dim, params, seed, train id counts) -> Table
    trains: Callable[[dict[str, Any]], bool] = lambda p: bool(p.get("finetune"))
    stream: Callable[..., tuple[Checkpoint, dict[str, Blocks]]] | None = None  # see compress/stream.py
    reads_tables: bool = True  # it computes from the tables' values (every method but finetune)


@dataclass
class Step:
    """One method in a composition, with its own parameters and (optionally) its own table selection."""

    method: Method
    params: dict[str, Any] = field(default_factory=dict)
    select: Selection | None = None

    def own_params(self) -> dict[str, Any]:
        return {p.name: self.params.get(p.name, p.default) for p in self.method.params}


METHODS: dict[str, Method] = {}
ANY_KIND = "*"  # in ``Method.accepts``: any table kind whose rows are not yet stored row-wise


def reads(method: Method, form: str) -> bool:
    if method.accepts is None:
        return True
    return form in method.accepts or (ANY_KIND in method.accepts and "+" not in form)


def _accepted(method: Method) -> str:
    return ", ".join("any kind in float storage" if a == ANY_KIND else a for a in sorted(method.accepts))


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def all_params(methods: list[Method] | None = None) -> dict[str, Param]:
    """Every parameter of every method (or of ``methods``), by name (a name means the same everywhere)."""
    out: dict[str, Param] = {}
    for m in METHODS.values() if methods is None else methods:
        for p in m.params:
            out.setdefault(p.name, p)
    return out


def get_method(name: str) -> Method:
    if name not in METHODS:
        import difflib
        import re
        if re.fullmatch(r"(u?int|fp|bf)\d+", name):
            from recompress.tables.rowformat import FORMATS
            raise UserError(f"{name} is not a supported row-wise format", f"use one of {', '.join(FORMATS)}")
        close = difflib.get_close_matches(name, METHODS, n=1)
        raise UserError(f"unknown method {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                        f"choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


def parse_selection(text: str) -> Selection:
    """``>=N`` (tables with at least N rows) or table names joined by ``+``."""
    if text.startswith(">="):
        try:
            return Selection(min_rows=int(text[2:]))
        except ValueError:
            raise UserError(f"bad table selection {text!r}", "write >=ROWS, e.g. tt@>=100000") from None
    return Selection(names=tuple(n for n in text.split("+") if n))


def parse_methods(text: str, params: dict[str, Any] | None = None) -> list[Step]:
    """``tt@>=100000,int8`` -> steps; ``METHOD@SELECTION`` limits one step to some tables."""
    parts = [n.strip() for n in text.split(",") if n.strip()]
    if not parts:
        raise UserError("no compression method given", f"choose from {', '.join(sorted(METHODS))}")
    steps = []
    for part in parts:
        name, _, sel = part.partition("@")
        steps.append(Step(get_method(name), dict(params or {}), parse_selection(sel) if sel else None))
    return steps


def fresh_tables(method: str, params: dict[str, Any], min_rows: int, seed: int) -> Callable[..., Any]:
    """The table factory ``train_model`` calls to train tables in ``method``'s form from scratch: it builds
    tables with at least ``min_rows`` rows of a compressible role; others (and those too small for a
    ``--ratio``) stay dense."""
    m = get_method(method)
    if m.fresh is None:
        raise UserError(f"{method} is a post-training method with no from-scratch form",
                        f"train dense, then run 'recompress checkpoint --method {method}'")

    def make(table: Any, counts: Any, compressible: tuple[str, ...]) -> Any:
        if table.role not in compressible or table.rows < min_rows:
            return None
        try:
            return m.fresh(table.name, table.rows, table.dim, params, seed, counts)
        except NoSaving:
            return None
    return make


def trains(steps: list[Step]) -> bool:
    """Whether a composition runs the training loop (and so gets extra training besides compression)."""
    return any(s.method.trains(s.own_params()) for s in steps)


def check_sharding(steps: list[Step], train: TrainConfig) -> None:
    """With ``--shard-tables`` a fine-tune ends with the sharded tables whole on rank 0 only (the other ranks
    keep their shapes, no values), so no step that reads table values may follow one in the same run."""
    if not train.shard:
        return
    tuned = [i for i, s in enumerate(steps) if s.method.trains(s.own_params())]
    later = [s.method.name for s in steps[tuned[0] + 1:] if s.method.reads_tables] if tuned else []
    if later:
        raise UserError(f"with --shard-tables, {later[0]} cannot follow a fine-tune in the same run: the ranks "
                        "other than 0 end the fine-tune without the sharded tables' values",
                        f"run it on the checkpoint this run writes: recompress checkpoint OUT --method "
                        f"{','.join(later)} (with --nproc and --shard-tables if it fine-tunes)")


def check_step(step: Step, ckpt: Checkpoint, ctx: Context) -> Context:
    """The context ``step`` runs in (its own table selection), after checking its data needs and that it
    selects at least one table, of forms it can read."""
    m, mine = step.method, step.own_params()
    if m.needs_data(mine) and ctx.data is None:
        raise UserError(f"{describe(m.name, mine)} needs a dataset (to fine-tune, or for id frequencies)",
                        "pass --data DATASET_DIR")
    sctx = replace(ctx, select=step.select or ctx.select)
    picked = sctx.select.pick(ckpt)
    if not picked:
        raise UserError(f"no table is selected for {m.name}", "relax the table selection (--tables / --min-rows "
                        "or METHOD@>=ROWS); 'recompress inspect' lists the tables and their rows")
    bad = sorted({f for f in (ckpt.model.tables[n].form for n in picked) if not reads(m, f)})
    if bad:
        raise UserError(f"{m.name} cannot read {', '.join(bad)} tables (it takes {_accepted(m)})",
                        f"put {m.name} before the method that made them in a composition, or leave them out with "
                        "--tables ('recompress inspect' lists each table's kind)")
    return sctx


def compress(ckpt: Checkpoint, steps: list[Step], ctx: Context) -> Checkpoint:
    """Apply ``steps`` in order, validating each one's input forms and data needs first. The result is no
    longer what the file it was read from holds: it is marked ``modified`` (an export records no source file
    for it; the file stays an input no output may overwrite)."""
    for step in steps:
        ckpt = step.method.apply(ckpt, step.own_params(), check_step(step, ckpt, ctx))
    if steps:
        ckpt.modified = True
    return ckpt


from . import finetune, hashing, lowrank, mlet, quantize, tt  # noqa: F401  (each module registers its methods)
