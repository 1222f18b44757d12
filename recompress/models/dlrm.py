"""DLRM as in facebookresearch/dlrm: bottom MLP, one pooled table per sparse feature, dot interaction, top MLP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recompress.errors import UserError
from recompress.families import FAMILIES
from recompress.linalg import principal_basis
from recompress.spec import ModelSpec
from recompress.tables import DenseTable, Table, pool

from .family import Family, Inputs

MAX_BAG = 4  # longest multi-hot bag in parity inputs


def mlp(sizes: list[int], last_activation: bool) -> nn.Sequential:
    """Linear layers at even indices, ReLU between (and after the last one if asked), like dlrm."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def interaction_width(num_tables: int, dim: int, itself: bool, pad: int = 0) -> int:
    """Width of [bottom output, pairwise dots] fed to the top MLP."""
    f = num_tables + 1
    return dim + (f * (f + 1) // 2 if itself else f * (f - 1) // 2) + pad


def default_hparams(num_dense: int, dim: int, bottom: list[int], top: list[int]) -> dict[str, Any]:
    return {"num_dense": num_dense, "emb_dim": dim, "bottom": list(bottom), "top": list(top),
            "interaction_itself": False, "interaction_pad": 0, "bottom_proj": False}


class DLRM(nn.Module):
    """``forward(dense [B, num_dense], sparse [B, T, L] with -1 padding) -> logits [B]``.

    ``hparams``: num_dense, emb_dim, bottom (layer output sizes), top (layer output sizes, last 1),
    interaction_itself, interaction_pad (zero columns appended, as NVIDIA's padded dot does),
    bottom_proj (a bias-free Linear from the bottom MLP's width to emb_dim, used after a width cut).
    ``fused``: an optional module that replaces the per-table lookups (the export stage sets one).
    """

    family = "dlrm"

    def __init__(self, hparams: dict[str, Any], tables: dict[str, Table]) -> None:
        super().__init__()
        self.hparams = dict(hparams)
        h = self.hparams
        d = h["emb_dim"]
        self.bottom = mlp([h["num_dense"], *h["bottom"]], last_activation=True)
        bottom_out = h["bottom"][-1]
        self.bottom_proj = nn.Linear(bottom_out, d, bias=False) if h.get("bottom_proj") else None
        if self.bottom_proj is None and bottom_out != d:
            raise ValueError(f"bottom MLP ends at {bottom_out} but the embedding width is {d}")
        for name, t in tables.items():
            if t.dim != d:
                raise ValueError(f"table {name} has width {t.dim}, the model's embedding width is {d}")
        self.tables = nn.ModuleDict(tables)
        self.fused: nn.Module | None = None
        n = len(tables)
        itself = bool(h.get("interaction_itself"))
        f = n + 1
        li, lj = zip(*[(i, j) for i in range(f) for j in range(i + (1 if itself else 0))])
        self.register_buffer("tri_index", torch.tensor(li) * f + torch.tensor(lj), persistent=False)
        self.pad = int(h.get("interaction_pad", 0))
        self.top = mlp([interaction_width(n, d, itself, self.pad), *h["top"]], last_activation=False)

    def embed_dense(self, dense: Tensor) -> Tensor:
        x = self.bottom(dense)
        return self.bottom_proj(x) if self.bottom_proj is not None else x

    def pooled(self, sparse: Tensor) -> Tensor:
        """``[B, T, d]``: every table's bag sums."""
        if self.fused is not None:
            return self.fused(sparse)
        ids = sparse.clamp(min=0).unbind(1)
        rows = torch.stack([t.lookup(i) for t, i in zip(self.tables.values(), ids)], dim=1)  # [B, T, L, d]
        return pool(rows, sparse)

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        x = self.embed_dense(dense)
        feats = torch.cat([x.unsqueeze(1), self.pooled(sparse)], dim=1)  # [B, F, d]
        # the lower triangle by a row gather of the transposed dots: ORT runs that 6x faster than a
        # gather on axis 1 (bench/ort_ops.py)
        z = torch.bmm(feats, feats.transpose(1, 2)).flatten(1).t().index_select(0, self.tri_index).t()
        parts = [x, z]
        if self.pad:
            parts.append(x.new_zeros(x.shape[0], self.pad))
        return self.top(torch.cat(parts, dim=1)).squeeze(-1)


class Scorer(nn.Module):
    """What is exported and served: click probability from (dense, sparse)."""

    def __init__(self, model: DLRM) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        return torch.sigmoid(self.model(dense, sparse))


def multi_hot(inputs: dict[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """Bags of 0 to ``MAX_BAG`` ids per table, padded with -1, built from the ids of ``inputs``' rows
    (so every id is one the table really holds); about one bag in five is empty."""
    gen = torch.Generator().manual_seed(seed)
    sparse = inputs["sparse"][..., 0]
    n = sparse.shape[0]
    picks = torch.stack([sparse[torch.randint(0, n, (n,), generator=gen)] for _ in range(MAX_BAG)], dim=-1)
    lengths = torch.randint(0, MAX_BAG + 1, (*sparse.shape, 1), generator=gen)
    bags = torch.where(torch.arange(MAX_BAG) < lengths, picks, torch.full_like(picks, -1))
    return {**inputs, "sparse": bags}


def _ints(text: Any, what: str) -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} {text!r} is not a comma-separated list of integers", "e.g. 512,256") from None


class DLRMFamily(Family):
    info = FAMILIES["dlrm"]
    metrics = ("auc", "logloss", "accuracy")
    record = "scores"
    protocols = ("pointwise",)
    inputs = {"dense": {0: "batch"}, "sparse": {0: "batch", 2: "bag"}}
    output = "probability"
    compressible = ("sparse_feature",)

    def new_spec(self, data: Any, hparams: dict[str, Any]) -> ModelSpec:
        self.check_data(data)
        hp = self.hparams(hparams)
        dim, bottom, top = hp["dim"], _ints(hp["bottom"], "--bottom"), _ints(hp["top"], "--top")
        if dim < 1 or any(s < 1 for s in (*bottom, *top)):
            raise UserError("--dim and every layer size must be >= 1", "fix the architecture options")
        tables = self.spec_tables({n: (r, dim, "sparse_feature") for n, r in zip(data.table_names, data.table_rows)})
        return ModelSpec(family=self.name, hparams=default_hparams(data.num_dense, dim, [*bottom, dim], [*top, 1]),
                         tables=tables,
                         vocab={"dataset": str(data.path), "fingerprint": data.fingerprint,
                                "tables": [{"name": n, "rows": r} for n, r in zip(data.table_names, data.table_rows)],
                                "min_count": data.meta.get("min_count"), "synthetic": bool(data.meta.get("synthetic")),
                                "vocabularies": data.meta.get("vocabularies") or {}})

    def build(self, spec: ModelSpec, tables: dict[str, Table]) -> DLRM:
        return DLRM(spec.hparams, tables)

    def init_layers(self, model: nn.Module, gen: torch.Generator) -> None:
        """dlrm's rule: Linear weight N(0, sqrt(2/(in+out))), bias N(0, sqrt(1/out))."""
        for m in model.modules():
            if isinstance(m, nn.Linear):
                out_f, in_f = m.weight.shape
                m.weight.normal_(0.0, (2.0 / (in_f + out_f)) ** 0.5, generator=gen)
                if m.bias is not None:
                    m.bias.normal_(0.0, (1.0 / out_f) ** 0.5, generator=gen)

    def check(self, spec: ModelSpec, data: Any) -> None:
        """The dataset's features must fit the model's tables (positional), or ids would run out of range."""
        self.check_data(data)
        tables = spec.tables
        if len(tables) != len(data.table_rows) or spec.hparams["num_dense"] != data.num_dense:
            raise UserError(f"the dataset has {data.num_dense} dense and {len(data.table_rows)} sparse features, the "
                            f"model expects {spec.hparams['num_dense']} and {len(tables)}",
                            "use the dataset the model was trained on")
        for feature, (t, rows) in enumerate(zip(tables, data.table_rows), 1):
            if t.kind == "qr":  # QR tables upstream keep ceil(n / c) quotient rows, not n
                c = int(t.params["collisions"])
                fits = -(-rows // c) == -(-t.rows // c)
            else:
                fits = rows == t.rows
            if not fits:
                raise UserError(f"table {t.name} has {t.rows:,} rows but the dataset's sparse feature {feature} "
                                f"has a vocabulary of {rows:,}: the model was trained on other ids, and its scores "
                                "here would mean nothing", "use the dataset (vocabulary) the model was trained on, "
                                "prepared the way its trainer prepared it (e.g. 'recompress data criteo --layout dlrm')")
        self.check_vocabularies(spec, data)

    def table_counts(self, spec: ModelSpec, data: Any) -> dict[str, np.ndarray]:
        return dict(zip([t.name for t in spec.tables], data.id_counts("train")))

    def route_lookup(self, model: nn.Module, lookup: Callable[[Tensor], Tensor] | None) -> None:
        model.__dict__["fused"] = lookup  # a plain attribute: DLRM.pooled calls it in place of the tables

    # --- training -------------------------------------------------------------------------------------
    def batches(self, model: nn.Module, data: Any, batch_size: int, seed: int,
                part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Tensor]]:
        for b in data.batches("train", batch_size, shuffle=True, seed=seed, part=part):
            yield {"dense": b.dense, "sparse": b.sparse, "label": b.label}

    def steps_per_epoch(self, data: Any, batch_size: int) -> int:
        return -(-data.size("train") // batch_size)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return nn.functional.binary_cross_entropy_with_logits(model(batch["dense"], batch["sparse"]), batch["label"])

    # --- evaluation ------------------------------------------------------------------------------------
    def eval_batches(self, hparams: dict[str, Any], data: Any, split: str, protocol: str, *, batch_size: int = 4096,
                     negatives: int = 0, seed: int = 0, users: int | None = None) -> Iterator[tuple[Inputs, np.ndarray]]:
        dense, sparse, label = data.arrays(split)
        for s in range(0, len(label), batch_size):
            yield ({"dense": np.array(dense[s:s + batch_size], np.float32),
                    "sparse": data.ids(split, sparse, slice(s, s + batch_size))[..., None]},
                   np.asarray(label[s:s + batch_size]))

    def reduce(self, output: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(output, np.float64).ravel(), truth

    # --- serving and export ----------------------------------------------------------------------------
    def scorer(self, model: nn.Module, scoring: str | None = None) -> nn.Module:
        return Scorer(model)

    def profile(self, spec: ModelSpec, layout: str | None = None) -> dict[str, tuple[int, int, int]]:
        return {"batch": (1, 64, 2048), "bag": (1, 1, 64)}  # ids per bag: one (Criteo) up to multi-hot bags

    def example_inputs(self, model: nn.Module, n: int, data: Any | None, seed: int = 0) -> dict[str, Tensor]:
        if data is not None:
            b = data.sample("test" if data.size("test") else "train", n, seed)
            return {"dense": b.dense, "sparse": b.sparse}
        gen = torch.Generator().manual_seed(seed)
        rows = [t.rows for t in model.tables.values()]
        sparse = torch.stack([torch.randint(0, r, (n, 1), generator=gen) for r in rows], dim=1)
        dense = torch.log1p(torch.empty(n, model.hparams["num_dense"]).exponential_(0.1, generator=gen))
        return {"dense": dense, "sparse": sparse}

    def parity_batches(self, model: nn.Module, n: int, data: Any | None) -> dict[str, dict[str, Tensor]]:
        single = self.example_inputs(model, n, data)
        return {"one id per bag": single, "multi-id bags with padding": multi_hot(single)}

    def latency_inputs(self, hparams: dict[str, Any], data: Any, batch: int, count: int, seed: int = 0,
                       candidates: int | None = None) -> list[Inputs]:
        if candidates is not None:
            raise UserError("a DLRM model scores rows, not candidates per request", "leave --candidates out")
        dense, sparse, _ = data.arrays("test")
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(dense), size=(count, batch), replace=len(dense) < count * batch)
        return [{"dense": np.array(dense[np.sort(i)], np.float32),
                 "sparse": data.ids("test", sparse, np.sort(i))[..., None]} for i in idx]

    # --- compression ------------------------------------------------------------------------------------
    def reduce_width(self, ckpt: Any, d: int, ctx: Any,
                     make_table: Callable[[Tensor, Tensor], Table] | None = None) -> dict[str, Any]:
        """Post-training MLET's width cut: Q [D, d] = the top-d principal directions of every vector entering
        the dot interaction (bottom output and pooled embeddings) on a training sample, so pairwise dots
        survive the cut. Selected tables become ``make_table(W, Q)``, the others W Q; the bottom MLP gets a
        projection Q^T and the top MLP's columns that read the bottom vector are multiplied by Q."""
        model: DLRM = ckpt.model
        D = model.hparams["emb_dim"]
        b = ctx.data.sample("train", 20_000, seed=ctx.train.seed)
        with torch.no_grad():
            vecs = torch.cat([model.embed_dense(b.dense), model.pooled(b.sparse).flatten(0, 1)]).double()
        basis, vals = principal_basis(vecs.T @ vecs, d)
        q = basis.float()
        selected = set(ctx.select.pick(ckpt))
        tables = {name: make_table(t.dense_weight(), q) if name in selected else DenseTable(t.rows, d, t.dense_weight() @ q)
                  for name, t in model.tables.items()}
        hp = {**model.hparams, "emb_dim": d, "bottom_proj": True}
        new = DLRM(hp, tables)
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
        return {"energy_kept": round(float(vals[:d].sum() / vals.sum()), 6), "two_layer_tables": sorted(selected)}


FAMILY = DLRMFamily()
