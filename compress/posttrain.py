"""What post-training methods share: id frequencies, reconstruction error, validation metrics, fine-tune."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from recompress.lazy import lazy

if TYPE_CHECKING:
    import torch

    from recompress.blockfile import Rows
    from recompress.checkpoint import Checkpoint
    from recompress.tables import Table

    from .registry import Context

torch = lazy("torch")
training = lazy("recompress.training")

CHUNK = 1 << 16


def id_weights(ckpt: Checkpoint, ctx: Context) -> dict[str, torch.Tensor] | None:
    """Per-table training frequencies + 1 (so unseen ids still count a little), or None without data; the
    model's family says how often each id of each table occurs (for a sequential model, its item table)."""
    if ctx.data is None:
        return None
    counts = training.family_of_model(ckpt.model).table_counts(ckpt.spec, ctx.data)
    return {name: torch.from_numpy(c + 1).double() for name, c in counts.items()}


class ErrorSum:
    """sqrt(sum w ||W_i - T_i||^2 / sum w ||W_i||^2), accumulated over blocks of rows."""

    def __init__(self) -> None:
        self.num = self.den = 0.0

    def add(self, ref: torch.Tensor, approx: torch.Tensor, w: torch.Tensor | None = None) -> None:
        ref = ref.double()
        err = (ref - approx.double()).pow(2).sum(1)
        w = w if w is not None else torch.ones_like(err)
        self.num += float((w * err).sum())
        self.den += float((w * ref.pow(2).sum(1)).sum())

    def value(self) -> float:
        return (self.num / self.den) ** 0.5 if self.den > 0 else 0.0


def relative_error(reference: Rows, table: Table, weights: torch.Tensor | None = None) -> float:
    """:class:`ErrorSum` of ``table`` against ``reference`` (a tensor, or rows in a file) over all rows."""
    acc = ErrorSum()
    for s, block in table.dense_blocks():
        e = s + len(block)
        acc.add(reference[s:e], block, weights[s:e] if weights is not None else None)
    return acc.value()


def val_metrics(ckpt: Checkpoint, ctx: Context) -> dict[str, Any] | None:
    """The family's validation metrics, or None without data."""
    return None if ctx.data is None else training.validate(ckpt.model, ctx.data)


def finish(ckpt: Checkpoint, params: dict[str, Any], ctx: Context, entry: dict[str, Any], before: Any) -> Checkpoint:
    """Record validation metrics before/after compressing, fine-tune if asked, append to history."""
    entry["val_before"] = before
    entry["val_after_init"] = val_metrics(ckpt, ctx)
    if params.get("finetune"):
        entry["finetune"] = training.fit(ckpt.model, ctx.data, ctx.train, desc=f"{entry['method']} fine-tune")
        entry["val_after_finetune"] = entry["finetune"].get("val")
    ckpt.spec.history.append(entry)
    return ckpt


def segment_mean(values: torch.Tensor, index: torch.Tensor, segments: int,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of ``values`` rows per ``index`` segment (empty segments get zeros), in float64."""
    w = torch.ones(len(index), dtype=torch.float64) if weights is None else weights
    total = torch.zeros(segments, values.shape[1], dtype=torch.float64)
    mass = torch.zeros(segments, dtype=torch.float64)
    for s in range(0, len(index), CHUNK):
        ws = w[s:s + CHUNK]
        total.index_add_(0, index[s:s + CHUNK], values[s:s + CHUNK].double() * ws.unsqueeze(1))
        mass.index_add_(0, index[s:s + CHUNK], ws)
    return total / mass.clamp(min=1e-12).unsqueeze(1)
