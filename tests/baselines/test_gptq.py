import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import correlated, tiny_llama, token_batches

from baselines.gptq import GPTQ, GPTQConfig, HessianAccumulator, gptq_quantize
from baselines.rtn import RTN
from speedq_core.errors import SpeedqError
from speedq_core.method import QuantContext
from speedq_core.quant import QuantLinear, QuantScheme, quantize_weight


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.hessian()


def output_error(w, w_hat, x) -> float:
    return float((x @ (w - w_hat).t()).pow(2).mean())


@pytest.mark.parametrize("scheme", ["w4g16", "w2g16", "w3g32g16"])
def test_identity_hessian_is_rtn_exactly(scheme):
    scheme = QuantScheme.parse(scheme)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    ours, _ = gptq_quantize(w, torch.eye(64), scheme, GPTQConfig(block_size=32))
    rtn = quantize_weight(w, scheme)
    assert torch.equal(ours.q, rtn.q) and torch.equal(ours.zero, rtn.zero)
    assert torch.equal(ours.scales(), rtn.scales())
    assert torch.equal(ours.dequantize(), rtn.dequantize())


def test_error_feedback_matches_obs_by_hand():
    """2x4 weight, one group: GPTQ equals the OBS recursion with explicit inverses of H_F (no Cholesky)."""
    w = np.array([[0.31, -0.72, 0.55, 0.08], [-0.44, 0.27, 0.93, -0.61]])
    a = np.array([[1.0, 0.6, 0.2, 0.1], [0.3, 1.0, 0.5, 0.2], [0.2, 0.1, 1.0, 0.4], [0.5, 0.2, 0.3, 1.0]])
    h = a @ a.T
    damp = 0.01
    bits = 4
    maxq = 2 ** bits - 1
    lo, hi = w.min(axis=1), w.max(axis=1)
    s = np.float16((hi - lo) / maxq).astype(np.float64)  # stored fp16 like the package
    z = np.clip(np.round(-lo / ((hi - lo) / maxq)), 0, maxq)
    hd = h + damp * np.mean(np.diag(h)) * np.eye(4)
    cur = w.copy()
    codes = np.zeros_like(w)
    for i in range(4):
        hinv = np.linalg.inv(hd[i:, i:])
        q = np.clip(np.round(cur[:, i] / s) + z, 0, maxq)
        codes[:, i] = q
        w_hat = (q - z) * s
        cur[:, i:] -= np.outer((cur[:, i] - w_hat) / hinv[0, 0], hinv[0, :])
    ours, _ = gptq_quantize(torch.tensor(w, dtype=torch.float32), torch.tensor(h, dtype=torch.float32),
                            QuantScheme(bits, 4), GPTQConfig(damp=damp))
    assert ours.q.numpy().tolist() == codes.astype(np.uint8).tolist()
    assert np.allclose(ours.dequantize().numpy(), (codes - z[:, None]) * s[:, None], atol=1e-6)


def test_dead_columns_are_zeroed():
    g = torch.Generator().manual_seed(1)
    x = correlated(256, 32, g)
    x[:, 5] = 0
    w = torch.randn(16, 32, generator=g)
    ours, info = gptq_quantize(w, hessian_of(x), QuantScheme(4, 16))
    w_hat = ours.dequantize()
    assert info["dead_columns"] == 1
    assert torch.isfinite(w_hat).all() and torch.all(w_hat[:, 5] == 0)


def test_nan_hessian_names_the_layer():
    h = torch.eye(16)
    h[3, 4] = float("nan")
    with pytest.raises(SpeedqError, match="layers.0.mlp.down_proj.*NaN"):
        gptq_quantize(torch.randn(8, 16), h, QuantScheme(4, 16), name="layers.0.mlp.down_proj")


