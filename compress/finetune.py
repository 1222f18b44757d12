"""``finetune``: train the checkpoint as it is, with the fine-tune budget.

It composes after any method (``hash,finetune``), and alone it is the control that separates what a
compression costs from what its extra training gains: reports put every variant that trains next to the
baseline fine-tuned with the same budget.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .posttrain import finish, val_metrics
from .registry import Context, Method, register

if TYPE_CHECKING:
    from recompress.checkpoint import Checkpoint


def apply(ckpt: Checkpoint, params: dict[str, Any], ctx: Context) -> Checkpoint:
    entry: dict[str, Any] = {"method": "finetune", "params": {}}
    return finish(ckpt, {"finetune": True}, ctx, entry, val_metrics(ckpt, ctx))


register(Method(
    name="finetune",
    help="train the model as it is with the fine-tune budget (--epochs/--steps/--lr): the same-budget control",
    params=(),
    accepts=None,
    needs_data=lambda p: True,
    apply=apply,
    trains=lambda p: True,
    reads_tables=False,
))
