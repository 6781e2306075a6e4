"""FastVLM adapter: preset sized against formula (LLM + projector) and timm (vision tower), tiny model
end to end, structure of the conv-heavy FastViT tower."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from speedq_plugins.families import fast_vlm
from speedq_plugins.families.fast_vlm import FastVLMAdapter
from family_checks import (
    check_component_split,
    check_labels,
    check_scaling_groups,
    check_tiny_end_to_end,
    decoder_params,
    image,
    on_meta,
    parts,
    projector_params,
    registry_models,
)


@pytest.fixture(scope="module")
def adapter() -> FastVLMAdapter:
    return FastVLMAdapter()


@pytest.fixture(scope="module")
def tiny(adapter):
    torch.manual_seed(0)
    config = adapter.tiny_config()
    return config, adapter.build_model(config), adapter.tiny_processor(config)


@pytest.fixture(scope="module")
def real(adapter):
    return on_meta(adapter, registry_models()["fastvlm-0.5b"]["architecture"])


def bare_timm_params(vision: dict) -> int:
    """timm's own count of the tower: the bare model without classifier, as TimmWrapperModel builds it."""
    with torch.device("meta"):
        model = timm.create_model(vision["architecture"], pretrained=False, num_classes=0, **vision["model_args"])
    return sum(p.numel() for p in model.parameters())


def test_preset_parameter_count(adapter, real):
    preset = registry_models()["fastvlm-0.5b"]
    assert preset["family"] == "fast_vlm"
    arch = preset["architecture"]
    text, vision = arch["text_config"], arch["vision_config"]
    expected = decoder_params(text, qkv_bias=True)  # Qwen2: biases on q, k, v
    expected["projector"] = projector_params(vision["hidden_size"], text["hidden_size"])
    expected["vision"] = bare_timm_params(vision)
    counts = parts(real, adapter)
    assert {k: counts.get(k, 0) for k in expected} == expected and set(counts) <= set(expected)
    assert expected["lm_head"] == 0  # tied to the embeddings, like Qwen2-0.5B
    assert real.lm_head.weight is real.get_submodule(adapter.embeddings_path).weight
    assert round(sum(counts.values()) / 1e9, 2) == 0.62


def test_vision_linears_and_convs(adapter, real):
    """Only the attention linears of stages 3-4 are nn.Linear: ~23% of the tower; the rest is conv."""
    tower = real.get_submodule(adapter.component_paths["vision"])
    linear = sum(m.weight.numel() for m in tower.modules() if isinstance(m, nn.Linear))
    conv = sum(m.weight.numel() for m in tower.modules() if isinstance(m, nn.Conv2d))
    total = sum(p.numel() for p in tower.parameters())
    assert round(linear / total, 3) == 0.231 and round(conv / total, 3) == 0.768
    names = {n.split("timm_model.")[1] for n in adapter.linears(real, "vision")}
    assert names == {f"stages.{s}.blocks.{j}.token_mixer.{p}" for s, n in ((3, 4), (4, 2)) for j in range(n)
                     for p in ("qkv", "proj")}


def test_vision_blocks_are_the_stage_blocks_in_order(adapter, real):
    paths = [p for p, _ in adapter.blocks(real, "vision")]
    assert len(paths) == 2 + 12 + 24 + 4 + 2
    assert paths[0].endswith("stages.0.blocks.0") and paths[-1].endswith("stages.4.blocks.1")
    assert len(adapter.blocks(real, "language")) == 24


def test_tiny_preset_is_registered():
    preset = registry_models()["tiny-fastvlm"]
    assert preset["family"] == "fast_vlm" and preset["tiny"] is True and "architecture" not in preset


def test_tiny_end_to_end(adapter):
    check_tiny_end_to_end(adapter)


def test_component_split(adapter, tiny, real):
    check_component_split(tiny[1], adapter)
    check_component_split(real, adapter)


@pytest.mark.parametrize("component, groups", [("vision", 1), ("language", 3), ("projector", 0)])
def test_scaling_groups(adapter, tiny, real, component, groups):
    assert len(adapter.scaling_groups(component)) == groups
    if component == "vision":  # only the attention blocks (tiny: 2 + 1, real: 4 + 2) hold linears
        assert check_scaling_groups(tiny[1], adapter, "vision") == 3
        assert check_scaling_groups(real, adapter, "vision") == 6
    elif component == "language":
        assert check_scaling_groups(tiny[1], adapter, "language") == 2 * groups
        assert check_scaling_groups(real, adapter, "language") == 24 * groups


def test_no_v_to_o_group_under_grouped_query_attention(adapter, real):
    block = adapter.blocks(real, "language")[0][1]
    assert block.self_attn.v_proj.out_features != block.self_attn.o_proj.in_features
    assert all(g.prev != "self_attn.v_proj" for g in adapter.scaling_groups("language"))


def test_labels_mark_only_answer_and_end_of_turn(adapter, tiny):
    check_labels(adapter, tiny[2], ["<|im_end|>"])


def test_prompt_format(adapter, tiny):
    config, _, processor = tiny
    ids = adapter.build_inputs(processor, [image()], ["what color"]).tensors["input_ids"][0]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    assert tokens[0] == "<|im_start|>" and tokens[-3:] == ["<|im_end|>", "<|im_start|>", "assistant"]
    assert tokens.count("<image>") == config.image_seq_length == 4


def test_processor_gives_256_tokens_at_1024px(adapter):
    config = adapter.config_from_dict(registry_models()["fastvlm-0.5b"]["architecture"])
    processor = adapter.tiny_processor(config)  # the classes and arguments of the converted checkpoint
    out = processor(images=[image(size=(700, 500))], text=["<image>\nhi"], return_tensors="pt")
    assert out["pixel_values"].shape[-2:] == (1024, 1024)
    assert (out["input_ids"] == processor.image_token_id).sum() == config.image_seq_length == 256


def test_hook_provides_the_adapter():
    (provided,) = fast_vlm.speedq_families()
    assert isinstance(provided, FastVLMAdapter) and provided.name == "fast_vlm"
