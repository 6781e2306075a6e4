import copy
from pathlib import Path

import pytest
import torch
from conftest import correlated, tiny_llama, token_batches
from torch import nn

from baselines.awq import AWQ, AWQConfig, apply_scale, awq_clip, should_clip
from baselines.rtn import RTN
from speedq_core.adapter import ScalingGroup
from speedq_core.calibration import capture_block_inputs, component_units
from speedq_core.errors import SpeedqError
from speedq_core.method import QuantContext
from speedq_core.quant import QuantLinear, QuantScheme
from speedq_core.quant.groupwise import dequantize_groupwise, quantize_groupwise


@torch.no_grad()
def test_scaling_keeps_the_float_function(adapter):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    batches = token_batches(2)
    inputs = capture_block_inputs(model, adapter, "language", batches)
    stats = {"groups": {}, "linears": {}}
    for index, (path, block) in enumerate(component_units(model, adapter, "language")):
        rels = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        outputs, _ = AWQ().scale_unit(block, path, index, inputs, rels, adapter.scaling_groups("language"),
                                      QuantScheme(4, 32), AWQConfig(n_grid=5), {}, stats)
        inputs = inputs.replace_hidden(outputs)
    assert len(stats["groups"]) == 8 and any(g["ratio"] > 0 for g in stats["groups"].values())
    changed = model.model.layers[0].input_layernorm.weight
    assert not torch.equal(changed, reference.model.layers[0].input_layernorm.weight)
    for batch in token_batches(2, seed=7):
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_apply_scale_to_layernorm_with_bias_and_linear_rows():
    torch.manual_seed(0)
    block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 6), nn.Linear(6, 4))
    x = torch.randn(5, 8)
    before = block(x)
    apply_scale(block, ScalingGroup("0", ("1",), "1"), torch.rand(8) + 0.5)
    apply_scale(block, ScalingGroup("1", ("2",), "2"), torch.rand(6) + 0.5)
    torch.testing.assert_close(block(x), before, rtol=1e-5, atol=1e-6)
    with pytest.raises(SpeedqError, match="cannot fold AWQ scales into 'act'"):
        apply_scale(nn.ModuleDict({"act": nn.GELU(), "fc": nn.Linear(8, 4)}), ScalingGroup("act", ("fc",), "fc"),
                    torch.ones(8))


def test_clip_search_never_worse_than_no_clip():
    g = torch.Generator().manual_seed(3)
    x = correlated(600, 64, g)
    w = torch.randn(32, 64, generator=g)
    w[0, 5] = 8.0  # an outlier weight worth clipping
    scheme = QuantScheme(3, 32)
    max_val = awq_clip(w, x, scheme)
    assert max_val.shape == (32, 2) and torch.all(max_val <= w.abs().reshape(32, 2, 32).amax(-1) + 1e-7)

    def error(lo, hi):
        q, s, z = quantize_groupwise(w, 3, 32, lo, hi)
        return float((x @ (dequantize_groupwise(q, s, z, 32) - w).t()).pow(2).mean())

    assert error(-max_val, max_val) < error(None, None)
    assert should_clip("mlp.down_proj") and not should_clip("self_attn.q_proj") and not should_clip("attn.qkv")


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["w4g32", "w2g16"])
def test_lower_output_error_than_rtn(adapter, scheme):
    model = tiny_llama()
    calib, held_out = token_batches(4), token_batches(4, seed=9)
    errors = {}
    for method in (RTN(), AWQ()):
        quantized = copy.deepcopy(model)
        ctx = QuantContext({"language": QuantScheme.parse(scheme)}, Path("unused"), calibration=calib)
        method.quantize(quantized, adapter, ctx)
        assert sum(isinstance(m, QuantLinear) for m in quantized.modules()) == 14
        with torch.no_grad():
            errors[method.name] = sum(float((quantized(**b).logits - model(**b).logits).pow(2).mean())
                                      for b in held_out)
    assert errors["awq"] < 0.8 * errors["rtn"]


def test_bad_options_are_named():
    with pytest.raises(SpeedqError, match="clip='maybe'"):
        AWQConfig(clip="maybe")
