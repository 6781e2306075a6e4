"""Group-wise quantizer against a plain loop over groups in NumPy float32."""
import numpy as np
import pytest
import torch

from speedq_core.errors import SchemeError
from speedq_core.quant import dequantize_groupwise, quantize_groupwise, quantize_with_params


def reference(w: np.ndarray, bits: int, group: int):
    maxq = np.float32(2**bits - 1)
    out, n = w.shape[0], w.shape[1] // group
    q = np.zeros(w.shape, np.uint8)
    scale = np.zeros((out, n), np.float32)
    zero = np.zeros((out, n), np.uint8)
    for r in range(out):
        for g in range(n):
            vals = w[r, g * group:(g + 1) * group].astype(np.float32)
            lo, hi = vals.min(), vals.max()
            if lo == hi:
                lo, hi = np.float32(-1), np.float32(1)
            s = max(np.float32((hi - lo) / maxq), np.float32(1e-5))
            z = np.clip(np.round(-lo / s), 0, maxq)
            q[r, g * group:(g + 1) * group] = np.clip(np.round(vals / s) + z, 0, maxq)
            scale[r, g], zero[r, g] = s, z
    return q, scale, zero


def adversarial(dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(6, 64) * 0.05
    w[0, :16] = 0.0                      # zero group
    w[1, 16:32] = 0.37                   # constant group (degenerate: range -> [-1, 1])
    w[2, 3] = 40.0                       # huge outlier
    w[3, :16] = torch.linspace(0.1, 0.2, 16)  # all-positive group: zero point clamps to 0
    w[4, 32:48] = -torch.linspace(0.1, 0.2, 16)  # all-negative group: zero point clamps to maxq
    w[5, 48:] = 1e-7 * torch.randn(16)   # tiny range: scale floored at 1e-5
    return w.to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(bits, dtype):
    w = adversarial(dtype)
    q, scale, zero = quantize_groupwise(w, bits, 16)
    rq, rscale, rzero = reference(w.float().numpy(), bits, 16)
    assert q.dtype == torch.uint8 and zero.dtype == torch.uint8 and scale.dtype == torch.float32
    assert q.shape == (6, 64) and scale.shape == zero.shape == (6, 4)
    np.testing.assert_array_equal(q.numpy(), rq)
    np.testing.assert_array_equal(scale.numpy(), rscale)
    np.testing.assert_array_equal(zero.numpy(), rzero)


def test_dequantize_and_error_bound():
    torch.manual_seed(1)
    w = torch.randn(8, 128)
    q, scale, zero = quantize_groupwise(w, 4, 32)
    w_hat = dequantize_groupwise(q, scale, zero, 32)
    assert torch.equal(w_hat, ((q.float().view(8, 4, 32) - zero.float()[..., None]) * scale[..., None]).view(8, 128))
    # inside the range the error is at most half a step (+ the zero-point rounding, another half step)
    step = scale.repeat_interleave(32, dim=1)
    assert ((w_hat - w).abs() <= step + 1e-6).all()
    assert w_hat[0].unique().numel() <= 16 * 4


def test_degenerate_groups():
    w = adversarial()
    q, scale, zero = quantize_groupwise(w, 4, 16)
    w_hat = dequantize_groupwise(q, scale, zero, 16)
    assert torch.equal(w_hat[0, :16], torch.zeros(16))           # zeros stay exactly zero
    assert scale[1, 1] == pytest.approx(2 / 15)                   # official [-1, +1] range
    assert (w_hat[1, 16:32] - 0.37).abs().max() <= 1 / 15 + 1e-6


def test_outlier_dominates_its_group_only():
    w = adversarial()
    q, scale, zero = quantize_groupwise(w, 4, 16)
    assert scale[2, 0] > 1.0 and scale[2, 1] < 0.1


def test_quantize_with_params_matches_rtn_for_its_own_params():
    w = adversarial()
    q, scale, zero = quantize_groupwise(w, 3, 16)
    assert torch.equal(quantize_with_params(w, scale, zero, 3), q)
    # fixed params clamp out-of-range weights to the code range
    clamped = quantize_with_params(w * 100, scale, zero, 3)
    assert clamped.max() <= 7


def test_clip_bounds_applied_before_min_max():
    w = adversarial()
    clip_max = torch.full((6, 1), 0.5)   # per row
    q, scale, zero = quantize_groupwise(w, 4, 16, clip_max=clip_max)
    rq, rscale, _ = reference(w.clamp(max=0.5).numpy(), 4, 16)
    np.testing.assert_array_equal(q.numpy(), rq)
    assert scale[2, 0] < 0.1
    per_group = torch.full((6, 4), -0.05)
    per_group[0, 1] = -1.0  # this group keeps its own minimum
    _, scale_lo, _ = quantize_groupwise(w, 4, 16, clip_min=per_group)
    _, scale_none, _ = quantize_groupwise(w, 4, 16)
    assert w[0, 16:32].min() < -0.05 and w[0, 32:48].min() < -0.05
    assert scale_lo[0, 1] == scale_none[0, 1] and scale_lo[0, 2] < scale_none[0, 2]


def test_group_size_must_divide_in_features():
    with pytest.raises(SchemeError, match=r"does not divide in_features=96 of a \(4, 96\) weight: use group size 32"):
        quantize_groupwise(torch.randn(4, 96), 4, 64)
    with pytest.raises(SchemeError, match="2-D"):
        quantize_groupwise(torch.randn(4, 4, 4), 4, 4)
