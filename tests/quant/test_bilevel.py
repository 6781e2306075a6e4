"""Bilevel scale quantization against a loop in NumPy, in the official (column-major) group order."""
import numpy as np
import pytest
import torch

from speedq_core.quant import QuantScheme, dequantize_scales, quantize_scales, quantize_weight, relative_error
from speedq_core.quant.groupwise import minmax_params


def reference_scales(scale: np.ndarray, bits: int, group: int) -> np.ndarray:
    """s_hat for S (out, n): groups are G_q consecutive rows of one column; fp16-stored s2 and m2."""
    maxq = np.float32(2**bits - 1)
    out, n = scale.shape
    s_hat = np.zeros_like(scale)
    for col in range(n):
        for start in range(0, out, group):
            vals = scale[start:start + group, col]
            lo, hi = vals.min(), vals.max()
            if lo == hi:
                lo, hi = np.float32(-1), np.float32(1)
            s2 = np.float32(np.float16(max(np.float32((hi - lo) / maxq), np.float32(1e-5))))
            m2 = np.float32(np.float16(lo))
            codes = np.clip(np.round((vals - m2) / s2), 0, maxq)
            s_hat[start:start + group, col] = codes * s2 + m2
    return s_hat


def test_scales_match_reference_in_official_order():
    torch.manual_seed(0)
    scale = torch.rand(32, 6) * 0.1 + 1e-3
    scale[:16, 2] = 0.05          # degenerate second-level group
    codes, scale2, min2 = quantize_scales(scale, 4, 16)
    assert codes.shape == (32, 6) and codes.dtype == torch.uint8 and scale2.shape == min2.shape == (6, 2)
    s_hat = dequantize_scales(codes, scale2, min2, 16)
    np.testing.assert_array_equal(s_hat.numpy(), reference_scales(scale.numpy(), 4, 16))
    assert (s_hat > 0).all()
    # a second-level group spans rows of one column: permuting rows inside a block of 16 commutes
    perm = torch.cat([torch.randperm(16), 16 + torch.randperm(16)])
    codes_p, scale2_p, min2_p = quantize_scales(scale[perm], 4, 16)
    assert torch.equal(scale2_p, scale2) and torch.equal(dequantize_scales(codes_p, scale2_p, min2_p, 16),
                                                        s_hat[perm])


def test_weight_codes_use_dequantized_scales_and_float_scale_zeros():
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    scheme = QuantScheme.parse("w4g16g16")
    qw = quantize_weight(w, scheme)
    scale, zero = minmax_params(w, 4, 16)                         # zero from the float scale (official)
    s_hat = torch.from_numpy(reference_scales(scale.numpy(), 4, 16))
    assert torch.equal(qw.zero, zero) and torch.equal(qw.scales(), s_hat)
    expected_q = (torch.round(w.view(32, 4, 16) / s_hat[..., None]) + zero[..., None].float()).clamp(0, 15)
    assert torch.equal(qw.q, expected_q.to(torch.uint8).view(32, 64))
    w_hat = (qw.q.float().view(32, 4, 16) - zero[..., None]) * s_hat[..., None]
    assert torch.equal(qw.dequantize(), w_hat.view(32, 64))


@pytest.mark.parametrize("single,bilevel", [("w4g32", "w4g32g128"), ("w2g16", "w2g16g16")])
def test_bilevel_error_increase_is_small_but_nonzero(single, bilevel):
    """4-bit second-level codes over a spread of ~+-20% of the mean scale give a scale error of about
    1% rms; that adds in quadrature to the weight rounding error (~ s/sqrt(12)), i.e. well under 1%
    relative increase. We allow 2%."""
    torch.manual_seed(2)
    w = torch.randn(256, 512) * 0.02
    err_single = relative_error(w, QuantScheme.parse(single))
    err_bilevel = relative_error(w, QuantScheme.parse(bilevel))
    increase = err_bilevel / err_single - 1
    print(f"{single}: {err_single:.5f}  {bilevel}: {err_bilevel:.5f}  increase {100 * increase:.3f}%")
    assert not torch.equal(quantize_weight(w, QuantScheme.parse(single)).dequantize(),
                           quantize_weight(w, QuantScheme.parse(bilevel)).dequantize())
    assert 0 < abs(increase) < 0.02


def test_out_features_not_divisible_by_scale_group_pad_the_last_group():
    """96 rows with G_q = 128 (and 40 with G_q = 16): the last second-level group is partial, as in the
    reference's slicing; see tests/quant/test_qembedding.py for the padding in detail."""
    for rows, scheme in ((96, "w4g32g128"), (40, "w2g16g16")):
        w = torch.randn(rows, 64)
        qw = quantize_weight(w, QuantScheme.parse(scheme))
        scale, _ = minmax_params(w, qw.scheme.bits, qw.scheme.group_size)
        np.testing.assert_array_equal(qw.scales().numpy(),
                                      reference_scales(scale.numpy(), 4, qw.scheme.scale_group_size))