def test_nan_activations_in_a_model_name_the_layer(adapter):
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("inf")
    batches = [{"input_ids": torch.tensor([[7, 8, 9, 10]])}]
    ctx = QuantContext({"language": QuantScheme(4, 16)}, Path("unused"), calibration=batches)
    with pytest.raises(SpeedqError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        GPTQ().quantize(model, adapter, ctx)


@pytest.mark.parametrize("scheme", ["w4g32", "w2g16", "w4g32g16"])
@pytest.mark.parametrize("act_order", [False, True])
def test_lower_layer_error_than_rtn(scheme, act_order):
    scheme = QuantScheme.parse(scheme)
    g = torch.Generator().manual_seed(2)
    x = correlated(2048, 128, g)
    w = torch.randn(64, 128, generator=g) * 0.05
    ours, _ = gptq_quantize(w, hessian_of(x), scheme, GPTQConfig(act_order=act_order))
    rtn = quantize_weight(w, scheme)
    assert output_error(w, ours.dequantize(), x) < 0.7 * output_error(w, rtn.dequantize(), x)


@pytest.mark.parametrize("scheme", ["w4g32", "w2g16"])
def test_model_quantization_beats_rtn(adapter, scheme):
    model = tiny_llama()
    calib, held_out = token_batches(8), token_batches(4, seed=9)
    errors = {}
    for method in (RTN(), GPTQ()):
        quantized = copy.deepcopy(model)
        ctx = QuantContext({"language": QuantScheme.parse(scheme)}, Path("unused"), calibration=calib)
        summary = method.quantize(quantized, adapter, ctx)
        assert all(isinstance(m, QuantLinear) for n, m in quantized.named_modules() if n.endswith("_proj"))
        with torch.no_grad():
            errors[method.name] = sum(float((quantized(**b).logits - model(**b).logits).pow(2).mean())
                                      for b in held_out)
    assert summary["language"]["linears"] == 14
    assert errors["gptq"] < 0.5 * errors["rtn"]


def test_true_sequential_stages_follow_the_forward(adapter):
    from speedq_core.calibration import capture_block_inputs, linear_stages

    model = tiny_llama()
    inputs = capture_block_inputs(model, adapter, "language", token_batches(1))
    names = ["mlp.down_proj", "mlp.up_proj", "self_attn.o_proj", "mlp.gate_proj", "self_attn.k_proj",
             "self_attn.q_proj", "self_attn.v_proj"]
    stages = linear_stages(model.model.layers[0], inputs.samples[0], names)
    assert [sorted(s) for s in stages] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"],
    ]


def test_missing_calibration_is_a_clear_error(adapter):
    ctx = QuantContext({"language": QuantScheme(4, 32)}, Path("unused"))
    with pytest.raises(SpeedqError, match="needs calibration data"):
        GPTQ().quantize(tiny_llama(), adapter, ctx)


def test_consumed_hessian_gives_the_same_codes_and_inverse_is_exact():
    """The memory-saving path (Hessian taken from the accumulator and damped in place) quantizes
    exactly like the copying path, and U^T U is the inverse of the damped Hessian."""
    from baselines.gptq import inverse_cholesky

    x = correlated(512, 64, torch.Generator().manual_seed(3))
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(4))
    scheme = QuantScheme.parse("w3g16")
    acc = HessianAccumulator(64)
    acc.add(x)
    reference = acc.hessian()
    copied, _ = gptq_quantize(w, reference, scheme, GPTQConfig(block_size=32))
    assert torch.equal(reference, acc.hessian())  # the copying path leaves the caller's H alone
    consumed, _ = gptq_quantize(w, acc.take_hessian(), scheme, GPTQConfig(block_size=32), consume_hessian=True)
    assert acc.sum is None
    assert torch.equal(copied.q, consumed.q) and torch.equal(copied.zero, consumed.zero)
    upper, lam = inverse_cholesky(reference.clone(), 0.01, "x")
    damped = reference.double() + lam * torch.eye(64, dtype=torch.float64)
    assert torch.allclose((upper.t() @ upper).double() @ damped, torch.eye(64, dtype=torch.float64), atol=1e-3)


def test_release_freed_memory_runs_on_glibc():
    import platform

    from speedq_core.calibration import release_freed_memory

    released = release_freed_memory()
    assert released is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
