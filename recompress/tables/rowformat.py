"""Row-wise storage formats and their exact byte accounting (no torch here: the CLI reads it at start-up).

The integer formats are PyTorch's FBGEMM row-wise layouts, byte for byte:
- ``int8``: ``torch.ops.quantized.embedding_bag_byte_prepack``: ``cols`` uint8 values, then an fp32 scale
  and an fp32 bias (8 bytes) per row; value = q * scale + bias with bias = the row minimum, exactly.
- ``int4``: ``torch.ops.quantized.embedding_bag_4bit_prepack``: two 4-bit values per byte (low nibble
  first), then an fp16 scale and an fp16 bias (4 bytes); the bias is the row minimum rounded to fp16,
  so a row far from zero loses up to that rounding (|min| * 2^-11) besides half a quantization step.
- ``fp16`` / ``bf16``: the values in that type, no scale or bias.
``align`` pads each stored row to a multiple of that many bytes (FBGEMM's GPU tables use 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RowFormat:
    bits: int
    scale_bias_bytes: int  # per row: scale + bias (0 for the float formats)
    dtype: str             # torch dtype name of the stored values tensor
    scale_dtype: str | None = None

    @property
    def affine(self) -> bool:
        return self.scale_bias_bytes > 0

    def data_bytes(self, cols: int) -> int:
        return math.ceil(cols * self.bits / 8)


FORMATS: dict[str, RowFormat] = {
    "fp16": RowFormat(16, 0, "float16"),
    "bf16": RowFormat(16, 0, "bfloat16"),
    "int8": RowFormat(8, 8, "uint8", "float32"),
    "int4": RowFormat(4, 4, "uint8", "float16"),
}


def row_bytes(fmt: str, cols: int, align: int = 1) -> int:
    """Bytes of one stored row (values, then scale and bias for the integer formats), rounded up to ``align``."""
    f = FORMATS[fmt]
    raw = f.data_bytes(cols) + f.scale_bias_bytes
    return -(-raw // align) * align


def units_touched(row_bytes: int, unit: int) -> float:
    """Mean number of ``unit``-byte sectors/lines a random row read touches (rows packed back to back)."""
    period = unit // math.gcd(row_bytes, unit)
    return sum((i * row_bytes + row_bytes - 1) // unit - (i * row_bytes) // unit + 1 for i in range(period)) / period
