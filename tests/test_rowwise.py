"""Row-wise int8/int4 storage against PyTorch's FBGEMM operators: same values, same bytes."""

import pytest
import torch

from recompress.tables.rowformat import row_bytes
from recompress.tables.rowwise import QuantizedRows

PREPACK = {"int8": torch.ops.quantized.embedding_bag_byte_prepack,
           "int4": torch.ops.quantized.embedding_bag_4bit_prepack}
UNPACK = {"int8": torch.ops.quantized.embedding_bag_byte_unpack,
          "int4": torch.ops.quantized.embedding_bag_4bit_unpack}


def rows(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return {
        "random": torch.randn(300, 16, generator=g) * torch.rand(300, 1, generator=g) * 3,
        "far from zero": 100 + 0.001 * torch.arange(16.).repeat(8, 1) + torch.randn(8, 1, generator=g),
        "negative, far": -2500 + torch.rand(20, 16, generator=g),
        "constant": torch.full((5, 16), 7.25),
        "zeros": torch.zeros(3, 16),
        "tiny range": 1.0 + torch.randn(10, 16, generator=g) * 1e-7,
        "tiny values": torch.randn(10, 16, generator=g) * 1e-30,
        "huge range": torch.randn(10, 16, generator=g) * 1e4,
        "one outlier": torch.cat([torch.zeros(4, 15), torch.full((4, 1), 50.0)], 1),
    }[kind]


KINDS = ["random", "far from zero", "negative, far", "constant", "zeros", "tiny range", "tiny values",
         "huge range", "one outlier"]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_matches_fbgemm_byte_for_byte_and_value_for_value(fmt, kind):
    w = rows(kind)
    q = QuantizedRows(*w.shape, fmt)
    q.fill(w)
    ref = PREPACK[fmt](w)
    assert torch.equal(q.fused(), ref)                    # the stored bytes are FBGEMM's
    assert torch.equal(q.dequantized(), UNPACK[fmt](ref))  # and so are the values read back


@pytest.mark.parametrize("kind", KINDS)
def test_int8_error_is_half_a_step_even_far_from_zero(kind):
    w = rows(kind)
    q = QuantizedRows(*w.shape, "int8")
    q.fill(w)
    span = w.max(1).values - w.min(1).values
    err = (q.dequantized() - w).abs()
    # half a step, plus float32 rounding of values of this size (the old fp16-bias layout lost up to 128 steps);
    # FBGEMM divides by span + 1e-8, so a span far below 1e-8 collapses onto the row minimum (error <= span)
    bound = torch.where(span < 1e-6, span, span / 255 * 0.5).unsqueeze(1)
    assert (err <= bound + 4 * torch.finfo(torch.float32).eps * w.abs() + 1e-38).all()


def test_rows_far_from_zero_keep_their_resolution():
    w = 100 + 0.001 * torch.arange(16.).unsqueeze(0)
    q = QuantizedRows(1, 16, "int8")
    q.fill(w)
    assert float((q.dequantized() - w).abs().max()) < 4e-5  # step is 5.9e-5; the fp16-bias layout gave 7.5e-3


def test_int4_bias_is_fbgemm_fp16_rounding_of_the_minimum():
    w = 100.01 + 0.01 * torch.arange(16.).unsqueeze(0)
    q = QuantizedRows(1, 16, "int4")
    q.fill(w)
    assert float(q.bias[0]) == float(torch.tensor(100.01).half())  # documented int4 cost far from zero


def test_int4_values_that_overflow_fp16_are_refused():
    q = QuantizedRows(2, 16, "int4")
    with pytest.raises(ValueError, match="overflow"):
        q.fill(torch.full((2, 16), 1e6))


@pytest.mark.parametrize("fmt,cols,align,expect", [("int8", 16, 1, 24), ("int8", 16, 16, 32), ("int8", 10, 1, 18),
                                                   ("int4", 16, 1, 12), ("int4", 15, 1, 12), ("int4", 16, 16, 16),
                                                   ("fp16", 16, 1, 32), ("bf16", 10, 16, 32)])
def test_row_bytes_and_stored_tensors_agree(fmt, cols, align, expect):
    assert row_bytes(fmt, cols, align) == expect
    q = QuantizedRows(7, cols, fmt, align)
    assert sum(t.numel() * t.element_size() for t in q.state_dict().values()) == 7 * expect
    if fmt == "int8":
        assert q.fused().shape == (7, cols + 8) == PREPACK["int8"](torch.zeros(7, cols)).shape


def test_odd_width_int4_round_trips():
    w = torch.randn(9, 7, generator=torch.Generator().manual_seed(1))
    q = QuantizedRows(9, 7, "int4")
    q.fill(w)
    step = (w.max(1).values - w.min(1).values) / 15
    fp16_bias = (w.min(1).values - w.min(1).values.half().float()).abs()
    assert ((q.dequantized() - w).abs() <= (step * 0.5 + fp16_bias * 2 + 1e-6).unsqueeze(1)).all()
