"""Qwen2-VL adapter: preset sizes against an independent formula, structure, inputs, tiny model."""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from speedq_plugins.families import qwen2_vl
from speedq_plugins.families.qwen2_vl import Qwen2VLAdapter

REGISTRY = Path(__file__).resolve().parents[2] / "registry.toml"
PRESETS = {
    name: preset
    for name, preset in tomllib.loads(REGISTRY.read_text())["models"].items()
    if preset["family"] == "qwen2_vl" and not preset.get("tiny")
}


@pytest.fixture(scope="module")
def adapter():
    return Qwen2VLAdapter()


@pytest.fixture(scope="module")
def tiny(adapter):
    config = adapter.tiny_config()
    torch.manual_seed(0)
    return adapter.build_model(config), adapter.tiny_processor(config)


def meta_model(adapter, name):
    config = adapter.config_from_dict(PRESETS[name]["architecture"])
    with torch.device("meta"):
        return adapter.build_model(config, torch.bfloat16)


def image(seed=0, size=(48, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def params_by_part(adapter, model):
    """Parameter counts per part; a tied lm_head is one tensor, counted once (under embeddings)."""
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = adapter.part_of(name)
        parts[part] = parts.get(part, 0) + p.numel()
    return parts


def qwen2_decoder_params(t: dict) -> tuple[int, int]:
    """(all decoder layers + final norm, token embedding) of a Qwen2 LLM from its config numbers."""
    h, heads, kv, inter = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["intermediate_size"]
    d = h // heads
    attention = (h * heads * d + heads * d) + 2 * (h * kv * d + kv * d) + heads * d * h  # q,k,v biased, o not
    mlp = 3 * h * inter
    layer = attention + mlp + 2 * h  # two RMSNorms
    return t["num_hidden_layers"] * layer + h, t["vocab_size"] * h


def expected_params(arch: dict) -> dict[str, int]:
    """Qwen2-VL parameter counts by part, from the architecture numbers alone."""
    v, t = arch["vision_config"], arch["text_config"]
    e, p, tp, merge = v["embed_dim"], v["patch_size"], v["temporal_patch_size"], v["spatial_merge_size"]
    mlp = e * v["mlp_ratio"]
    block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * mlp + mlp) + (mlp * e + e)
    vision = v["in_channels"] * tp * p * p * e + v["depth"] * block  # Conv3d patch embed has no bias
    merged = e * merge**2
    projector = 2 * e + (merged * merged + merged) + (merged * v["hidden_size"] + v["hidden_size"])
    language, embeddings = qwen2_decoder_params(t)
    parts = {"vision": vision, "projector": projector, "language": language, "embeddings": embeddings}
    if not arch["tie_word_embeddings"]:
        parts["lm_head"] = t["vocab_size"] * t["hidden_size"]
    return parts


# -- presets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_formula(adapter, name):
    parts = params_by_part(adapter, meta_model(adapter, name))
    assert parts == expected_params(PRESETS[name]["architecture"])


def test_qwen2_vl_2b_size():
    """Qwen2-VL-2B-Instruct: 2,208,985,600 parameters (2.21B), lm_head tied to the embedding."""
    parts = expected_params(PRESETS["qwen2-vl-2b"]["architecture"])
    assert sum(parts.values()) == 2_208_985_600
    assert "lm_head" not in parts


def test_presets_use_gqa_so_v_to_o_is_not_scalable():
    """The language groups omit v_proj -> o_proj on the grounds that every preset uses GQA."""
    for preset in PRESETS.values():
        text = preset["architecture"]["text_config"]
        assert text["num_key_value_heads"] < text["num_attention_heads"]


# -- structure --------------------------------------------------------------------------------
def check_linear_partition(adapter, model):
    """Every nn.Linear is in exactly one of vision / projector / language / lm_head."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears
    by_part = {part: adapter.linears(model, part) for part in ("vision", "projector", "language", "lm_head")}
    assert sorted(n for names in by_part.values() for n in names) == sorted(linears)
    assert all(by_part.values()), {part: len(names) for part, names in by_part.items()}


def output_width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.weight.shape[0]  # LayerNorm / RMSNorm


def check_scaling_groups(adapter, model, component, all_blocks=True):
    groups = adapter.scaling_groups(component)
    assert groups
    blocks = adapter.blocks(model, component)
    assert blocks
    for path, block in blocks if all_blocks else blocks[:1]:
        seen: set[str] = set()
        for group in groups:
            prev = block.get_submodule(group.prev)
            block.get_submodule(group.inspect)
            for name in group.linears:
                linear = block.get_submodule(name)
                assert isinstance(linear, nn.Linear), f"{path}.{name}"
                assert adapter.part_of(f"{path}.{name}") == component
                assert output_width(prev) == linear.in_features, f"{path}: {group.prev} -> {name}"
                assert name not in seen, f"{path}.{name} is in two scaling groups"
                seen.add(name)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_structure(adapter, name):
    model = meta_model(adapter, name)
    check_linear_partition(adapter, model)
    for component in ("vision", "language"):
        check_scaling_groups(adapter, model, component, all_blocks=False)
    assert adapter.blocks(model, "projector") == []


def test_tiny_structure(adapter, tiny):
    model, _ = tiny
    check_linear_partition(adapter, model)
    for component in ("vision", "language"):
        check_scaling_groups(adapter, model, component)
    assert adapter.scaling_groups("projector") == []
    assert adapter.part_of("model.visual.merger.mlp.0") == "projector"
    assert adapter.part_of("model.visual.blocks.0.attn.qkv") == "vision"


def test_tiny_config_is_small_and_matches_tokenizer(adapter, tiny):
    model, processor = tiny
    config = model.config
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    tokenizer = processor.tokenizer
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.text_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


# -- inputs and the tiny model ----------------------------------------------------------------
def test_image_tokens_match_vision_output(adapter, tiny):
    """The processor's <|image_pad|> count equals the merged patches the vision tower produces."""
    model, processor = tiny
    inputs = adapter.build_inputs(processor, [image(0), image(1, (64, 64))], ["what color", "count"])
    ids, grid = inputs.tensors["input_ids"], inputs.tensors["image_grid_thw"]
    per_image = (grid.prod(-1) // model.config.vision_config.spatial_merge_size**2).tolist()
    assert (ids == model.config.image_token_id).sum(-1).tolist() == per_image
    with torch.no_grad():
        features = model.model.get_image_features(inputs.tensors["pixel_values"], grid).pooler_output
    assert sum(f.shape[0] for f in features) == sum(per_image)


def test_prompt_format_and_left_padding(adapter, tiny):
    _, processor = tiny
    inputs = adapter.build_inputs(processor, [image(0), image(1)], ["what color is the circle", "count"])
    ids, mask = inputs.tensors["input_ids"], inputs.tensors["attention_mask"]
    assert inputs.labels is None
    assert mask[1, 0] == 0 and mask[:, -1].all(), "batches are left-padded"
    text = processor.tokenizer.decode(ids[1][mask[1].bool()], skip_special_tokens=False)
    words = text.replace(" <|image_pad|>", "").split()
    assert words == ["<|im_start|>", "user", "<|vision_start|>", "<|vision_end|>", "count", "<|im_end|>",
                     "<|im_start|>", "assistant"]


def test_labels_mark_only_answer_and_end_token(adapter, tiny):
    _, processor = tiny
    tokenizer = processor.tokenizer
    answers = ["red", "two blue stars"]
    inputs = adapter.build_inputs(processor, [image(0), image(1)], ["what color", "count"], answers)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, answer in zip(inputs.labels, answers):
        kept = row[row != -100]
        assert kept[-1].item() == end
        assert tokenizer.decode(kept[:-1]) == answer
    padded = inputs.tensors["attention_mask"] == 0
    assert (inputs.labels[padded] == -100).all()


def test_answer_that_tokenizes_differently_is_rejected(adapter, tiny):
    """An answer whose tokens merge with the prompt's cannot be labelled: a clear error, not bad labels."""

    class MergingProcessor:
        """Tokenizes prompt + answer so that the prompt's tokens change (as a BPE merge would)."""

        def __init__(self, inner):
            self.inner, self.tokenizer = inner, inner.tokenizer

        def __call__(self, **kwargs):
            out = self.inner(**kwargs)
            if kwargs["text"][0].endswith("<|im_end|>"):
                out["input_ids"] = out["input_ids"].roll(1, dims=1)
            return out

    with pytest.raises(ValueError, match="not a prefix of prompt \\+ answer"):
        adapter.build_inputs(MergingProcessor(tiny[1]), [image(0)], ["what color"], ["red"])


def test_tiny_forward_loss_and_generate(adapter, tiny):
    model, processor = tiny
    inputs = adapter.build_inputs(processor, [image(0), image(1)], ["what color", "count"], ["red", "two"])
    with torch.no_grad():
        out = model(**inputs.model_kwargs(), labels=inputs.labels)
    assert out.logits.shape[:2] == inputs.tensors["input_ids"].shape
    assert torch.isfinite(out.loss)
    answer = adapter.generate(model, processor, image(2), "what shape", max_new_tokens=4)
    assert isinstance(answer, str)


def test_build_inputs_checks_batch_lengths(adapter, tiny):
    with pytest.raises(ValueError, match="pass one of each per sample"):
        adapter.build_inputs(tiny[1], [image(0)], ["a", "b"])


def test_plugin_hook_returns_the_adapter():
    (adapter,) = qwen2_vl.speedq_families()
    assert isinstance(adapter, Qwen2VLAdapter) and adapter.name == "qwen2_vl"
    assert adapter.model_types == ("qwen2_vl",)


def test_config_from_dict_accepts_flat_config_json(adapter):
    """The original Qwen2-VL config.json is flat; both layouts give the same text config."""
    arch = PRESETS["qwen2-vl-2b"]["architecture"]
    flat = {k: v for k, v in arch.items() if k != "text_config"}
    flat.update({k: v for k, v in arch["text_config"].items() if k != "model_type"})
    nested, flattened = adapter.config_from_dict(arch), adapter.config_from_dict(flat)
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size", "intermediate_size"):
        assert getattr(flattened.text_config, key) == getattr(nested.text_config, key)
    with pytest.raises(ValueError, match="model_type"):
        adapter.config_from_dict({**arch, "model_type": "internvl"})
