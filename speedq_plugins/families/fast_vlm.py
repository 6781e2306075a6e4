"""FastVLM (``FastVlmForConditionalGeneration``): FastViTHD (timm ``fastvit_mci3``) + MLP projector + Qwen2.

Module tree (transformers 5, checked on the tiny model and on FastVLM-0.5B built on ``meta``)::

    model.vision_tower                         TimmWrapperModel
        .timm_model.stem                       MobileOne convs (stride 4)
        .timm_model.stages.S                   S = 0..4, each: downsample (PatchEmbed convs, S > 0),
            .downsample / .pos_emb             pos_emb (RepConditionalPosEnc, a depthwise conv, S >= 3)
            .blocks.J                          S <= 2: RepMixerBlock (convs only)
                                               S >= 3: AttentionBlock: norm (LayerNorm2d) ->
                                                       token_mixer.qkv (fused) -> token_mixer.proj,
                                                       then a ConvMlp (1x1 convs fc1/fc2)
        .timm_model.final_conv                 MobileOne block + SE (convs) -> 3072 channels
    model.multi_modal_projector                linear_1 (3072 -> d) -> gelu -> linear_2
    model.language_model                       Qwen2Model (embed_tokens, layers.N, norm)
    lm_head                                    tied to embed_tokens in FastVLM-0.5B (Qwen2-0.5B ties)

The image (1024 px in FastVLM-0.5B) leaves the tower at stride 64 as a 16x16x3072 map: 256 image
tokens, each one ``<image>`` placeholder in the prompt (``LlavaProcessor`` with ``patch_size = 64``).

**Convolutions.** speedq's quantizers handle ``nn.Linear``. FastViTHD is mostly convolutional: of its
122.7M parameters (``fastvit_mci3``, no classifier head) only 28.3M (23.1%) sit in ``nn.Linear`` -- the
``token_mixer.qkv`` and ``token_mixer.proj`` of the 6 attention blocks of stages 3-4; 93.0M (75.8%) are
1x1 ``Conv2d`` (the ConvMlp ``fc1``/``fc2`` of every block, the SE and final convs), 1.3M (1.1%)
depthwise convs, the rest norms and layer scales. Vision quantization therefore covers those attention
linears only; every convolution stays in the checkpoint dtype and is counted as such in size reports.
(A 1x1 conv is a linear map over channels, so its weight viewed as ``(out, in)`` could be quantized by
the same group-wise math; that would be a change to the generic quantizers, not to this adapter.)

**Vision blocks** for block-wise calibration are all FastViT blocks in forward order, flattened over
the stages: ``...timm_model.stages.S.blocks.J`` (44 in ``fastvit_mci3``: 2 + 12 + 24 + 4 + 2). The list is
not a chain: each stage's ``downsample`` and ``pos_emb`` run between the last block of one stage and the
first of the next, so a block's input must be captured with a forward hook during a full forward,
not computed as the previous block's output. RepMixer blocks hold no linear; only attention blocks have
the vision scaling group ``norm -> token_mixer.qkv``. There is no ``v -> proj`` group (qkv is fused, its
output is 3x proj's input) and no group into the ConvMlp (convs).

Language (Qwen2) groups: ``input_layernorm -> q,k,v``; ``post_attention_layernorm -> gate,up``;
``up_proj -> down_proj``. ``v_proj -> o_proj`` is not a group: Qwen2-0.5B uses grouped-query attention
(14 query, 2 key/value heads), so v_proj's output (256) is narrower than o_proj's input (896).
Projector: none (GELU between its linears, no norm before ``linear_1``).

Inputs: Qwen2 chat format as FastVLM's chat template renders it (with its default system turn)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<image>\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n

With an answer, ``{answer}<|im_end|>`` follows and only those tokens are labelled. Batches are
left-padded (see ``speedq_core.chat_inputs``).
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from speedq_core.adapter import FamilyAdapter, ScalingGroup, config_from_arch
from speedq_core.hookspecs import hookimpl
from speedq_plugins.families.decoder import decoder_scaling_groups

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
STAGES_PATH = "model.vision_tower.timm_model.stages"
STRIDE = 64  # FastViT: stem /4, four downsampling stages /2 each
_VISION_GROUPS = [ScalingGroup("norm", ("token_mixer.qkv",), "token_mixer")]


class FastVLMAdapter(FamilyAdapter):
    name = "fast_vlm"
    description = "FastVLM: FastViTHD (timm, conv-heavy) + MLP projector + Qwen2 (FastVlmForConditionalGeneration)"
    model_types = ("fast_vlm",)
    component_paths = {
        "vision": "model.vision_tower",
        "projector": "model.multi_modal_projector",
        "language": "model.language_model",
    }
    # vision blocks are nested per stage: ``blocks`` below flattens ``stages.S.blocks.J``
    block_paths = {"vision": STAGES_PATH, "language": "model.language_model.layers"}
    embeddings_path = "model.language_model.embed_tokens"
    lm_head_path = "lm_head"

    template = SYSTEM + "<|im_start|>user\n<image>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    answer_template = "{answer}<|im_end|>"

    def model_class(self) -> type[nn.Module]:
        from transformers import FastVlmForConditionalGeneration

        return FastVlmForConditionalGeneration

    def config_from_dict(self, arch: dict[str, Any]) -> Any:
        from transformers import FastVlmConfig

        return config_from_arch(FastVlmConfig, arch)

    def tiny_config(self) -> Any:
        """A 5-stage ``fastvit_mci3`` shrunk through timm kwargs (1-1-1-2-1 blocks, 8..128 channels,
        the same RepMixer/attention layout) at 128 px -> 2x2 = 4 image tokens, + Qwen2 2x64 with
        grouped-query attention and tied lm_head like FastVLM-0.5B: ~0.45M parameters."""
        from speedq_plugins.tiny_tokenizer import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        dims = [8, 16, 32, 64, 128]
        return self.config_from_dict({
            "model_type": "fast_vlm",
            "image_token_id": tok.convert_tokens_to_ids("<image>"),
            "image_seq_length": 4,
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True,
            "text_config": {
                "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": len(tok), "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
                "tie_word_embeddings": True, "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"), "pad_token_id": tok.pad_token_id,
            },
            "vision_config": {
                "model_type": "timm_wrapper", "architecture": "fastvit_mci3",
                "hidden_size": 2 * dims[-1],  # final_conv widens by cls_ratio = 2
                "do_pooling": False, "global_pool": "avg", "initializer_range": 0.02,
                "model_args": {
                    "inference_mode": True, "layers": [1, 1, 1, 2, 1], "embed_dims": dims,
                    "mlp_ratios": [3, 3, 3, 3, 3],
                },
            },
        })

    def tiny_processor(self, config: Any) -> Any:
        """``LlavaProcessor`` + ``CLIPImageProcessor`` as transformers' FastVLM conversion builds them
        (mean 0, std 1, resize + centre crop, ``patch_size`` = the tower's stride 64); the image side
        follows from ``image_seq_length`` (4 tokens: 128 px; FastVLM-0.5B's 256: 1024 px)."""
        from transformers import CLIPImageProcessor, LlavaProcessor

        from speedq_plugins.tiny_tokenizer import build_tiny_tokenizer

        size = math.isqrt(config.image_seq_length) * STRIDE
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
        )
        return LlavaProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer(), patch_size=STRIDE)

    def blocks(self, model: nn.Module, component: str) -> list[tuple[str, nn.Module]]:
        if component != "vision":
            return super().blocks(model, component)
        stages = model.get_submodule(STAGES_PATH)
        return [
            (f"{STAGES_PATH}.{s}.blocks.{j}", block)
            for s, stage in enumerate(stages)
            for j, block in enumerate(stage.blocks)
        ]

    def scaling_groups(self, component: str) -> list[ScalingGroup]:
        """Vision: the group of FastViT attention blocks (RepMixer blocks have no linear, hence no
        group). Language: Qwen2 with GQA, so no v_proj -> o_proj."""
        if component == "vision":
            return list(_VISION_GROUPS)
        if component == "language":
            return decoder_scaling_groups(v_to_o=False)
        return []


@hookimpl
def speedq_families():
    return [FastVLMAdapter()]
