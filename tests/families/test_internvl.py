"""InternVL adapter: preset sizes against an independent formula and the paper, structure, inputs, tiny model."""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from speedq_plugins.families import internvl
from speedq_plugins.families.internvl import InternVLAdapter

REGISTRY = Path(__file__).resolve().parents[2] / "registry.toml"
PRESETS = {
    name: preset
    for name, preset in tomllib.loads(REGISTRY.read_text())["models"].items()
    if preset["family"] == "internvl" and not preset.get("tiny")
}
MiB = 2**20


@pytest.fixture(scope="module")
def adapter():
    return InternVLAdapter()


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


def expected_params(arch: dict) -> dict[str, int]:
    """InternVL parameter counts by part, from the architecture numbers alone."""
    v, t = arch["vision_config"], arch["text_config"]
    d, inter, (ph, pw), (ih, iw) = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["image_size"]
    patches = (ih // ph) * (iw // pw)
    embeddings = v["num_channels"] * ph * pw * d + d + d + (patches + 1) * d  # conv + bias, CLS, positions
    attention = 3 * (d * d + d * v["attention_bias"]) + (d * d + d)  # q, k, v; projection_layer
    layer = attention + (d * inter + inter) + (inter * d + d) + 2 * 2 * d + 2 * d  # MLP, 2 LayerNorms, 2 layer scales
    vision = embeddings + v["num_hidden_layers"] * layer  # use_mean_pooling: no final norm
    shuffled = d * round(1 / arch["downsample_ratio"]) ** 2
    h = t["hidden_size"]
    projector = 2 * shuffled + (shuffled * h + h) + (h * h + h)

    heads, kv, mlp = t["num_attention_heads"], t["num_key_value_heads"], t["intermediate_size"]
    hd = h // heads
    decoder = (h * heads * hd + heads * hd) + 2 * (h * kv * hd + kv * hd) + heads * hd * h + 3 * h * mlp + 2 * h
    parts = {
        "vision": vision,
        "projector": projector,
        "language": t["num_hidden_layers"] * decoder + h,
        "embeddings": t["vocab_size"] * h,
    }
    if not arch["tie_word_embeddings"]:
        parts["lm_head"] = t["vocab_size"] * h
    return parts


# -- presets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_formula(adapter, name):
    parts = params_by_part(adapter, meta_model(adapter, name))
    assert parts == expected_params(PRESETS[name]["architecture"])


@pytest.mark.parametrize(
    ("name", "total_m", "vision_m", "bf16_mib"),
    [
        ("internvl3-1b", 938.1, 304.0, 1789),  # paper: "304M out of 938M", Table 2: 1789 MB (MiB)
        ("internvl3-2b", 2088.9, 304.0, 3984),
        ("internvl2.5-1b", 938.1, 304.0, 1789),
    ],
)
def test_preset_matches_paper(name, total_m, vision_m, bf16_mib):
    parts = expected_params(PRESETS[name]["architecture"])
    total = sum(parts.values())
    assert abs(total / 1e6 - total_m) < 0.1
    assert abs(parts["vision"] / 1e6 - vision_m) < 0.1
    assert int(total * 2 / MiB) == bf16_mib
    assert "lm_head" in parts, "InternVL 1B/2B have an untied lm_head"


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
    assert len(adapter.blocks(model, "vision")) == PRESETS[name]["architecture"]["vision_config"]["num_hidden_layers"]


def test_tiny_structure(adapter, tiny):
    model, _ = tiny
    check_linear_partition(adapter, model)
    for component in ("vision", "language"):
        check_scaling_groups(adapter, model, component)
    assert adapter.scaling_groups("projector") == []
    assert adapter.part_of("model.language_model.embed_tokens.weight") == "embeddings"
    assert adapter.part_of("lm_head") == "lm_head"


def test_tiny_config_is_small_and_matches_tokenizer(adapter, tiny):
    model, processor = tiny
    config = model.config
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    tokenizer = processor.tokenizer
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert config.text_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight


# -- inputs and the tiny model ----------------------------------------------------------------
def test_image_expansion_matches_config(adapter, tiny):
    """One untiled image: <img> + image_seq_length x <IMG_CONTEXT> + </img>, the ViT's token count
    after the pixel shuffle."""
    model, processor = tiny
    config = model.config
    inputs = adapter.build_inputs(processor, [image(0), image(1, (80, 30))], ["what color", "count"])
    ids = inputs.tensors["input_ids"]
    assert inputs.tensors["pixel_values"].shape == (2, 3, *config.vision_config.image_size)
    assert (ids == config.image_token_id).sum(-1).tolist() == [config.image_seq_length] * 2
    with torch.no_grad():
        features = model.model.get_image_features(inputs.tensors["pixel_values"]).pooler_output
    assert features.shape[1] == config.image_seq_length == processor.image_seq_length


def test_prompt_format_and_left_padding(adapter, tiny):
    _, processor = tiny
    inputs = adapter.build_inputs(processor, [image(0), image(1)], ["what color is the circle", "count"])
    ids, mask = inputs.tensors["input_ids"], inputs.tensors["attention_mask"]
    assert inputs.labels is None
    assert mask[1, 0] == 0 and mask[:, -1].all(), "batches are left-padded"
    text = processor.tokenizer.decode(ids[1][mask[1].bool()], skip_special_tokens=False)
    words = text.replace(" <IMG_CONTEXT>", "").split()
    assert words == ["<|im_start|>", "user", "<img>", "</img>", "count", "<|im_end|>", "<|im_start|>", "assistant"]


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


def test_tiny_forward_loss_and_generate(adapter, tiny):
    model, processor = tiny
    inputs = adapter.build_inputs(processor, [image(0), image(1)], ["what color", "count"], ["red", "two"])
    with torch.no_grad():
        out = model(**inputs.model_kwargs(), labels=inputs.labels)
    assert out.logits.shape[:2] == inputs.tensors["input_ids"].shape
    assert torch.isfinite(out.loss)
    answer = adapter.generate(model, processor, image(2), "what shape", max_new_tokens=4)
    assert isinstance(answer, str)


def test_tiny_processor_leaves_shared_tokenizer_alone(adapter, tiny):
    from speedq_plugins.tiny_tokenizer import build_tiny_tokenizer

    assert tiny[1].tokenizer is not build_tiny_tokenizer()
    assert not hasattr(build_tiny_tokenizer(), "context_image_token")


def test_plugin_hook_returns_the_adapter():
    (adapter,) = internvl.speedq_families()
    assert isinstance(adapter, InternVLAdapter) and adapter.name == "internvl"
    assert adapter.model_types == ("internvl",)
