"""The one training loop: training from scratch and every compression fine-tune go through ``fit``.

The loop knows no model: the family gives the batches, the loss and the validation metric
(``recompress.models.family.Family``), so every family trains, fine-tunes and keeps its best checkpoint
the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from . import distributed
from .blockfile import Scratch
from .checkpoint import Checkpoint, refresh_tables
from .errors import UserError
from .evaluation import score, torch_predict
from .families import get_family
from .metrics import METRICS
from .models.family import Family
from .progress import progress
from .rowwise_adagrad import RowwiseAdagrad
from .spec import TableSpec
from .tables import DenseTable, FactorizedTable, Table, collapse_factorized
from .trainconfig import TrainConfig

if TYPE_CHECKING:
    from .sharding import ShardedTables


def family_of_model(model: nn.Module) -> Family:
    return get_family(model.family)


def _parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense-gradient, sparse-row-gradient) trainable parameters."""
    sparse = [p for t in model.tables.values() for p in t.sparse_parameters()]
    ids = {id(p) for p in sparse}
    return [p for p in model.parameters() if id(p) not in ids and p.requires_grad], [p for p in sparse if p.requires_grad]


def _optimizers(model: nn.Module, cfg: TrainConfig, family: Family) -> list[torch.optim.Optimizer]:
    dense, sparse = _parameters(model)
    if cfg.optimizer == "adam":
        opts: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=cfg.lr, betas=family.adam_betas)]
        return opts + ([torch.optim.SparseAdam(sparse, lr=cfg.lr, betas=family.adam_betas)] if sparse else [])
    if cfg.optimizer == "adagrad":
        return [torch.optim.Adagrad(dense + sparse, lr=cfg.lr)]
    if cfg.optimizer == "rowwise-adagrad":  # TorchRec's DLRM recipe: Adagrad for dense layers, FBGEMM's row-wise for tables
        return [torch.optim.Adagrad(dense, lr=cfg.lr)] + ([RowwiseAdagrad(sparse, lr=cfg.lr)] if sparse else [])
    return [torch.optim.SGD(dense + sparse, lr=cfg.lr)]


def validate(model: nn.Module, data: object, family: Family | None = None,
             sharded: bool = False) -> dict[str, object] | None:
    """The family's metrics on the validation split, by its default protocol (None without a val split).
    Under torchrun, rank 0 scores and every rank gets its metrics; with ``sharded`` tables every rank scores
    its part of each batch and all get every score."""
    family = family or family_of_model(model)
    if not data.size("val"):
        return None
    model.eval()
    if sharded:
        predict = distributed.split_predict(torch_predict(family, model))
        return score(family, predict, model.hparams, data, "val", desc="validation").metrics(family.metrics)
    metrics = score(family, torch_predict(family, model), model.hparams, data, "val",
                    desc="validation").metrics(family.metrics) if distributed.is_main() else None
    return distributed.broadcast_object(metrics)


