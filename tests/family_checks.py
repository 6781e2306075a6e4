"""Checks every family adapter must pass, shared by the family tests and the example-plugin test:
parameter counts by formula, the component split, scaling groups, labels, a tiny end-to-end run."""
from __future__ import annotations

import tomllib
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from speedq_core.adapter import COMPONENTS, IGNORE_INDEX, FamilyAdapter

REGISTRY = Path(__file__).resolve().parents[1] / "registry.toml"


def registry_models() -> dict:
    return tomllib.loads(REGISTRY.read_text())["models"]


def on_meta(adapter: FamilyAdapter, arch: dict) -> nn.Module:
    with torch.device("meta"):
        return adapter.build_model(adapter.config_from_dict(arch))


def parts(model: nn.Module, adapter: FamilyAdapter) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():  # tied weights counted once
        part = adapter.part_of(name.rsplit(".", 1)[0])
        counts[part] = counts.get(part, 0) + p.numel()
    return counts


def decoder_params(t: dict, qkv_bias: bool) -> dict[str, int]:
    """Llama/Qwen2 decoder from its config numbers: layers + final norm, embeddings, lm_head."""
    h, i, v = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    kv = t["num_key_value_heads"] * (h // t["num_attention_heads"])
    attn = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if qkv_bias else 0)
    layer = attn + 3 * h * i + 2 * h
    tied = t.get("tie_word_embeddings", False)
    return {"language": t["num_hidden_layers"] * layer + h, "embeddings": v * h, "lm_head": 0 if tied else v * h}


def projector_params(vision_width: int, text_width: int) -> int:
    return vision_width * text_width + text_width + text_width * text_width + text_width


def check_component_split(model: nn.Module, adapter: FamilyAdapter) -> None:
    """Every nn.Linear is in exactly one of vision/projector/language/lm_head, and blocks lie inside
    their component."""
    every = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    seen: dict[str, str] = {}
    for part in (*COMPONENTS, "lm_head"):
        for name in adapter.linears(model, part):
            assert name not in seen, f"{name} in both {seen[name]} and {part}"
            seen[name] = part
    assert set(seen) == every, f"linears outside any part: {sorted(every - set(seen))}"
    assert seen[adapter.lm_head_path] == "lm_head"
    assert all(adapter.linears(model, c) for c in COMPONENTS)
    for component in COMPONENTS:
        for path, _ in adapter.blocks(model, component):
            assert adapter.part_of(path) == component


def width_out(module: nn.Module) -> int:
    """Channels a norm or linear produces (what AWQ divides by s)."""
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[0]


def check_scaling_groups(model: nn.Module, adapter: FamilyAdapter, component: str) -> int:
    """In every block that holds a linear, each group's paths resolve, ``prev`` is as wide as every
    linear's input, and no linear is in two groups. Returns the number of groups checked."""
    checked = 0
    blocks = adapter.blocks(model, component)
    assert blocks, f"{component} has no blocks"
    for path, block in blocks:
        if not any(isinstance(m, nn.Linear) for m in block.modules()):
            continue
        used: set[str] = set()
        for group in adapter.scaling_groups(component):
            prev = block.get_submodule(group.prev)
            block.get_submodule(group.inspect)
            for name in group.linears:
                linear = block.get_submodule(name)
                assert isinstance(linear, nn.Linear), f"{path}.{name} is {type(linear).__name__}"
                assert width_out(prev) == linear.in_features, f"{path}: {group.prev} -> {name} widths differ"
                assert name not in used, f"{path}.{name} in two groups"
                used.add(name)
            checked += 1
    return checked


def image(color=(200, 30, 30), size=(48, 40)) -> Image.Image:
    return Image.new("RGB", size, color)


def check_labels(adapter: FamilyAdapter, processor, answer_tail: list[str]) -> None:
    """Labels are the answer's tokens + end-of-turn, left-padded rows are -100 and unattended."""
    tok = processor.tokenizer
    inputs = adapter.build_inputs(
        processor, [image(), image((0, 0, 255))], ["what color is the image", "what shape"], ["red", "blue circle"]
    )
    ids, mask, labels = inputs.tensors["input_ids"], inputs.tensors["attention_mask"], inputs.labels
    assert labels.shape == ids.shape == mask.shape
    for row, answer in enumerate(["red", "blue circle"]):
        kept = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert kept == tok.convert_tokens_to_ids(answer.split() + answer_tail)
        n = len(kept)
        assert torch.equal(labels[row, -n:], ids[row, -n:])  # the answer ends the row
        assert (labels[row, :-n] == IGNORE_INDEX).all()
    assert mask[0].all() != mask[1].all()  # different lengths: exactly one row is padded
    padded = 1 - int(mask[1].all())
    assert mask[padded, 0] == 0 and ids[padded, 0] == tok.pad_token_id  # left padding
    without = adapter.build_inputs(processor, [image()], ["what color is the image"])
    assert without.labels is None


def check_tiny_end_to_end(adapter: FamilyAdapter) -> None:
    """Build, one forward with answers (finite loss, backward reaches every component), generate."""
    torch.manual_seed(0)
    config = adapter.tiny_config()
    model = adapter.build_model(config)
    processor = adapter.tiny_processor(config)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    inputs = adapter.build_inputs(processor, [image(), image((0, 200, 0), (64, 64))],
                                  ["what color is the image", "what shape"], ["red", "green square"])
    image_id = config.image_token_id
    assert (inputs.tensors["input_ids"] == image_id).sum() > 0
    out = model(**inputs.model_kwargs(), labels=inputs.labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for component in COMPONENTS:
        grads = [m.weight.grad for m in adapter.linears(model, component).values()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient reaches {component}"
    answer = adapter.generate(model, processor, image(), "what color is the image", max_new_tokens=4)
    assert isinstance(answer, str)
