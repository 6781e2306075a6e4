import pytest
import torch

from speedq_core.errors import CheckpointError, SchemeError
from speedq_core.quant import QuantizedWeight, QuantScheme, packed_layout, quantize_groupwise, quantize_weight

SCHEMES = ["w4g32", "w2g16", "w3g16", "w8g64", "w4g32g16", "w2g16g16", "w3g16g32s8"]


def weight(dtype=torch.float32):
    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.03
    w[0, :32] = 0
    w[1, 5] = 3.0
    return w.to(dtype)


@pytest.mark.parametrize("name", SCHEMES)
def test_packed_round_trip_is_bit_exact(name):
    scheme = QuantScheme.parse(name)
    qw = quantize_weight(weight(), scheme)
    packed = qw.to_packed_tensors()
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == packed_layout(scheme, (32, 128))
    back = QuantizedWeight.from_packed_tensors(packed, scheme, (32, 128))
    for field in ("q", "zero", "scale", "scale_q", "scale2", "min2"):
        a, b = getattr(qw, field), getattr(back, field)
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(back.dequantize(torch.bfloat16), qw.dequantize(torch.bfloat16))


def test_single_level_is_eq1_with_fp16_stored_scales():
    w = weight()
    qw = quantize_weight(w, QuantScheme.parse("w4g32"))
    _, scale, zero = quantize_groupwise(w, 4, 32)
    assert torch.equal(qw.scale, scale.half().float()) and torch.equal(qw.zero, zero)
    assert (qw.dequantize() - w).abs().max() < 0.2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    qw = quantize_weight(weight(dtype), QuantScheme.parse("w4g32g16"))
    ref = quantize_weight(weight(dtype).float(), QuantScheme.parse("w4g32g16"))
    assert torch.equal(qw.q, ref.q) and qw.dequantize(dtype).dtype == dtype


def test_clip_is_passed_through():
    w = weight()
    plain = quantize_weight(w, QuantScheme.parse("w4g32"))
    clipped = quantize_weight(w, QuantScheme.parse("w4g32"), clip_max=torch.full((32, 1), 0.1))
    assert clipped.scales()[1, 0] < plain.scales()[1, 0]


def test_from_packed_rejects_missing_and_misshaped():
    scheme = QuantScheme.parse("w2g16g16")
    packed = quantize_weight(weight(), scheme).to_packed_tensors()
    with pytest.raises(CheckpointError, match="'min2' is missing"):
        QuantizedWeight.from_packed_tensors({k: v for k, v in packed.items() if k != "min2"}, scheme, (32, 128))
    with pytest.raises(CheckpointError, match="'codes' is"):
        QuantizedWeight.from_packed_tensors({**packed, "codes": packed["codes"][:-1]}, scheme, (32, 128))


def test_fp16_scale_overflow_is_reported():
    with pytest.raises(SchemeError, match="overflows"):
        quantize_weight(torch.tensor([[0.0, 1e7]]), QuantScheme(4, 2))