class BestState:
    """Validation checks during training and the weights where the metric was best (``TrainConfig.keep_best``).

    The best weights are kept in one set of buffers, made at the first check and overwritten at each new best;
    tensors of 16 MB or more (tables, and a rank's shards of sharded tables) as the pages of an unlinked file in
    TMPDIR (``blockfile.Scratch``; in memory, with a warning, where it has no room), not in the process's own
    memory, and the model takes those buffers over when it is restored (no copy into a mapped table, which
    would make all of its pages the process's own)."""

    def __init__(self, model: nn.Module, data: object, family: Family, patience: int,
                 sharded: ShardedTables | None = None) -> None:
        self.model, self.data, self.family, self.patience, self.sharded = model, data, family, patience, sharded
        self.sign = 1.0 if METRICS[family.primary].higher_is_better else -1.0
        self.curve: list[dict[str, object]] = []
        self.best: tuple[float, int] | None = None
        self.kept: dict[object, torch.Tensor] = {}  # state_dict key (or a sharded table's shard) -> best value
        self.scratch = Scratch.temporary("the best weights", "which --keep-best keeps there")
        self.stale = 0
        self.seconds = 0.0  # spent scoring the validation split

    def check(self, step: int) -> bool:
        """Score the validation split; True when training should stop (``patience`` checks without gain)."""
        t0 = time.perf_counter()
        value = validate(self.model, self.data, self.family, self.sharded is not None)[self.family.primary]
        self.seconds += time.perf_counter() - t0
        self.curve.append({"step": step, f"val_{self.family.primary}": value})
        if self.best is None or self.sign * value > self.sign * self.best[0]:
            self._keep()
            self.best = (value, step)
            self.stale = 0
        else:
            self.stale += 1
        self.model.train()
        return self.stale >= self.patience

    def _keep(self) -> None:
        shards = self.sharded.local if self.sharded else {}  # this rank's shards of sharded tables
        with torch.no_grad():
            for k, v in [*self.model.state_dict().items(), *shards.items()]:
                if k not in self.kept:
                    self.kept[k] = self.scratch.empty(tuple(v.shape), v.dtype)
                self.kept[k].copy_(v)

    def restore(self) -> dict[str, object]:
        state = self.model.state_dict()
        self.model.load_state_dict({k: v for k, v in self.kept.items() if k in state}, assign=True)
        with torch.no_grad():  # TorchRec's kernels own their shards' memory: copied back
            for k, v in (self.sharded.local if self.sharded else {}).items():
                v.copy_(self.kept[k])
        return {"curve": self.curve, "best_step": self.best[1], f"best_val_{self.family.primary}": self.best[0],
                "validation_seconds": round(self.seconds, 3)}


