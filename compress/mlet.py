"""``mlet``: multi-layer embedding training (Ghaemmaghami et al. 2020), from a trained checkpoint.

Without ``dim``: collapse tables still in two-layer form (``left @ right``) to plain tables; exact, no data.
With ``dim`` d below the current width D, post-training MLET:

1. The model family cuts its width to d along a basis Q (D x d) it chooses (DLRM: the top principal
   directions of the vectors entering the dot interaction, so pairwise dots survive the cut).
2. Selected tables become two-layer: ``left`` = the trained table rotated into a basis whose first d
   columns are Q (width ``hidden`` k >= d; k > D adds fresh columns), ``right`` = [I_d; 0], so the
   product starts at exactly W Q.
3. Fine-tune everything with the family's loss in the shared training loop (keeping the best validation
   checkpoint), then collapse to n x d tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from recompress.errors import UserError
from recompress.lazy import lazy

from .posttrain import val_metrics
from .registry import Context, Method, Param, register

if TYPE_CHECKING:
    import torch

    from recompress.checkpoint import Checkpoint
    from recompress.tables import FactorizedTable

torch = lazy("torch")
linalg = lazy("recompress.linalg")
tables = lazy("recompress.tables")
training = lazy("recompress.training")
models = lazy("recompress.models")


def two_layer_init(weight: torch.Tensor, q: torch.Tensor, hidden: int, gen: torch.Generator) -> FactorizedTable:
    """left @ right == weight @ q exactly; left keeps as much of the trained table as ``hidden`` allows."""
    n, D = weight.shape
    d = q.shape[1]
    p = torch.eye(D) - q @ q.T
    w64 = weight.double()
    rest, _ = linalg.principal_basis(p.double() @ (w64.T @ w64) @ p.double(), max(0, min(hidden, D) - d))
    basis = torch.cat([q.double(), rest], dim=1)  # [D, min(k, D)], orthonormal, first d columns = Q
    left = (w64 @ basis).float()
    if hidden > D:
        scale = float(weight.std()) * 0.1 or 1e-3
        left = torch.cat([left, torch.randn(n, hidden - D, generator=gen) * scale], dim=1)
    right = torch.zeros(hidden, d)
    right[:d] = torch.eye(d)
    return tables.FactorizedTable(n, d, hidden, left, right)


def apply(ckpt: Checkpoint, params: dict[str, Any], ctx: Context) -> Checkpoint:
    d, hidden = params["dim"], params["hidden"]
    model = ckpt.model
    entry: dict[str, Any] = {"method": "mlet", "params": {"dim": d, "hidden": hidden}}
    if d is None:
        if hidden is not None:
            raise UserError("--hidden without --dim", "pass --dim to reduce the width, or neither to collapse")
        done = tables.collapse_factorized(model.tables, ctx.select.pick(ckpt))
        if not done:
            raise UserError("no selected table is in two-layer form, so there is nothing to collapse",
                            "pass --dim D to reduce the embedding width with post-training MLET")
        entry["collapsed"] = done
        ckpt.spec.history.append(entry)
        return ckpt
    D = next(iter(model.tables.values())).dim
    hidden = D if hidden is None else hidden
    entry["params"]["hidden"] = hidden
    if d < 1:
        raise UserError(f"--dim {d} is impossible", f"an embedding is at least 1 wide; pick --dim from 1 to {D - 1}")
    if d >= D:
        raise UserError(f"--dim {d} is not below the current embedding width {D}",
                        f"post-training MLET only reduces the width; pick --dim from 1 to {D - 1}")
    if hidden < d:
        raise UserError(f"--hidden {hidden} is smaller than --dim {d}",
                        "MLET's hidden layer must be at least as wide as the output (k >= d)")
    family = models.family_of(ckpt.spec)
    entry["before"] = val_metrics(ckpt, ctx)
    gen = torch.Generator().manual_seed(ctx.train.seed)
    entry.update(family.reduce_width(ckpt, d, ctx, lambda w, q: two_layer_init(w, q, hidden, gen)))
    entry["projected"] = val_metrics(ckpt, ctx)
    entry["finetune"] = training.fit(ckpt.model, ctx.data, ctx.train, family, desc=f"mlet d={d} fine-tune")
    entry["collapsed"] = tables.collapse_factorized(ckpt.model.tables, list(ckpt.model.tables))
    ckpt.spec.history.append(entry)
    return ckpt


register(Method(
    name="mlet",
    help="multi-layer embedding: --dim d cuts the width (SVD init, fine-tune, collapse); alone, collapses two-layer tables",
    params=(Param("dim", int, "target embedding width (mlet)"),
            Param("hidden", int, "MLET hidden width k >= dim (default: the current width)")),
    accepts=frozenset({"dense", "factorized"}),
    needs_data=lambda p: p.get("dim") is not None,
    apply=apply,
    trains=lambda p: p.get("dim") is not None,
))
