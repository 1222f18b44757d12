"""Row-wise quantized storage for any table's gathered row matrices (formats: ``rowformat.py``).

Quantization and dequantization reproduce PyTorch's FBGEMM row-wise operators value for value
(``embedding_bag_byte_prepack`` / ``_4bit_prepack`` and their unpack; checked in the tests), and
:meth:`QuantizedRows.fused` gives their byte layout. Values, scales and biases are kept as separate
tensors, because ONNX has no bit-cast to read a scale out of a fused byte row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from recompress.errors import UserError

from .rowformat import FORMATS, row_bytes

CHUNK = 1 << 18  # rows quantized at a time (bounded extra memory on 10M-row tables)


class QuantizedRows(nn.Module):
    """``n x cols`` rows stored in ``fmt``; ``forward(idx)`` gathers stored rows, then dequantizes them, so
    the table stays quantized in memory (export/graph.py can express it the other way round)."""

    def __init__(self, rows: int, cols: int, fmt: str, align: int = 1) -> None:
        super().__init__()
        f = FORMATS[fmt]
        self.fmt, self.cols, self.align = fmt, cols, align
        stored = row_bytes(fmt, cols, align) - f.scale_bias_bytes
        width = stored // (f.bits // 8) if f.bits >= 8 else stored
        self.register_buffer("data", torch.zeros(rows, width, dtype=getattr(torch, f.dtype)))
        if f.affine:
            sdt = getattr(torch, f.scale_dtype)
            self.register_buffer("scale", torch.zeros(rows, dtype=sdt))
            self.register_buffer("bias", torch.zeros(rows, dtype=sdt))

    def config(self) -> dict[str, Any]:
        return {"dtype": self.fmt, "align": self.align}

    @torch.no_grad()
    def fill(self, weight: Tensor) -> None:
        """Quantize float rows ``weight`` [n, cols] into this storage (chunked)."""
        for s in range(0, weight.shape[0], CHUNK):
            for name, t in self.encode(weight[s:s + CHUNK]).items():
                getattr(self, name)[s:s + len(t)] = t

    @torch.no_grad()
    def encode(self, w: Tensor) -> dict[str, Tensor]:
        """The stored tensors (``data`` and, for the integer formats, ``scale`` and ``bias``) of float rows
        ``w`` [n, cols], as this storage holds them (row padding included): a block of :meth:`fill`."""
        w = w.float()
        data = torch.zeros(w.shape[0], self.data.shape[1], dtype=self.data.dtype)
        if self.fmt in ("fp16", "bf16"):
            data[:, :self.cols] = w.to(data.dtype)
            if not torch.isfinite(data).all():  # finite input (checked on load) beyond fp16's 65504
                raise UserError(f"{int((~torch.isfinite(data)).sum())} values exceed the {self.fmt} range "
                                f"(largest |value| {float(w.abs().max()):.4g})",
                                "store the rows as bf16 (fp32's range) or int8 instead")
            return {"data": data}
        lo, hi = w.min(1).values, w.max(1).values
        if self.fmt == "int8":  # FBGEMM FloatToFused8BitRowwiseQuantizedSBFloat
            span = hi - lo
            scale, bias = span / 255.0, lo
            q = torch.round((w - lo.unsqueeze(1)) * (255.0 / (span + 1e-8)).unsqueeze(1))
            data[:, :self.cols] = q.clamp(0, 255).to(torch.uint8)
        else:  # int4: FBGEMM FloatToFusedNBitRowwiseQuantizedSBHalf, bit rate 4
            bias = lo.half().float()
            span = hi - bias
            scale = torch.where(span == 0, torch.ones_like(span), span / 15).half().float()
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            inv = 1.0 / scale
            scale = torch.where(torch.isinf(inv), torch.ones_like(scale), scale)
            inv = torch.where(torch.isinf(inv), torch.ones_like(inv), inv)
            q = torch.round((w - bias.unsqueeze(1)) * inv.unsqueeze(1)).clamp(0, 15).to(torch.uint8)
            if self.cols % 2:
                q = torch.cat([q, q.new_zeros(q.shape[0], 1)], dim=1)
            data[:, :q.shape[1] // 2] = q[:, 0::2] | (q[:, 1::2] << 4)
        scale, bias = scale.to(self.scale.dtype), bias.to(self.bias.dtype)
        if not (torch.isfinite(scale).all() and torch.isfinite(bias).all()):
            raise ValueError(f"a row's values overflow {self.fmt}'s {self.scale.dtype} scale/bias; "
                             "store it as int8 (fp32 scale) or bf16 instead")
        return {"data": data, "scale": scale, "bias": bias}

    def _values(self, data: Tensor) -> Tensor:
        """Stored data rows -> float values (unscaled for int formats), the first ``cols`` columns."""
        if self.fmt == "int4":  # int32 arithmetic: exports to ops every runtime has for this type
            wide = data.to(torch.int32)
            data = torch.stack([wide % 16, wide // 16], dim=-1).flatten(-2)
        return data[..., :self.cols].float()

    def forward(self, idx: Tensor) -> Tensor:
        if not FORMATS[self.fmt].affine:
            return self.decode({"data": self.data[idx]})
        return self.decode({"data": self.data[idx], "scale": self.scale[idx], "bias": self.bias[idx]})

    def decode(self, stored: dict[str, Tensor]) -> Tensor:
        """Float rows from stored tensors (as :meth:`encode` gives them, or gathered rows of this storage)."""
        vals = self._values(stored["data"])
        if not FORMATS[self.fmt].affine:
            return vals
        # q * scale + bias in one fused multiply-add, as FBGEMM's unpack computes it
        return torch.addcmul(stored["bias"].float().unsqueeze(-1), vals, stored["scale"].float().unsqueeze(-1))

    def dequantized(self) -> Tensor:
        return self.forward(torch.arange(self.data.shape[0]))

    def fused(self) -> Tensor:
        """Rows in FBGEMM's fused byte layout ``[values | scale | bias]`` (uint8 ``[n, row bytes]``, no padding)."""
        f = FORMATS[self.fmt]
        data = self.data[:, :f.data_bytes(self.cols) // (f.bits // 8 if f.bits >= 8 else 1)].contiguous()
        parts = [data.view(torch.uint8)]
        if f.affine:
            parts += [self.scale.unsqueeze(1).contiguous().view(torch.uint8),
                      self.bias.unsqueeze(1).contiguous().view(torch.uint8)]
        return torch.cat(parts, dim=1)

    def stored_row_bytes(self) -> int:
        return row_bytes(self.fmt, self.cols, self.align)
