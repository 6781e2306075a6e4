"""InternVL 2.5 and 3 (transformers' native ``InternVLForConditionalGeneration``, the ``-hf`` checkpoints).

Module tree (paths from the top-level model)::

    model.vision_tower                InternViT (absolute position embeddings, layer scale)
      .embeddings.patch_embeddings.projection   Conv2d, not an nn.Linear
      .encoder.layer.N                layernorm_before -> attention.{q,k,v}_proj -> attention.projection_layer;
                                      layernorm_after -> mlp.fc1 -> GELU -> mlp.fc2
    model.multi_modal_projector       pixel-shuffle (2x2 -> channels) then layer_norm -> linear_1 -> GELU -> linear_2
    model.language_model              Qwen2 / Qwen2.5 decoder
      .embed_tokens, .layers.N        as in Qwen2-VL's language model
    lm_head                           untied in InternVL3-1B/2B and InternVL2.5-1B

The chat format and the language model's scaling groups are Qwen2's, shared with
:mod:`speedq_plugins.families.qwen2_vl`.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from speedq_core.adapter import FamilyAdapter, ScalingGroup, config_from_arch
from speedq_core.hookspecs import hookimpl
from speedq_plugins.families.decoder import decoder_scaling_groups
from speedq_plugins.families.qwen2_vl import CHATML, END_OF_TURN, TINY_IMAGE_SIZE, tiny_text_config
from speedq_plugins.tiny_tokenizer import tiny_tokenizer_copy

# InternVL preprocesses with the ImageNet statistics (the -hf checkpoints' preprocessor_config.json).
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Named special tokens InternVLProcessor reads from its tokenizer (``tokenizer.context_image_token``
# and so on), as the -hf tokenizers declare them. The tiny vocabulary has no ``<video>``; videos are
# not used, and ``<|video_pad|>`` stands in.
TINY_IMAGE_TOKENS = {
    "context_image_token": "<IMG_CONTEXT>",
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "video_token": "<|video_pad|>",
}


def image_seq_length(config: Any) -> int:
    """Image tokens per 448-px tile (or per image, without tiling): ``(image_size / patch_size)^2``
    ViT patches, reduced by the pixel shuffle to ``downsample_ratio^2`` of that (256 for InternVL3)."""
    vision = config.vision_config
    patches = (vision.image_size[0] // vision.patch_size[0]) * (vision.image_size[1] // vision.patch_size[1])
    return int(patches * config.downsample_ratio**2)


class InternVLAdapter(FamilyAdapter):
    name = "internvl"
    description = "InternVL 2.5 / 3 (InternViT + pixel-shuffle MLP projector + Qwen2.5 LLM), transformers InternVLForConditionalGeneration"
    model_types = ("internvl",)
    component_paths = {
        "vision": "model.vision_tower",
        "projector": "model.multi_modal_projector",
        "language": "model.language_model",
    }
    block_paths = {"vision": "model.vision_tower.encoder.layer", "language": "model.language_model.layers"}
    embeddings_path = "model.language_model.embed_tokens"
    lm_head_path = "lm_head"
    # ChatML with ``<IMG_CONTEXT>\n`` before the prompt, as InternVL's chat template writes an image;
    # the processor expands it to ``<img>`` + image_seq_length x tiles ``<IMG_CONTEXT>`` + ``</img>``.
    template = CHATML.format(user="<IMG_CONTEXT>\n{prompt}")
    answer_template = "{answer}" + END_OF_TURN

    def model_class(self) -> type[nn.Module]:
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    def config_from_dict(self, arch: dict[str, Any]) -> Any:
        """Note: in transformers 5 the top-level ``tie_word_embeddings`` (default True) decides whether
        lm_head is tied, whatever ``text_config`` says; presets with an untied head must set it."""
        from transformers import InternVLConfig

        return config_from_arch(InternVLConfig, arch)

    def tiny_config(self) -> Any:
        """~1.2M parameters: InternViT 4 x 64 on 8-px patches of a 64-px image (64 patches, 16 image
        tokens after the pixel shuffle), Qwen2 LLM 4 x 128, untied lm_head as in InternVL3-1B."""
        tokenizer = tiny_tokenizer_copy()
        return self.config_from_dict({
            "model_type": "internvl",
            "text_config": {"model_type": "qwen2", **tiny_text_config(tokenizer, tie_word_embeddings=False)},
            "vision_config": {
                "model_type": "internvl_vision",
                "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256,
                "attention_bias": True, "hidden_act": "gelu", "norm_type": "layer_norm", "layer_norm_eps": 1e-6,
                "image_size": [TINY_IMAGE_SIZE, TINY_IMAGE_SIZE], "patch_size": [8, 8],
                "use_mean_pooling": True, "use_qk_norm": False, "layer_scale_init_value": 0.1,
            },
            "downsample_ratio": 0.5,
            "image_seq_length": 16,
            "image_token_id": tokenizer.convert_tokens_to_ids(TINY_IMAGE_TOKENS["context_image_token"]),
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": False,
        })

    def scaling_groups(self, component: str) -> list[ScalingGroup]:
        """InternViT block:
        layernorm_before -> q, k, v (measured at the attention output);
        v_proj -> projection_layer (ViT attention has as many value heads as query heads, so
        v_proj's output width equals projection_layer's input width: AWQ's v -> o rule applies);
        layernorm_after -> fc1.
        fc1 -> fc2 is not declared: GELU(x / s) * s != GELU(x), so a scale cannot pass through the
        activation (AutoAWQ handles GELU MLPs by inserting a scaled-activation module, which a
        ``ScalingGroup`` whose ``prev`` is a norm or linear cannot express). fc2 is quantized
        unscaled. The projector has no repeated blocks. Language block: ``decoder_scaling_groups(v_to_o=False)``."""
        if component == "vision":
            return [
                ScalingGroup(
                    "layernorm_before", ("attention.q_proj", "attention.k_proj", "attention.v_proj"), "attention"
                ),
                ScalingGroup("attention.v_proj", ("attention.projection_layer",), "attention.projection_layer"),
                ScalingGroup("layernorm_after", ("mlp.fc1",), "mlp"),
            ]
        if component == "language":
            return decoder_scaling_groups(v_to_o=False)
        return []

    def tiny_processor(self, config: Any) -> Any:
        """transformers' own ``InternVLProcessor`` + ``GotOcr2ImageProcessor`` around the tiny
        tokenizer, so tiny and real models share one input path. Tiny images are not tiled: each is
        resized to the ViT's ``image_size`` and becomes ``image_seq_length`` tokens."""
        from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

        height, width = config.vision_config.image_size
        geometry = {"size": {"height": height, "width": width}, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
        return InternVLProcessor(
            image_processor=GotOcr2ImageProcessor(crop_to_patches=False, min_patches=1, max_patches=1, **geometry),
            tokenizer=tiny_tokenizer_copy(**TINY_IMAGE_TOKENS),
            video_processor=InternVLVideoProcessor(**geometry),
            image_seq_length=image_seq_length(config),
        )


@hookimpl
def speedq_families():
    return [InternVLAdapter()]
