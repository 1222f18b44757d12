"""Row-wise quantized storage for any table's gathered row matrices, in FBGEMM's row format.

Each stored row holds ``cols`` values at ``bits`` each, then (for int8/int4) an fp16 scale and an fp16
bias (FBGEMM's ``DEFAULT_SCALE_BIAS_SIZE_IN_BYTES = 4``), padded to ``align`` bytes (FBGEMM: 16 on GPU,
1 on CPU). Dequantized value = q * scale + bias. int8 keeps q signed (-128..127), which is what ONNX
``DequantizeLinear`` and TensorRT take; int4 packs two unsigned nibbles (0..15) per byte, low nibble
first, as FBGEMM does. Scale and bias are kept as separate per-row tensors (ONNX has no bit-cast to read
them out of a fused byte row); the byte count is the fused row's, padding included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

CHUNK = 1 << 18  # rows quantized at a time (bounded extra memory on 10M-row tables)


@dataclass(frozen=True)
class RowFormat:
    bits: int
    affine: bool              # int formats: per-row fp16 scale + bias
    torch_dtype: torch.dtype  # dtype of the stored data tensor

    def data_bytes(self, cols: int) -> int:
        return math.ceil(cols * self.bits / 8)


FORMATS: dict[str, RowFormat] = {
    "fp16": RowFormat(16, False, torch.float16),
    "bf16": RowFormat(16, False, torch.bfloat16),
    "int8": RowFormat(8, True, torch.int8),
    "int4": RowFormat(4, True, torch.uint8),
}
SCALE_BIAS_BYTES = 4


def row_bytes(fmt: str, cols: int, align: int = 1) -> int:
    """Bytes of one stored row (data, fp16 scale + bias for int formats), rounded up to ``align``."""
    f = FORMATS[fmt]
    raw = f.data_bytes(cols) + (SCALE_BIAS_BYTES if f.affine else 0)
    return -(-raw // align) * align


def units_touched(row_bytes: int, unit: int) -> float:
    """Mean number of ``unit``-byte sectors/lines a random row read touches (rows packed back to back)."""
    period = unit // math.gcd(row_bytes, unit)
    return sum((i * row_bytes + row_bytes - 1) // unit - (i * row_bytes) // unit + 1 for i in range(period)) / period


class QuantizedRows(nn.Module):
    """``n x cols`` rows stored in ``fmt``; ``forward(idx)`` gathers stored rows, then scales them, so
    the table stays quantized in memory (export/graph.py can express it the other way round)."""

    def __init__(self, rows: int, cols: int, fmt: str, align: int = 1) -> None:
        super().__init__()
        f = FORMATS[fmt]
        self.fmt, self.cols, self.align = fmt, cols, align
        stored_bytes = row_bytes(fmt, cols, align) - (SCALE_BIAS_BYTES if f.affine else 0)
        width = stored_bytes // (f.bits // 8) if f.bits >= 8 else stored_bytes
        self.register_buffer("data", torch.zeros(rows, width, dtype=f.torch_dtype))
        if f.affine:
            self.register_buffer("scale", torch.zeros(rows, dtype=torch.float16))
            self.register_buffer("bias", torch.zeros(rows, dtype=torch.float16))

    def config(self) -> dict[str, Any]:
        return {"dtype": self.fmt, "align": self.align}

    @torch.no_grad()
    def fill(self, weight: Tensor) -> None:
        """Quantize float rows ``weight`` [n, cols] into this storage (chunked)."""
        for s in range(0, weight.shape[0], CHUNK):
            self._fill(s, weight[s:s + CHUNK].float())

    def _fill(self, s: int, w: Tensor) -> None:
        f, e = FORMATS[self.fmt], s + w.shape[0]
        if not f.affine:
            self.data[s:e, :self.cols] = w.to(f.torch_dtype)
            return
        levels = (1 << f.bits) - 1
        lo, hi = w.min(1).values, w.max(1).values
        scale = ((hi - lo) / levels).half()
        scale = torch.where(scale.float() * levels < (hi - lo), torch.nextafter(scale, scale.new_tensor(math.inf)), scale)
        offset = 128 if self.fmt == "int8" else 0
        bias = (lo + offset * scale.float()).half()
        if not (torch.isfinite(scale).all() and torch.isfinite(bias).all()):
            raise ValueError("a row's value range overflows fp16 scale/bias; quantize to fp16 or bf16 instead")
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(lo))
        q = torch.round((w - bias.float().unsqueeze(1)) / safe.unsqueeze(1)).clamp(-offset, levels - offset)
        self.scale[s:e], self.bias[s:e] = scale, bias
        if self.fmt == "int8":
            self.data[s:e, :self.cols] = q.to(torch.int8)
        else:
            q = q.to(torch.uint8)
            if self.cols % 2:
                q = torch.cat([q, q.new_zeros(q.shape[0], 1)], dim=1)
            self.data[s:e, :q.shape[1] // 2] = q[:, 0::2] | (q[:, 1::2] << 4)

    def _values(self, data: Tensor) -> Tensor:
        """Stored data rows -> float values (unscaled for int formats), the first ``cols`` columns."""
        if self.fmt == "int4":  # int32 arithmetic: exports to ops every runtime has for this type
            wide = data.to(torch.int32)
            data = torch.stack([wide % 16, wide // 16], dim=-1).flatten(-2)
        return data[..., :self.cols].float()

    def forward(self, idx: Tensor) -> Tensor:
        f = FORMATS[self.fmt]
        vals = self._values(self.data[idx])
        if not f.affine:
            return vals
        return vals * self.scale[idx].float().unsqueeze(-1) + self.bias[idx].float().unsqueeze(-1)

    def dequantized(self) -> Tensor:
        return self.forward(torch.arange(self.data.shape[0]))

    def stored_row_bytes(self) -> int:
        return row_bytes(self.fmt, self.cols, self.align)
