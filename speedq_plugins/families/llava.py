"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT-L/14-336 + 2-layer MLP projector + Vicuna.

Module tree (transformers 5, checked on a tiny model)::

    model.vision_tower                    CLIPVisionModel
        .embeddings                       patch Conv2d(3, 1024, 14, 14) + position embedding
        .pre_layrnorm
        .encoder.layers.N                 layer_norm1 -> self_attn.{q,k,v,out}_proj
                                          layer_norm2 -> mlp.fc1 -> quick_gelu -> mlp.fc2
        .post_layernorm                   unused by LLaVA
    model.multi_modal_projector           linear_1 -> gelu -> linear_2
    model.language_model                  LlamaModel
        .embed_tokens                     the "embeddings" part
        .layers.N                         input_layernorm -> self_attn.{q,k,v,o}_proj
                                          post_attention_layernorm -> mlp.{gate,up}_proj -> down_proj
    lm_head                               untied

LLaVA reads the image features of the *second-to-last* CLIP layer (``vision_feature_layer = -2``) and
drops the CLS token (``vision_feature_select_strategy = "default"``): 576 image tokens at 336 px. The
last CLIP layer and ``post_layernorm`` still exist and are quantized like the rest, but their output
never reaches the LLM, so block-wise losses on that last layer measure nothing useful.

Scaling groups (AWQ convention; ``prev`` output width equals every linear's ``in_features``):

- CLIP block: ``layer_norm1 -> q,k,v``; ``v_proj -> out_proj`` (multi-head attention: the attention
  output is linear in V, per head, so scaling V's output channels and ``out_proj``'s input channels is
  exact); ``layer_norm2 -> fc1``. ``fc1 -> fc2`` is not a group: quick_gelu sits between them.
- Llama block: ``input_layernorm -> q,k,v``; ``v_proj -> o_proj`` only when their shapes match, i.e.
  without grouped-query attention (Vicuna is MHA, so LLaVA-1.5 has it); ``post_attention_layernorm ->
  gate,up``; ``up_proj -> down_proj`` (SwiGLU: ``down(act(gate) * up)`` is linear in ``up``'s output).
- Projector: none (a GELU separates its two linears and no norm precedes ``linear_1``).

Inputs: the LLaVA-1.5 conversation format ``USER: <image>\\n{prompt} ASSISTANT:``; with an answer,
`` {answer}</s>`` is appended and only the answer tokens and ``</s>`` are labelled. Batches are
**left-padded** (one layout for calibration, training and batched generation); ``attention_mask`` is 0
on the padding and ``labels`` are -100 there.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from speedq_core.adapter import FamilyAdapter, ScalingGroup, config_from_arch
from speedq_core.hookspecs import hookimpl
from speedq_plugins.families.decoder import decoder_scaling_groups

# The tiny preset's CLIP input: the synthetic benchmark's native image size, cut into 8 x 8 patches
# (the patch grid of the tiny InternViT; LLaVA has no token merger, so the LLM gets all 64).
TINY_CLIP_IMAGE = 48
TINY_CLIP_PATCH = 6

# ---- the adapter --------------------------------------------------------------------------------
_CLIP_GROUPS = [
    ScalingGroup("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScalingGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
    ScalingGroup("layer_norm2", ("mlp.fc1",), "mlp"),
]


class LlavaAdapter(FamilyAdapter):
    name = "llava"
    description = "LLaVA-1.5: CLIP ViT-L/14-336 + MLP projector + Vicuna (LlavaForConditionalGeneration)"
    model_types = ("llava",)
    component_paths = {
        "vision": "model.vision_tower",
        "projector": "model.multi_modal_projector",
        "language": "model.language_model",
    }
    block_paths = {
        "vision": "model.vision_tower.encoder.layers",
        "language": "model.language_model.layers",
    }
    embeddings_path = "model.language_model.embed_tokens"
    lm_head_path = "lm_head"

    template = "USER: <image>\n{prompt} ASSISTANT:"
    answer_template = " {answer}</s>"

    def model_class(self) -> type[nn.Module]:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def config_from_dict(self, arch: dict[str, Any]) -> Any:
        from transformers import LlavaConfig

        return config_from_arch(LlavaConfig, arch)

    def tiny_config(self) -> Any:
        """~1.2M parameters, the size of the other trained tiny presets: CLIP 4 x 64 (learnt absolute
        position embedding) on 6-px patches of the synthetic benchmark's native 48-px image (LLaVA
        keeps every patch: 64 image tokens, read from the second-to-last layer as LLaVA-1.5 does) +
        Llama 4 x 128 (MHA, like Vicuna), untied lm_head."""
        from speedq_plugins.tiny_tokenizer import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        return self.config_from_dict({
            "model_type": "llava",
            "image_token_id": tok.convert_tokens_to_ids("<image>"),
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "projector_hidden_act": "gelu",
            "tie_word_embeddings": False,
            "text_config": {
                "model_type": "llama", "hidden_size": 128, "intermediate_size": 384,
                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                "vocab_size": len(tok), "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
                "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id, "tie_word_embeddings": False,
            },
            "vision_config": {
                "model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 256,
                "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": TINY_CLIP_IMAGE,
                "patch_size": TINY_CLIP_PATCH, "projection_dim": 64, "hidden_act": "quick_gelu",
            },
        })

    def tiny_processor(self, config: Any) -> Any:
        """``LlavaProcessor`` + ``CLIPImageProcessor`` (CLIP mean/std, resize + centre crop) around the
        tiny tokenizer: the same classes, with the same arguments, as llava-hf's processors."""
        from transformers import CLIPImageProcessor, LlavaProcessor

        from speedq_plugins.tiny_tokenizer import build_tiny_tokenizer

        size = config.vision_config.image_size
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=build_tiny_tokenizer(),
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by "default"
        )

    def scaling_groups(self, component: str) -> list[ScalingGroup]:
        if component == "vision":
            return list(_CLIP_GROUPS)
        if component == "language":
            return decoder_scaling_groups(v_to_o=True)  # Vicuna: MHA
        return []



@hookimpl
def speedq_families():
    return [LlavaAdapter()]
