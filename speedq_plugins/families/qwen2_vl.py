"""Qwen2-VL (transformers' native ``Qwen2VLForConditionalGeneration``).

Module tree (paths from the top-level model)::

    model.visual                      vision tower (Qwen2-VL ViT, 2D RoPE, native resolution)
      .patch_embed.proj               Conv3d (temporal x spatial patches), not an nn.Linear
      .blocks.N                       norm1 -> attn.qkv (fused) -> attn.proj; norm2 -> mlp.fc1 -> mlp.fc2
      .merger                         projector: ln_q -> mlp.0 -> GELU -> mlp.2 (2x2 patch merge)
    model.language_model              Qwen2 decoder (M-RoPE)
      .embed_tokens                   token embedding
      .layers.N                       input_layernorm -> self_attn.{q,k,v,o}_proj;
                                      post_attention_layernorm -> mlp.{gate,up,down}_proj
    lm_head                           tied to embed_tokens in the 2B model

The projector lives inside the vision tower; ``part_of`` picks the longest matching prefix, so
``model.visual.merger`` counts as ``projector`` and the rest of ``model.visual`` as ``vision``.

This module also holds the two pieces InternVL 2.5/3 share with Qwen2-VL, because both put a Qwen2
language model behind the vision tower: the ChatML prompt format (:func:`chatml_inputs`) and the
scaling groups of a Qwen2 decoder layer (:data:`QWEN2_DECODER_GROUPS`).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from speedq_core.adapter import FamilyAdapter, ModelInputs, ScalingGroup
from speedq_core.hookspecs import hookimpl

# Scaling groups of one Qwen2 decoder layer, in the AWQ convention (llm-awq ``auto_scale.py``):
#   input_layernorm -> q, k, v              (measured at the attention output)
#   post_attention_layernorm -> gate, up    (measured at the MLP output)
#   up_proj -> down_proj                    (down_proj reads SiLU(gate) * up, linear in up's output)
# AWQ adds v_proj -> o_proj only when ``v_proj.weight.shape == o_proj.weight.shape``, i.e. without
# grouped-query attention. Every Qwen2 / Qwen2.5 LLM (0.5B to 72B, and the LLMs of Qwen2-VL and
# InternVL 2.5/3) uses GQA, where v_proj has num_kv_heads * head_dim outputs and o_proj reads
# num_heads * head_dim inputs, so that group never applies and is not declared; the tiny configs
# use GQA too, so tests exercise the same groups as the real models.
QWEN2_DECODER_GROUPS = [
    ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
]

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"


def chatml_inputs(
    processor: Any,
    images: list[Any],
    prompts: list[str],
    answers: list[str] | None,
    image_placeholder: str,
) -> ModelInputs:
    """One image + one user turn per sample in ChatML, the format of Qwen2 chat models::

        <|im_start|>user\\n{image_placeholder}{prompt}<|im_end|>\\n<|im_start|>assistant\\n[{answer}<|im_end|>]

    The family's processor expands ``image_placeholder``'s image token into the image's feature
    tokens. Batches are **left-padded** (pad tokens first, ``attention_mask`` 0 there), the padding
    generation needs, used for training too so one batch layout serves both; under RoPE the shift of
    absolute positions this causes leaves attention scores unchanged. With ``answers`` the answer and
    its closing ``<|im_end|>`` end each row and are the only tokens whose ``labels`` are not -100.
    """
    if len(images) != len(prompts) or (answers is not None and len(answers) != len(prompts)):
        raise ValueError(
            f"build_inputs needs one image and one prompt (and one answer, if any) per sample; got "
            f"{len(images)} images, {len(prompts)} prompts, {'no' if answers is None else len(answers)} answers"
        )
    texts = [f"<|im_start|>user\n{image_placeholder}{p}{END_OF_TURN}\n<|im_start|>assistant\n" for p in prompts]
    targets = None if answers is None else [f"{a}{END_OF_TURN}" for a in answers]
    if targets is not None:
        texts = [text + target for text, target in zip(texts, targets)]
    batch = processor(images=list(images), text=texts, return_tensors="pt", padding=True, padding_side="left")
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if targets is None:
        return ModelInputs(tensors)

    input_ids = tensors["input_ids"]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, target in enumerate(targets):
        ids = processor.tokenizer(target, add_special_tokens=False)["input_ids"]
        if input_ids[i, -len(ids):].tolist() != ids:
            raise ValueError(
                f"answer {answers[i]!r} tokenizes differently inside the prompt than alone, so its labels "
                "cannot be located; strip leading whitespace from the answer"
            )
        labels[i, -len(ids):] = input_ids[i, -len(ids):]
    return ModelInputs(tensors, labels)


def tiny_tokenizer_copy(**extra_special_tokens: str) -> Any:
    """A private copy of the shared tiny tokenizer (processors may modify theirs), with named special
    tokens (``extra_special_tokens``) as the real checkpoints' tokenizers declare them."""
    from transformers import PreTrainedTokenizerFast

    from speedq_plugins.tiny_tokenizer import build_tiny_tokenizer

    shared = build_tiny_tokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(shared.backend_tokenizer),
        bos_token=shared.bos_token, eos_token=shared.eos_token,
        unk_token=shared.unk_token, pad_token=shared.pad_token,
        extra_special_tokens=extra_special_tokens or None,
    )


