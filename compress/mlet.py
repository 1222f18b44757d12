"""``mlet``: multi-layer embedding training (Ghaemmaghami et al. 2020), from a trained checkpoint.

Without ``dim``: collapse tables still in two-layer form (``left @ right``) to plain tables; exact, no data.
With ``dim`` d below the current width D, post-training MLET:

1. Q = the top-d principal directions (D x d) of every vector entering the dot interaction (bottom
   MLP output and pooled embeddings) on a training sample, so pairwise dots survive the cut.
2. Selected tables become two-layer: ``left`` = the trained table rotated into a basis whose first d
   columns are Q (width ``hidden`` k >= d; k > D adds fresh columns), ``right`` = [I_d; 0], so the
   product starts at exactly W Q. Other tables become W Q. The bottom MLP gets a projection Q^T and
   the top MLP's columns that read the bottom vector are multiplied by Q.
3. Fine-tune everything with the shared training loop, then collapse to n x d tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from recompress.errors import UserError
from recompress.lazy import lazy

from .registry import Context, Method, Param, register

if TYPE_CHECKING:
    import torch

    from recompress.checkpoint import Checkpoint
    from recompress.models.dlrm import DLRM

    from .tables import FactorizedTable

torch = lazy("torch")  # noqa: F811
linalg = lazy("recompress.compress.linalg")
tables = lazy("recompress.compress.tables")
training = lazy("recompress.training")
metrics = lazy("recompress.metrics")
dlrm = lazy("recompress.models.dlrm")

SAMPLE_ROWS = 20_000


def interaction_basis(model: DLRM, ctx: Context, d: int) -> tuple[torch.Tensor, float]:
    """Q [D, d] spanning most of the energy of the interaction inputs on a training sample."""
    b = ctx.data.sample("train", SAMPLE_ROWS, seed=ctx.train.seed)
    with torch.no_grad():
        vecs = torch.cat([model.embed_dense(b.dense), model.pooled(b.sparse).flatten(0, 1)]).double()
    q, vals = linalg.principal_basis(vecs.T @ vecs, d)
    return q.float(), float(vals[:d].sum() / vals.sum())


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


def reduce_width(ckpt: Checkpoint, d: int, hidden: int, ctx: Context) -> dict[str, Any]:
    model: DLRM = ckpt.model
    D = model.hparams["emb_dim"]
    q, kept = interaction_basis(model, ctx, d)
    selected = set(ctx.select.pick(ckpt))
    gen = torch.Generator().manual_seed(ctx.train.seed)
    new_tables = {}
    for name, t in model.tables.items():
        w = t.dense_weight()
        new_tables[name] = two_layer_init(w, q, hidden, gen) if name in selected else tables.DenseTable(t.rows, d, w @ q)
    hp = {**model.hparams, "emb_dim": d, "bottom_proj": True}
    new = dlrm.DLRM(hp, new_tables)
    with torch.no_grad():
        new.bottom.load_state_dict(model.bottom.state_dict())
        old_proj = model.bottom_proj.weight if model.bottom_proj is not None else torch.eye(D)
        new.bottom_proj.weight.copy_(q.T @ old_proj)
        old_top, new_top = model.top.state_dict(), new.top.state_dict()
        for k in old_top:
            new_top[k] = old_top[k]
        w0 = old_top["0.weight"]
        new_top["0.weight"] = torch.cat([w0[:, :D] @ q, w0[:, D:]], dim=1)
        new.top.load_state_dict(new_top)
    ckpt.model = new
    ckpt.spec.hparams = hp
    return {"energy_kept": round(kept, 6), "two_layer_tables": sorted(selected)}


def apply(ckpt: Checkpoint, params: dict[str, Any], ctx: Context) -> Checkpoint:
    d, hidden = params["dim"], params["hidden"]
    model = ckpt.model
    if not isinstance(model, dlrm.DLRM):
        raise UserError(f"mlet supports dlrm models, not {ckpt.spec.family}", "use lowrank for this family")
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
    D = model.hparams["emb_dim"]
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
    entry["before"] = metrics.accuracy_metrics(*training.predict(model, ctx.data, "val")) if ctx.data.size("val") else None
    entry.update(reduce_width(ckpt, d, hidden, ctx))
    entry["projected"] = metrics.accuracy_metrics(*training.predict(ckpt.model, ctx.data, "val")) if ctx.data.size("val") else None
    entry["finetune"] = training.fit(ckpt.model, ctx.data, ctx.train, desc=f"mlet d={d} fine-tune")
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
    trains=lambda p: p.get("dim") is not None,
    apply=apply,
))
