"""``lowrank``: store a trained n x d table as (n x r)(r x d) by truncated SVD. No data, keeps the width d."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from recompress.errors import UserError
from recompress.lazy import lazy

from .registry import Context, Method, Param, register

if TYPE_CHECKING:
    import torch

    from recompress.checkpoint import Checkpoint
    from recompress.tables import FactorizedTable

torch = lazy("torch")
linalg = lazy("recompress.linalg")
tables = lazy("recompress.tables")


def factorize(weight: torch.Tensor, rank: int) -> tuple[FactorizedTable, float]:
    """Optimal rank-``rank`` factorization (Eckart-Young) and its relative Frobenius error."""
    basis, vals = linalg.principal_basis(linalg.gram(weight), rank)
    step = linalg.CHUNK_ROWS
    left = torch.cat([weight[s:s + step].double() @ basis for s in range(0, weight.shape[0], step)]).float()
    err = math.sqrt(float(vals[rank:].sum() / vals.sum())) if float(vals.sum()) > 0 else 0.0
    return tables.FactorizedTable(weight.shape[0], weight.shape[1], rank, left, basis.T.float()), err


def apply(ckpt: Checkpoint, params: dict[str, Any], ctx: Context) -> Checkpoint:
    rank = params["rank"]
    if rank is None or rank < 1:
        raise UserError(f"lowrank needs --rank >= 1 (got {rank})", "e.g. --rank 4")
    report = {}
    for name in ctx.select.pick(ckpt):
        t = ckpt.model.tables[name]
        if rank >= t.dim:
            raise UserError(f"--rank {rank} is not below table {name}'s width {t.dim}: nothing to save",
                            f"choose a rank below {t.dim}")
        new, err = factorize(t.dense_weight(), rank)
        if new.stored_bytes() >= t.stored_bytes():
            report[name] = {"skipped": f"rank {rank} saves nothing on {t.rows} rows"}
            continue
        report[name] = {"rel_error": round(err, 6), "bytes_before": t.stored_bytes(), "bytes_after": new.stored_bytes()}
        ckpt.model.tables[name] = new
    ckpt.spec.history.append({"method": "lowrank", "params": {"rank": rank}, "tables": report})
    return ckpt


register(Method(
    name="lowrank",
    help="truncated SVD: n x d -> (n x rank)(rank x d); keeps the model's width, no data needed",
    params=(Param("rank", int, "inner rank of the factorized table (lowrank)"),),
    accepts=frozenset({"dense"}),
    needs_data=lambda p: False,
    trains=lambda p: False,
    apply=apply,
))
