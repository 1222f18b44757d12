"""What post-training methods share: id frequencies, reconstruction error, validation metrics, fine-tune."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from recompress.lazy import lazy

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from recompress.blockfile import Rows
    from recompress.checkpoint import Checkpoint
    from recompress.tables import Table

    from .registry import Context

    SegmentBlock = Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]

torch = lazy("torch")
training = lazy("recompress.training")

CHUNK = 1 << 16
ERROR_ROWS = 1 << 13  # rows of float64 at a time in ErrorSum (65,536 held ~130 MB of copies at d = 64)


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
        for s in range(0, len(ref), ERROR_ROWS):  # float64 copies of a few thousand rows at a time
            r, a = ref[s:s + ERROR_ROWS].double(), approx[s:s + ERROR_ROWS].double()
            ws = w[s:s + ERROR_ROWS] if w is not None else torch.ones(len(r), dtype=torch.float64)
            self.num += float((ws * (r - a).pow(2).sum(1)).sum())
            self.den += float((ws * r.pow(2).sum(1)).sum())

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


def segment_fit(n: int, segments: int, block: SegmentBlock, step: int = CHUNK,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Per segment and column, the weighted least-squares ``x`` of ``values ~ x[index] * other`` over ``n``
    rows read in chunks of ``step``: ``block(start, stop)`` gives that chunk's (values, segment index, other or
    None for 1, i.e. the weighted mean, row weights or None). Empty segments get zeros. Sums are float64
    (returned; pass float64 values) or, given ``out`` ([segments, d]), summed into ``out`` in its dtype and
    divided there, the values in theirs: neither a table's worth nor a block's of float64 is then held (the
    hashing fit's output grows with the rows)."""
    num = out.zero_() if out is not None else None
    den = None
    for s in range(0, n, step):
        values, index, other, w = block(s, min(n, s + step))
        if num is None:
            num = torch.zeros(segments, values.shape[1], dtype=torch.float64)
        if den is None:
            den = torch.zeros(segments, 1 if other is None else values.shape[1], dtype=torch.float64)
        unit = w is None
        w = torch.ones(len(index), 1, dtype=torch.float64) if unit else w.unsqueeze(1)
        if other is None:  # a mean: no product for unit weights, and in the rows' own dtype otherwise
            num.index_add_(0, index, (values if unit else w.to(values.dtype) * values).to(num.dtype))
            den.index_add_(0, index, w)
        else:
            num.index_add_(0, index, (w * values * other).to(num.dtype))
            den.index_add_(0, index, w * other ** 2)
    if den is None:
        raise ValueError("no rows to fit")
    return num.div_(den.clamp_(min=1e-12).to(num.dtype))  # in place: the accumulator is the output's size


def segment_mean(values: Rows, index: torch.Tensor, segments: int,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of ``values`` rows per ``index`` segment (empty segments get zeros), in float64."""
    return segment_fit(len(index), segments, lambda s, e: (values[s:e].double(), index[s:e], None,
                                                            None if weights is None else weights[s:e]))
