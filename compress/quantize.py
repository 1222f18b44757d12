"""``fp16``, ``bf16``, ``int8``, ``int4``: row-wise quantization of every stored row matrix, no data needed.

Works on any table kind (dense, tt cores, hash/qr/freqhash rows, factorized left), so it composes as the
last step: ``mlet,int8``, ``tt,int8``, ``qr,int4``. PyTorch's FBGEMM row-wise formats (see ``rowformat.py``).
Streaming (``compress/stream.py``): a dense table that stays in its file is quantized block by block while
the checkpoint is written, its error measured in the same pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from recompress.errors import UserError
from recompress.lazy import lazy
from recompress.tables.rowformat import FORMATS

from .posttrain import ErrorSum, relative_error
from .registry import ANY_KIND, Context, Method, Param, register

if TYPE_CHECKING:
    from torch import Tensor

    from recompress.blockfile import Rows
    from recompress.checkpoint import Checkpoint
    from recompress.tables import Table

torch = lazy("torch")
tables = lazy("recompress.tables")

ALIGN = Param("align", int, "quantized rows: pad each row to this many bytes (FBGEMM: 16 on GPU, 1 on CPU)", 1)
BLOCK_BYTES = 1 << 22  # float rows per streamed block: memory stays flat whatever the table's size


def _start(fmt: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    align = params.get("align") or 1
    if align < 1 or align & (align - 1):
        raise UserError(f"--align {align} is not a power of two", "use 1 (packed) or 16 (FBGEMM GPU)")
    return align, {"method": fmt, "params": {"align": align}, "tables": {}}


def _quantize(name: str, t: Table, fmt: str, align: int) -> dict[str, Any]:
    w, before = t.dense_weight(), t.stored_bytes()
    try:
        t.quantize(fmt, align)
    except ValueError as e:
        raise UserError(f"table {name}: {e}", "use a wider format") from None
    return {"rel_error": round(relative_error(w, t), 6), "bytes_before": before, "bytes_after": t.stored_bytes()}


def apply(fmt: str, ckpt: Checkpoint, params: dict[str, Any], ctx: Context) -> Checkpoint:
    align, entry = _start(fmt, params)
    for name in ctx.select.pick(ckpt):
        entry["tables"][name] = _quantize(name, ckpt.model.tables[name], fmt, align)
    ckpt.spec.history.append(entry)
    return ckpt


def _blocks(name: str, source: Rows, table: Table, record: dict[str, Any]) -> Iterator[tuple[str, int, Tensor]]:
    store, acc = table.stores["weight"], ErrorSum()
    step = max(1, BLOCK_BYTES // (4 * table.dim))
    for s in range(0, source.shape[0], step):
        w = source[s:s + step]
        try:
            stored = store.encode(w)
        except ValueError as e:
            raise UserError(f"table {name}: {e}", "use a wider format") from None
        acc.add(w, store.decode(stored))
        for key, t in stored.items():
            yield f"stores.weight.{key}", s, t
    record["rel_error"] = round(acc.value(), 6)


def stream(fmt: str, ckpt: Checkpoint, params: dict[str, Any], ctx: Context,
           sources: dict[str, Rows]) -> tuple[Checkpoint, dict[str, Any]]:
    """:func:`apply`, except that a dense table in ``sources`` becomes an empty (meta) quantized table whose
    stored tensors the returned block generator computes from the file."""
    align, entry = _start(fmt, params)
    blocks = {}
    for name in ctx.select.pick(ckpt):
        t = ckpt.model.tables[name]
        if name not in sources:
            entry["tables"][name] = _quantize(name, t, fmt, align)
            continue
        with torch.device("meta"):
            new = tables.DenseTable(t.rows, t.dim)
            new.quantize(fmt, align, fill=False)
        record = entry["tables"][name] = {"rel_error": None, "bytes_before": t.stored_bytes(),
                                          "bytes_after": new.stored_bytes()}
        ckpt.model.tables[name] = new
        blocks[name] = lambda name=name, src=sources[name], new=new, record=record: _blocks(name, src, new, record)
    ckpt.spec.history.append(entry)
    return ckpt, blocks


for _fmt in FORMATS:
    register(Method(
        name=_fmt,
        help=f"row-wise {_fmt} storage of every row matrix" + (" with fp16 scale and bias per row" if FORMATS[_fmt].affine else ""),
        params=(ALIGN,),
        accepts=frozenset({ANY_KIND}),
        needs_data=lambda p: False,
        trains=lambda p: False,
        apply=lambda ckpt, params, ctx, _f=_fmt: apply(_f, ckpt, params, ctx),
        stream=lambda ckpt, params, ctx, sources, _f=_fmt: stream(_f, ckpt, params, ctx, sources),
    ))