def config_with_subconfigs(config_class: type, arch: dict[str, Any]) -> Any:
    """``config_class(**arch)``: nested ``text_config``/``vision_config`` dicts become sub-configs.
    ``model_type`` (a registry/config.json field) is checked, not passed."""
    arch = copy.deepcopy(dict(arch))
    model_type = arch.pop("model_type", config_class.model_type)
    if model_type != config_class.model_type:
        raise ValueError(
            f"architecture has model_type {model_type!r} but {config_class.__name__} builds "
            f"{config_class.model_type!r}: use the family whose adapter handles {model_type!r}"
        )
    return config_class(**arch)


def tiny_text_config(tokenizer: Any, **overrides: Any) -> dict[str, Any]:
    """The Qwen2 LLM of the tiny models: 4 layers x 128, GQA (4 heads, 2 KV heads) like the real ones."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids(END_OF_TURN),
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }


TINY_IMAGE_SIZE = 64  # pixels per side of the tiny models' input images


class Qwen2VLAdapter(FamilyAdapter):
    name = "qwen2_vl"
    description = "Qwen2-VL (ViT with 2D RoPE + patch-merger MLP + Qwen2 LLM), transformers Qwen2VLForConditionalGeneration"
    model_types = ("qwen2_vl",)
    component_paths = {
        "vision": "model.visual",
        "projector": "model.visual.merger",
        "language": "model.language_model",
    }
    block_paths = {"vision": "model.visual.blocks", "language": "model.language_model.layers"}
    embeddings_path = "model.language_model.embed_tokens"
    lm_head_path = "lm_head"

    def model_class(self) -> type[nn.Module]:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def config_from_dict(self, arch: dict[str, Any]) -> Any:
        """Accepts the nested layout (``text_config``/``vision_config``) and the flat one of the
        original Qwen2-VL config.json files (text fields at top level)."""
        from transformers import Qwen2VLConfig

        return config_with_subconfigs(Qwen2VLConfig, arch)

    def tiny_config(self) -> Any:
        """~1.3M parameters: ViT 4 x 64 on 8-px patches (a 64-px image gives 8 x 8 patches, merged
        2 x 2 into 16 image tokens), Qwen2 LLM 4 x 128, tied embeddings as in Qwen2-VL-2B."""
        tokenizer = tiny_tokenizer_copy()
        ids = tokenizer.convert_tokens_to_ids
        return self.config_from_dict({
            "model_type": "qwen2_vl",
            "text_config": tiny_text_config(
                tokenizer, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, tie_word_embeddings=True
            ),
            "vision_config": {
                "depth": 4, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 4, "hidden_size": 128,
                "hidden_act": "quick_gelu", "in_channels": 3, "patch_size": 8, "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            "image_token_id": ids("<|image_pad|>"),
            "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"),
            "vision_end_token_id": ids("<|vision_end|>"),
            "tie_word_embeddings": True,
        })

    def scaling_groups(self, component: str) -> list[ScalingGroup]:
        """Vision block: norm1 -> attn.qkv and norm2 -> mlp.fc1. Not declared:
        qkv -> proj (the fused qkv has 3x proj's input width, and a group's ``prev`` must match its
        linears' input width exactly) and fc1 -> fc2 (QuickGELU between them does not commute with a
        per-channel scale; AutoAWQ would need an inserted scaled-activation module). fc2 and proj are
        still quantized, just not scaled. Language block: :data:`QWEN2_DECODER_GROUPS`."""
        if component == "vision":
            return [
                ScalingGroup("norm1", ("attn.qkv",), "attn"),
                ScalingGroup("norm2", ("mlp.fc1",), "mlp"),
            ]
        if component == "language":
            return list(QWEN2_DECODER_GROUPS)
        return []

    def tiny_processor(self, config: Any) -> Any:
        """transformers' own ``Qwen2VLProcessor`` around the tiny tokenizer, so tiny and real models
        share one input path. Every image is resized to about ``TINY_IMAGE_SIZE``^2 pixels (aspect
        ratio kept, sides multiples of patch x merge)."""
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        vision = config.vision_config
        pixels = TINY_IMAGE_SIZE * TINY_IMAGE_SIZE
        geometry = {
            "patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size,
            "merge_size": vision.spatial_merge_size,
            "min_pixels": pixels,
            "max_pixels": pixels,
        }
        return Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(**geometry),
            tokenizer=tiny_tokenizer_copy(),
            video_processor=Qwen2VLVideoProcessor(**geometry),
        )

    def build_inputs(
        self, processor: Any, images: list[Any], prompts: list[str], answers: list[str] | None = None
    ) -> ModelInputs:
        """ChatML (:func:`chatml_inputs`); the image is ``<|vision_start|><|image_pad|><|vision_end|>``
        directly followed by the prompt, as Qwen2-VL's chat template writes it."""
        placeholder = f"<|vision_start|>{processor.image_token}<|vision_end|>"
        return chatml_inputs(processor, images, prompts, answers, placeholder)


@hookimpl
def speedq_families():
    return [Qwen2VLAdapter()]
