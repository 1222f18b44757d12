"""The one evaluator: any family, any backend, any protocol -> per-row records and metrics.

The family turns a split into batches of model inputs with their truth (``Family.eval_batches``) and
a batch's output into per-row values (``Family.reduce``: click probabilities, or each user's rank of
the true next item); the metrics registry does the rest. Training's validation checks, ``evaluate``
and the pipeline all go through ``score``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .metrics import compute
from .progress import progress

Predict = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass
class Scored:
    """Per-row values of kind ``kind`` (``scores``, ``ranks`` or ``predictions``) with their truth, under ``protocol``."""

    kind: str
    values: np.ndarray
    truth: np.ndarray
    protocol: str

    def metrics(self, names: tuple[str, ...]) -> dict[str, float]:
        return {**compute(names, self.truth, self.values), "rows": int(len(self.values)), "protocol": self.protocol}


def torch_predict(family: Any, model: torch.nn.Module) -> Predict:
    """A model's eager scorer as a numpy-in, numpy-out callable (no gradients, eval mode)."""
    scorer = family.scorer(model).eval()

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return scorer(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    return run


def score(family: Any, predict: Predict, hparams: dict[str, Any], data: Any, split: str, protocol: str | None = None,
          *, negatives: int = 100, seed: int = 0, users: int | None = None, batch_size: int | None = None,
          desc: str | None = None) -> Scored:
    """Run ``predict`` (a model with ``hparams``) over ``split`` as ``family`` lays it out, and reduce to per-row
    values."""
    protocol = protocol or family.default_protocol(data)
    if protocol not in family.protocols:
        from .errors import UserError
        raise UserError(f"{family.name} has no {protocol!r} evaluation protocol", f"use {', '.join(family.protocols)}")
    values, truth = [], []
    kw = {} if batch_size is None else {"batch_size": batch_size}
    rows = family.eval_rows(data, split, protocol, users)
    with progress(desc or f"scoring {split} ({protocol})", rows) as advance:
        for inputs, t in family.eval_batches(hparams, data, split, protocol, negatives=negatives, seed=seed,
                                             users=users, **kw):
            v, tr = family.reduce(predict(inputs), t)
            values.append(v)
            truth.append(tr)
            advance(len(next(iter(inputs.values()))))  # the batch's rows (users), however many records
    return Scored(family.record, np.concatenate(values), np.concatenate(truth), protocol)


def evaluate_model(model: torch.nn.Module, data: Any, split: str = "test", protocol: str | None = None,
                   **kw: Any) -> Scored:
    """A torch model scored on ``split`` by its own family's layout and default protocol."""
    from .families import get_family
    family = get_family(model.family)
    return score(family, torch_predict(family, model), model.hparams, data, split, protocol, **kw)
