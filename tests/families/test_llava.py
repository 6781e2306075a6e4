"""LLaVA-1.5 adapter: presets sized against the architecture formula, tiny model end to end, structure.

The adapter checks at the top (component split, scaling groups, labels) are shared with the other
family tests, which import them from here.
"""
from __future__ import annotations

import math

import pytest
import torch

from speedq_plugins.families import llava
from speedq_plugins.families.llava import LlavaAdapter

from family_checks import (  # noqa: E402
    registry_models,
    on_meta,
    parts,
    decoder_params,
    projector_params,
    check_component_split,
    check_scaling_groups,
    image,
    check_labels,
    check_tiny_end_to_end,
)


# ---- LLaVA ---------------------------------------------------------------------------------------
def clip_vision_params(v: dict) -> int:
    d, i, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    positions = (v["image_size"] // p) ** 2 + 1
    embeddings = v["num_channels"] * p * p * d + d + positions * d
    layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d
    return embeddings + 2 * d + v["num_hidden_layers"] * layer + 2 * d  # pre_layrnorm, layers, post_layernorm


@pytest.fixture(scope="module")
def adapter() -> LlavaAdapter:
    return LlavaAdapter()


@pytest.fixture(scope="module")
def tiny(adapter):
    torch.manual_seed(0)
    config = adapter.tiny_config()
    return config, adapter.build_model(config), adapter.tiny_processor(config)


@pytest.mark.parametrize("name, billions", [("llava-1.5-7b", 7.06), ("llava-1.5-13b", 13.35)])
def test_preset_parameter_count_matches_formula(adapter, name, billions):
    preset = registry_models()[name]
    assert preset["family"] == "llava" and preset["hf_id"].startswith("llava-hf/")
    arch = preset["architecture"]
    counts = parts(on_meta(adapter, arch), adapter)
    text, vision = arch["text_config"], arch["vision_config"]
    expected = decoder_params(text, qkv_bias=False)
    expected["vision"] = clip_vision_params(vision)
    expected["projector"] = projector_params(vision["hidden_size"], text["hidden_size"])
    assert counts == expected
    assert round(sum(counts.values()) / 1e9, 2) == billions


def test_tiny_preset_is_registered():
    preset = registry_models()["tiny-llava"]
    assert preset["family"] == "llava" and preset["tiny"] is True and "architecture" not in preset


def test_tiny_end_to_end(adapter):
    check_tiny_end_to_end(adapter)


def test_component_split(adapter, tiny):
    _, model, _ = tiny
    check_component_split(model, adapter)
    assert len(adapter.blocks(model, "vision")) == 4 and len(adapter.blocks(model, "language")) == 4


def test_component_split_of_real_architecture(adapter):
    check_component_split(on_meta(adapter, registry_models()["llava-1.5-7b"]["architecture"]), adapter)


@pytest.mark.parametrize("component, groups", [("vision", 3), ("language", 4), ("projector", 0)])
def test_scaling_groups(adapter, tiny, component, groups):
    _, model, _ = tiny
    assert len(adapter.scaling_groups(component)) == groups
    if groups:
        assert check_scaling_groups(model, adapter, component) == 4 * groups  # 4 blocks each


def test_scaling_groups_on_real_architecture(adapter):
    model = on_meta(adapter, registry_models()["llava-1.5-7b"]["architecture"])
    assert check_scaling_groups(model, adapter, "vision") == 24 * 3
    assert check_scaling_groups(model, adapter, "language") == 32 * 4  # Vicuna is MHA: v -> o holds


def test_labels_mark_only_answer_and_eos(adapter, tiny):
    check_labels(adapter, tiny[2], ["</s>"])


def test_prompt_format(adapter, tiny):
    _, _, processor = tiny
    inputs = adapter.build_inputs(processor, [image()], ["what color"])
    text = processor.tokenizer.decode(inputs.tensors["input_ids"][0])
    assert text.startswith("USER : <image>") and text.endswith("what color ASSISTANT :")
    vision = tiny[0].vision_config
    patches = (vision.image_size // vision.patch_size) ** 2  # CLS dropped
    assert (inputs.tensors["input_ids"] == tiny[0].image_token_id).sum() == patches


def test_processor_gives_576_tokens_at_336px(adapter):
    config = adapter.config_from_dict(registry_models()["llava-1.5-7b"]["architecture"])
    processor = adapter.tiny_processor(config)  # same classes and arguments as llava-hf's processor
    out = processor(images=[image(size=(500, 400))], text=["USER: <image>\nhi ASSISTANT:"], return_tensors="pt")
    assert out["pixel_values"].shape[-2:] == (336, 336)
    n = (out["input_ids"] == processor.image_token_id).sum().item()
    assert n == config.image_seq_length == math.prod([336 // 14] * 2)


def test_config_from_dict_rejects_other_model_type(adapter):
    with pytest.raises(ValueError, match="model_type"):
        adapter.config_from_dict({"model_type": "fast_vlm"})


def test_hook_provides_the_adapter():
    (provided,) = llava.speedq_families()
    assert isinstance(provided, LlavaAdapter) and provided.name == "llava"
