"""The run pipeline on every tiny family: RTN -> packed export -> reload bit-exact -> dequantized
checkpoint that plain transformers loads; resumption and its refusal of a different config."""
import copy
import json

import pytest
import torch
from PIL import Image

from speedq_core.errors import SchemeError, SpeedqError
from speedq_core.export import load_quantized
from speedq_core.models import load_model
from speedq_core.quant import to_plain_linears
from speedq_core.plugins import get_plugins
from speedq_core.registry import load_registry
from speedq_core.runner import execute, resolve_config

TINY = ["tiny-internvl", "tiny-qwen2-vl", "tiny-fastvlm", "tiny-llava"]


@pytest.fixture(scope="module")
def env():
    return load_registry(), get_plugins()


def _logits(loaded, model):
    image = Image.new("RGB", (48, 48), (200, 30, 30))
    inputs = loaded.adapter.build_inputs(loaded.processor, [image], ["What color is the circle?"])
    with torch.no_grad():
        return model(**inputs.model_kwargs()).logits


@pytest.mark.parametrize("name", TINY)
def test_rtn_export_reloads_bit_exact_and_dequantized_loads_in_transformers(env, tmp_path, name):
    registry, plugins = env
    parts = ("vision", "projector", "language")
    # w4g32: the tiny vision towers are 64 wide, too narrow for the default g128
    config = resolve_config(registry, plugins, name, "rtn", 4, scheme="w4g32", components=parts)
    execute(config, tmp_path, registry, plugins)
    preset = registry.model(name)
    adapter = plugins.family(preset.family)
    quantized = load_model(preset, adapter, seed=config.seed)
    ref = load_model(preset, adapter, seed=config.seed)
    load_quantized(quantized.model, tmp_path / "quantized")
    # the in-memory quantized model of the run, rebuilt: quantize the same weights again
    plugins.method("rtn").quantize(ref.model, adapter, _ctx(registry, parts, tmp_path))
    assert torch.equal(_logits(quantized, quantized.model), _logits(ref, ref.model))

    deq = adapter.model_class().from_pretrained(tmp_path / "dequantized", dtype=torch.float32)
    assert not any("Quant" in type(m).__name__ for m in deq.modules())
    # the packed model with every w_hat and every other parameter rounded to bf16, built here directly
    # (buffers such as rotary frequencies are recomputed by from_pretrained, so they are not rounded)
    mirror = copy.deepcopy(ref.model)
    to_plain_linears(mirror, torch.bfloat16)
    for param in mirror.parameters():
        param.data = param.data.to(torch.bfloat16).to(torch.float32)
    assert torch.allclose(_logits(ref, deq), _logits(ref, mirror), atol=1e-5, rtol=1e-5), \
        "dequantized (bf16) checkpoint is not the packed model's w_hat in bf16"
    sizes = json.loads((tmp_path / "size.json").read_text())
    quantized_parts = {c["name"] for c in sizes["components"] if c["n_quantized"]}
    assert quantized_parts <= set(parts) and "language" in quantized_parts


def _ctx(registry, parts, tmp_path):
    from speedq_core.method import QuantContext

    return QuantContext({p: registry.scheme("w4g32") for p in parts}, tmp_path / "stages")


def test_rerun_resumes_and_a_different_config_is_refused(env, tmp_path):
    registry, plugins = env
    config = resolve_config(registry, plugins, "tiny-internvl", "rtn", 2)
    first = execute(config, tmp_path, registry, plugins)
    assert "quantize_s" in first["timings"]
    again = execute(config, tmp_path, registry, plugins)
    assert "quantize_s" not in again["timings"]  # reused quantized/
    assert again["size"] == first["size"]
    other = resolve_config(registry, plugins, "tiny-internvl", "rtn", 4)
    with pytest.raises(SpeedqError, match="different bits, schemes"):
        execute(other, tmp_path, registry, plugins)


def test_group_size_that_does_not_divide_names_the_layer(env, tmp_path):
    registry, plugins = env
    config = resolve_config(registry, plugins, "tiny-qwen2-vl", "rtn", 4, components=("vision",))
    with pytest.raises(SchemeError, match=r"model\.visual\.\S+: group size 128 does not divide"):
        execute(config, tmp_path, registry, plugins)
    assert not (tmp_path / "quantized").exists()


def test_bad_bits_and_scheme_mismatch_are_clear(env):
    registry, plugins = env
    with pytest.raises(SchemeError, match="does not support 5-bit"):
        resolve_config(registry, plugins, "tiny-internvl", "rtn", 5)
    with pytest.raises(SpeedqError, match="is 4-bit but --bits 2"):
        resolve_config(registry, plugins, "tiny-internvl", "rtn", 2, scheme="w4g32")
