"""``lowrank``: store a trained n x d table as (n x r)(r x d) by truncated SVD. No data, keeps the width d.

The right factor comes from the eigenvectors of the table's d x d Gram matrix (accumulated over row
chunks), the left one is the table times that basis, chunk by chunk; so a table that stays in its file
(``compress/stream.py``) is read twice and written in blocks, never loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from recompress.errors import UserError
from recompress.lazy import lazy

from .registry import Context, Method, Param, register

if TYPE_CHECKING:
    import torch

    from recompress.blockfile import Rows
    from recompress.checkpoint import Checkpoint

    from .registry import Blocks

torch = lazy("torch")
linalg = lazy("recompress.linalg")
tables = lazy("recompress.tables")


def principal(rows: Rows, rank: int) -> tuple[torch.Tensor, float]:
    """The top-``rank`` right singular vectors [d, rank] (float64) and the relative Frobenius error of the
    optimal rank-``rank`` approximation (Eckart-Young)."""
    basis, vals = linalg.principal_basis(linalg.gram(rows), rank)
    err = math.sqrt(float(vals[rank:].sum() / vals.sum())) if float(vals.sum()) > 0 else 0.0
    return basis, err


def left_blocks(rows: Rows, basis: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows x basis) in chunks: the left factor of the truncated SVD."""
    step = linalg.chunk_rows(rows.shape[1])
    for s in range(0, rows.shape[0], step):
        yield s, (rows[s:s + step].double() @ basis).float()


def apply(ckpt: Checkpoint, params: dict[str, Any], ctx: Context,
          sources: dict[str, Rows] | None = None) -> tuple[Checkpoint, dict[str, Blocks]]:
    """Factorize every selected table; one in ``sources`` (its rows in a file) becomes a table whose left
    factor is on the meta device, computed by the returned block generator."""
    rank = params["rank"]
    if rank is None or rank < 1:
        raise UserError(f"lowrank needs --rank >= 1 (got {rank})", "e.g. --rank 4")
    report, blocks = {}, {}
    for name in ctx.select.pick(ckpt):
        t = ckpt.model.tables[name]
        if rank >= t.dim:
            raise UserError(f"--rank {rank} is not below table {name}'s width {t.dim}: nothing to save",
                            f"choose a rank below {t.dim}")
        with torch.device("meta"):
            new = tables.FactorizedTable(t.rows, t.dim, rank)
        if new.stored_bytes() >= t.stored_bytes():
            report[name] = {"skipped": f"rank {rank} saves nothing on {t.rows} rows"}
            continue
        src = sources.get(name) if sources else None
        rows = src if src is not None else t.dense_weight()
        basis, err = principal(rows, rank)
        if src is None:
            new = tables.FactorizedTable(t.rows, t.dim, rank, torch.cat([b for _, b in left_blocks(rows, basis)]),
                                         basis.T.float())
        else:
            new.right = torch.nn.Parameter(basis.T.float())
            blocks[name] = _blocks(src, basis)
        report[name] = {"rel_error": round(err, 6), "bytes_before": t.stored_bytes(), "bytes_after": new.stored_bytes()}
        ckpt.model.tables[name] = new
    ckpt.spec.history.append({"method": "lowrank", "params": {"rank": rank}, "tables": report})
    return ckpt, blocks


def _blocks(src: Rows, basis: torch.Tensor) -> Callable[[], Iterator[tuple[str, int, torch.Tensor]]]:
    return lambda: (("left", s, b) for s, b in left_blocks(src, basis))


register(Method(
    name="lowrank",
    help="truncated SVD: n x d -> (n x rank)(rank x d); keeps the model's width, no data needed",
    params=(Param("rank", int, "inner rank of the factorized table (lowrank)"),),
    accepts=frozenset({"dense"}),
    needs_data=lambda p: False,
    trains=lambda p: False,
    apply=lambda ckpt, params, ctx: apply(ckpt, params, ctx)[0],
    stream=apply,
))
