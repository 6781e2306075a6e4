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
scaling groups of a Qwen2 decoder layer (:func:`~speedq_plugins.families.decoder.decoder_scaling_groups`).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from speedq_core.adapter import FamilyAdapter, ScalingGroup, config_from_arch
from speedq_core.hookspecs import hookimpl
from speedq_plugins.families.decoder import decoder_scaling_groups
from speedq_plugins.tiny_tokenizer import tiny_tokenizer_copy

# Qwen2 / Qwen2.5 LLMs (those of Qwen2-VL and InternVL 2.5/3 too) all use grouped-query attention,
# so AWQ's v_proj -> o_proj group never applies: decoder_scaling_groups(v_to_o=False).
END_OF_TURN = "<|im_end|>"
CHATML = "<|im_start|>user\n{user}" + END_OF_TURN + "\n<|im_start|>assistant\n"  # one user turn


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
    # ChatML; the image directly followed by the prompt, as Qwen2-VL's chat template writes it
    template = CHATML.format(user="<|vision_start|><|image_pad|><|vision_end|>{prompt}")
    answer_template = "{answer}" + END_OF_TURN

    def model_class(self) -> type[nn.Module]:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def config_from_dict(self, arch: dict[str, Any]) -> Any:
        """Accepts the nested layout (``text_config``/``vision_config``) and the flat one of the
        original Qwen2-VL config.json files (text fields at top level)."""
        from transformers import Qwen2VLConfig

        return config_from_arch(Qwen2VLConfig, arch)

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
        still quantized, just not scaled. Language block: :func:`~speedq_plugins.families.decoder.decoder_scaling_groups`."""
        if component == "vision":
            return [
                ScalingGroup("norm1", ("attn.qkv",), "attn"),
                ScalingGroup("norm2", ("mlp.fc1",), "mlp"),
            ]
        if component == "language":
            return decoder_scaling_groups(v_to_o=False)
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


@hookimpl
def speedq_families():
    return [Qwen2VLAdapter()]
