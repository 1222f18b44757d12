"""The one training loop: training from scratch and every compression fine-tune go through ``fit``."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from .data.ctr import CTRDataset
from .errors import UserError
from .metrics import accuracy_metrics
from .progress import progress
from .trainconfig import TrainConfig


def init_weights(model: nn.Module, seed: int) -> None:
    """dlrm's initialization: tables by their own rule; Linear N(0, sqrt(2/(in+out))), bias N(0, sqrt(1/out))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.tables.values():
            t.reset_parameters(gen)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                out_f, in_f = m.weight.shape
                m.weight.normal_(0.0, (2.0 / (in_f + out_f)) ** 0.5, generator=gen)
                if m.bias is not None:
                    m.bias.normal_(0.0, (1.0 / out_f) ** 0.5, generator=gen)


def _optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    sparse = [p for t in model.tables.values() for p in t.sparse_parameters()]
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    if cfg.optimizer == "adam":
        return [torch.optim.Adam(dense, lr=cfg.lr), torch.optim.SparseAdam(sparse, lr=cfg.lr)]
    if cfg.optimizer == "adagrad":
        return [torch.optim.Adagrad(dense + sparse, lr=cfg.lr)]
    return [torch.optim.SGD(dense + sparse, lr=cfg.lr)]


def predict(model: nn.Module, data: CTRDataset, split: str, batch_size: int = 4096,
            limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, click probabilities) for a split, in file order."""
    model.eval()
    labels, probs = [], []
    with torch.no_grad():
        for b in data.batches(split, batch_size, limit=limit):
            labels.append(b.label.numpy())
            probs.append(torch.sigmoid(model(b.dense, b.sparse)).numpy())
    return np.concatenate(labels), np.concatenate(probs)


def check_compatible(model: nn.Module, data: CTRDataset) -> None:
    """The dataset's features must fit the model's tables (positional), or ids would run out of range."""
    tables = list(model.tables.values())
    if len(tables) != len(data.table_rows) or model.hparams["num_dense"] != data.num_dense:
        raise UserError(f"the dataset has {data.num_dense} dense and {len(data.table_rows)} sparse features, the "
                        f"model expects {model.hparams['num_dense']} and {len(tables)}",
                        "use the dataset the model was trained on")
    for name, t, rows in zip(model.tables, tables, data.table_rows):
        if rows > t.rows:
            raise UserError(f"dataset ids for table {name} go up to {rows - 1} but the table has {t.rows} rows "
                            "(ids out of range)", "use the dataset (vocabulary) the model was trained on")


class BestState:
    """Validation checks during training and the weights where the metric was best (``TrainConfig.keep_best``)."""

    def __init__(self, model: nn.Module, data: CTRDataset, patience: int) -> None:
        self.model, self.data, self.patience = model, data, patience
        self.curve: list[dict[str, Any]] = []
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.stale = 0

    def check(self, step: int) -> bool:
        """Score the validation split; True when training should stop (``patience`` checks without gain)."""
        auc = accuracy_metrics(*predict(self.model, self.data, "val"))["auc"]
        self.curve.append({"step": step, "val_auc": auc})
        if self.best is None or auc > self.best[0]:
            self.best = (auc, step, {k: v.detach().clone() for k, v in self.model.state_dict().items()})
            self.stale = 0
        else:
            self.stale += 1
        self.model.train()
        return self.stale >= self.patience

    def restore(self) -> dict[str, Any]:
        self.model.load_state_dict(self.best[2])
        return {"curve": self.curve, "best_step": self.best[1], "best_val_auc": self.best[0]}


def fit(model: nn.Module, data: CTRDataset, cfg: TrainConfig, desc: str = "training") -> dict[str, Any]:
    """Train ``model`` in place on the train split; returns losses and validation metrics.

    With ``cfg.keep_best`` the validation split is scored before the first step and a few times per
    epoch; training stops after ``cfg.patience`` checks without improvement, and the model ends with the
    weights that scored best (possibly the ones it started with).
    """
    cfg.validate()
    check_compatible(model, data)
    torch.manual_seed(cfg.seed)
    opts = _optimizers(model, cfg)
    loss_fn = nn.BCEWithLogitsLoss()
    per_epoch = -(-data.size("train") // cfg.batch_size)
    total = min(cfg.steps, per_epoch * cfg.epochs) if cfg.steps is not None else per_epoch * cfg.epochs
    step, t0, recent = 0, time.perf_counter(), []
    best = BestState(model, data, cfg.patience) if cfg.keep_best and data.size("val") else None
    every = max(1, per_epoch // cfg.checks_per_epoch)
    stop = best is not None and best.check(0)
    with progress(desc, total) as advance:
        for epoch in range(cfg.epochs):
            if step >= total or stop:
                break
            model.train()
            for b in data.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch):
                if step >= total or stop:
                    break
                loss = loss_fn(model(b.dense, b.sparse), b.label)
                if not torch.isfinite(loss):
                    raise UserError(f"training diverged at step {step} (loss {loss.item()})", "lower the learning rate")
                for o in opts:
                    o.zero_grad()
                loss.backward()
                for o in opts:
                    o.step()
                recent.append(loss.item())
                step += 1
                advance(1)
                if best is not None and (step % every == 0 or step == total):
                    stop = best.check(step)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"config": asdict(cfg), "steps": step, "seconds": round(seconds, 3),
                           "train_loss_last100": float(np.mean(recent[-100:])) if recent else None}
    if best is not None:
        out["keep_best"] = best.restore()
    if data.size("val"):
        labels, probs = predict(model, data, "val")
        out["val"] = accuracy_metrics(labels, probs)
    model.eval()
    return out


def train_dlrm(data: CTRDataset, cfg: TrainConfig, *, dim: int = 16, bottom: tuple[int, ...] = (64,),
               top: tuple[int, ...] = (64,), mlet_hidden: int | None = None, mlet_min_rows: int = 0,
               keep_two_layer: bool = False, method: str | None = None,
               method_params: dict[str, Any] | None = None, method_min_rows: int = 0) -> Any:
    """A new DLRM for ``data``'s features, trained from scratch.

    With ``mlet_hidden`` k, tables with at least ``mlet_min_rows`` rows train in MLET's two-layer form
    (rows x k)(k x dim) and are collapsed to rows x dim afterwards (unless ``keep_two_layer``).
    With ``method`` (tt, hash, qr, freqhash), tables with at least ``method_min_rows`` rows train in that
    method's compressed form from the start, as the published methods do.
    """
    from .checkpoint import Checkpoint, refresh_tables
    from .compress.registry import NoSaving
    from .compress.tables import DenseTable, FactorizedTable, collapse_factorized
    from .models.dlrm import DLRM, default_hparams
    from .spec import ModelSpec

    if dim < 1 or any(s < 1 for s in (*bottom, *top)):
        raise UserError("--dim and every layer size must be >= 1", "fix the architecture options")
    if mlet_hidden is not None and mlet_hidden < dim:
        raise UserError(f"--mlet-hidden {mlet_hidden} is smaller than --dim {dim}",
                        "MLET's hidden layer must be at least as wide as the embedding (k >= d)")
    if method is not None and mlet_hidden is not None:
        raise UserError("--mlet-hidden and --method cannot be combined in one training run",
                        "train with one, then compress with 'recompress checkpoint'")
    fresh = None
    if method is not None:
        from .compress.registry import get_method
        m = get_method(method)
        if m.fresh is None:
            raise UserError(f"{method} is a post-training method with no from-scratch form",
                            "train dense, then run 'recompress checkpoint --method " + method + "'")
        fresh = m.fresh
    counts = data.id_counts("train") if method == "freqhash" else [None] * len(data.table_rows)
    tables = {}
    for (name, rows), c in zip(zip(data.table_names, data.table_rows), counts):
        two_layer = mlet_hidden is not None and rows >= mlet_min_rows
        if fresh is not None and rows >= method_min_rows:
            try:
                tables[name] = fresh(name, rows, dim, method_params or {}, cfg.seed, c)
            except NoSaving:  # a --ratio this small table cannot meet: it stays dense
                tables[name] = DenseTable(rows, dim)
        else:
            tables[name] = FactorizedTable(rows, dim, mlet_hidden) if two_layer else DenseTable(rows, dim)
    model = DLRM(default_hparams(data.num_dense, dim, [*bottom, dim], [*top, 1]), tables)
    init_weights(model, cfg.seed)
    result = fit(model, data, cfg)
    history = []
    if method is not None:
        history.append({"method": method, "params": {k: v for k, v in (method_params or {}).items() if v is not None},
                        "min_rows": method_min_rows, "from_scratch": True})
    if mlet_hidden is not None:
        history.append({"method": "mlet", "params": {"hidden": mlet_hidden, "min_rows": mlet_min_rows},
                        "from_scratch": True})
        if not keep_two_layer:
            history[-1]["collapsed"] = collapse_factorized(model.tables, list(model.tables))
    spec = ModelSpec(family="dlrm", hparams=model.hparams, tables=[],
                     vocab={"dataset": str(data.path), "fingerprint": data.fingerprint,
                            "tables": [{"name": n, "rows": r} for n, r in zip(data.table_names, data.table_rows)],
                            "min_count": data.meta.get("min_count"), "synthetic": bool(data.meta.get("synthetic"))},
                     metrics={"train": result},
                     provenance={"source_format": "recompress", "trained_by": "recompress train",
                                 "hparam_source": {k: "user" for k in model.hparams}},
                     history=history)
    refresh_tables(model, spec)
    return Checkpoint(model, spec)