def fit(model: nn.Module, data: object, cfg: TrainConfig, family: Family | None = None,
        desc: str = "training") -> dict[str, object]:
    """Train ``model`` in place on the train split with its family's loss; returns losses and validation metrics.

    With ``cfg.keep_best`` the validation split is scored before the first step and a few times per
    epoch; training stops after ``cfg.patience`` checks without improvement, and the model ends with the
    weights that scored best (possibly the ones it started with).

    Under torchrun every rank starts from rank 0's weights, trains on its rows of each global batch and
    sums gradients weighted by its share of the batch's loss terms (``recompress.distributed``), so the
    ranks step exactly as one process on the global batch would (up to float summation order; dropout
    masks are drawn per rank). With ``cfg.shard`` the plain tables are TorchRec's, sharded across the ranks
    for the run, and come back whole into rank 0's model at its end (``recompress.sharding``).
    """
    cfg.validate()
    family = family or family_of_model(model)
    torch.manual_seed(cfg.seed + distributed.rank())
    sharded = None
    if cfg.shard:
        from .sharding import ShardedTables
        sharded = ShardedTables(model, family, cfg)
    distributed.broadcast_module(model)
    dense, sparse = _parameters(model)
    opts = _optimizers(model, cfg, family)
    per_epoch = family.steps_per_epoch(data, cfg.batch_size)
    total = min(cfg.steps, per_epoch * cfg.epochs) if cfg.steps is not None else per_epoch * cfg.epochs
    step, t0, recent = 0, time.perf_counter(), []
    best = BestState(model, data, family, cfg.patience, sharded) if cfg.keep_best and data.size("val") else None
    every = max(1, per_epoch // cfg.checks_per_epoch)
    stop = best is not None and best.check(0)
    with progress(desc, total) as advance:
        for epoch in range(cfg.epochs):
            if step >= total or stop:
                break
            model.train()
            for batch in family.batches(model, data, cfg.batch_size, seed=cfg.seed * 1000 + epoch,
                                        part=distributed.part()):
                if step >= total or stop:
                    break
                units = family.loss_units(batch)
                # sharded tables: the forward and backward passes are collectives, so a rank with no rows of this
                # batch takes part too, its loss (the mean of nothing: NaN) weighted by 0 (its gradients are empty)
                loss = family.loss(model, batch) if units or sharded else None
                units_all, loss_sum = distributed.sum_scalars([units, loss.item() * units if units else 0.0])
                if units_all:
                    mean = loss_sum / units_all
                    if not np.isfinite(mean):
                        raise UserError(f"training diverged at step {step} (loss {mean})", "lower the learning rate")
                    for o in opts:
                        o.zero_grad()
                    if loss is not None:
                        weighted = loss * (units / units_all)
                        if sharded is not None:  # TorchRec's all-to-all: a peer's death is one clear error
                            distributed.collective(weighted.backward)
                        else:
                            weighted.backward()
                    distributed.sum_gradients(dense, sparse)
                    for o in opts:
                        o.step()
                    recent.append(mean)
                step += 1
                advance(1)
                if best is not None and (step % every == 0 or step == total):
                    stop = best.check(step)
    seconds = time.perf_counter() - t0
    out: dict[str, object] = {"config": asdict(cfg), "ranks": distributed.size(), "steps": step,
                              "seconds": round(seconds, 3),
                              "train_loss_last100": float(np.mean(recent[-100:])) if recent else None}
    if best is not None:
        out["keep_best"] = best.restore()
    out["val"] = validate(model, data, family, sharded is not None)
    if sharded is not None:
        sharded.gather()
    model.eval()
    return out


# (table spec, its training id counts or None, the family's compressible roles) -> a table, or None for dense
TableFactory = Callable[[TableSpec, np.ndarray | None, tuple[str, ...]], Table | None]


def train_model(family: Family, data: object, cfg: TrainConfig, hparams: dict[str, object], *,
                make_table: TableFactory | None = None, mlet_hidden: int | None = None, mlet_min_rows: int = 0,
                keep_two_layer: bool = False, history: list[dict[str, object]] = ()) -> Checkpoint:
    """A new model of ``family`` for ``data``, trained from scratch.

    ``make_table`` builds a table in a compressed form for training from scratch (the compress stage
    gives it; None or returning None keeps a dense table). With ``mlet_hidden`` k, tables of the
    family's compressible roles with at least ``mlet_min_rows`` rows train in MLET's two-layer form
    (rows x k)(k x d) and are collapsed to rows x d afterwards (unless ``keep_two_layer``).
    """
    spec = family.new_spec(data, hparams)
    dim = spec.tables[0].dim
    if mlet_hidden is not None and mlet_hidden < dim:
        raise UserError(f"--mlet-hidden {mlet_hidden} is smaller than --dim {dim}",
                        "MLET's hidden layer must be at least as wide as the embedding (k >= d)")
    tables: dict[str, Table] = {}
    counts = family.table_counts(spec, data) if make_table is not None else {}
    for t in spec.tables:
        made = make_table(t, counts.get(t.name), family.compressible) if make_table is not None else None
        two_layer = mlet_hidden is not None and t.role in family.compressible and t.rows >= mlet_min_rows
        tables[t.name] = made or (FactorizedTable(t.rows, t.dim, mlet_hidden) if two_layer else
                                  DenseTable(t.rows, t.dim, deferred=bool(cfg.shard)))  # sharded: drawn by shard
    try:
        model = family.build(spec, tables)
    except ValueError as e:  # a model refusing the options it was given (e.g. --dropout 2)
        raise UserError(f"a {family.name} model cannot be built with these options: {e}", "fix the option") from None
    family.init(model, cfg.seed)
    result = fit(model, data, cfg, family)
    spec.history = list(history)
    if mlet_hidden is not None:
        spec.history.append({"method": "mlet", "params": {"hidden": mlet_hidden, "min_rows": mlet_min_rows},
                             "from_scratch": True})
        if not keep_two_layer:
            spec.history[-1]["collapsed"] = collapse_factorized(model.tables, list(model.tables))
    spec.metrics = {"train": result}
    spec.provenance = {"source_format": "recompress", "trained_by": "recompress train",
                       "hparam_source": {k: "user" for k in spec.hparams}}
    refresh_tables(model, spec)
    return Checkpoint(model, spec)
