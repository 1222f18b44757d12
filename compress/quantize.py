"""``fp16``, ``bf16``, ``int8``, ``int4``: row-wise quantization of every stored row matrix, no data needed.

Works on any table kind (dense, tt cores, hash/qr/freqhash rows, factorized left), so it composes as the
last step: ``mlet,int8``, ``tt,int8``, ``qr,int4``. PyTorch's FBGEMM row-wise formats (see ``rowformat.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from recompress.errors import UserError
from recompress.tables.rowformat import FORMATS

from .posttrain import relative_error
from .registry import ANY_KIND, Context, Method, Param, register

if TYPE_CHECKING:
    from recompress.checkpoint import Checkpoint
    from recompress.tables import Table

ALIGN = Param("align", int, "quantized rows: pad each row to this many bytes (FBGEMM: 16 on GPU, 1 on CPU)", 1)


def apply(fmt: str, ckpt: Checkpoint, params: dict[str, Any], ctx: Context) -> Checkpoint:
    align = params.get("align") or 1
    if align < 1 or align & (align - 1):
        raise UserError(f"--align {align} is not a power of two", "use 1 (packed) or 16 (FBGEMM GPU)")
    entry: dict[str, Any] = {"method": fmt, "params": {"align": align}, "tables": {}}
    for name in ctx.select.pick(ckpt):
        t: Table = ckpt.model.tables[name]
        w, before = t.dense_weight(), t.stored_bytes()
        try:
            t.quantize(fmt, align)
        except ValueError as e:
            raise UserError(f"table {name}: {e}", "use a wider format") from None
        entry["tables"][name] = {"rel_error": round(relative_error(w, t), 6), "bytes_before": before,
                                 "bytes_after": t.stored_bytes()}
    ckpt.spec.history.append(entry)
    return ckpt


for _fmt in FORMATS:
    register(Method(
        name=_fmt,
        help=f"row-wise {_fmt} storage of every row matrix" + (" with fp16 scale and bias per row" if FORMATS[_fmt].affine else ""),
        params=(ALIGN,),
        accepts=frozenset({ANY_KIND}),
        needs_data=lambda p: False,
        trains=lambda p: False,
        apply=lambda ckpt, params, ctx, _f=_fmt: apply(_f, ckpt, params, ctx),
    ))
