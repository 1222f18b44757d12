"""TorchRec's quantized inference tables (FBGEMM's inference TBE, ``torchrec.quant.EmbeddingBagCollection``):
each row is one uint8 run ``[scale fp16 | bias fp16 | values]`` padded to a multiple of 16 bytes; values are
int8 (one byte per column) or int4 (two columns per byte, low nibble first); a value is ``q * scale + bias``.
Read off TorchRec 1.9.2 / fbgemm-gpu-cpu 1.8: ``QEBC.from_float`` on a known table stores exactly this.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rowwise import QuantizedRows

ALIGN = 16
HEADER = 4  # fp16 scale, fp16 bias


def row_width(fmt: str, dim: int) -> int:
    """Bytes per fused row of a ``dim``-wide table in ``fmt`` (int8 or int4)."""
    values = dim if fmt == "int8" else -(-dim // 2)
    return -(-(HEADER + values) // ALIGN) * ALIGN


def formats_of(width: int, dim: int) -> list[str]:
    """The formats whose rows of ``dim`` values are ``width`` bytes: none, one, or both (``dim`` <= 12, where
    the padding makes int8 and int4 rows equally wide; TorchRec keeps the type in its configs, not here)."""
    return [f for f in ("int8", "int4") if row_width(f, dim) == width]


def pack(rows: QuantizedRows) -> Tensor:
    """Our int8/int4 rows as TBE rows (int8 scale and bias are fp32 here: rounded to fp16 there)."""
    values = rows.data[:, : (rows.cols if rows.fmt == "int8" else -(-rows.cols // 2))]
    out = torch.zeros(rows.data.shape[0], row_width(rows.fmt, rows.cols), dtype=torch.uint8)
    out[:, 0:2] = rows.scale.half().unsqueeze(1).view(torch.uint8)
    out[:, 2:4] = rows.bias.half().unsqueeze(1).view(torch.uint8)
    out[:, HEADER:HEADER + values.shape[1]] = values
    return out


def unpack(fused: Tensor, dim: int, fmt: str) -> dict[str, Tensor]:
    """TBE rows -> our stored tensors (``data`` uint8, ``scale``/``bias`` as fp16 values)."""
    values = dim if fmt == "int8" else -(-dim // 2)
    return {"data": fused[:, HEADER:HEADER + values].contiguous(),
            "scale": fused[:, 0:2].contiguous().view(torch.float16).squeeze(1),
            "bias": fused[:, 2:4].contiguous().view(torch.float16).squeeze(1)}
