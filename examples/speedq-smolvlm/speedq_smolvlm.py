"""speedq plugin: the SmolVLM family (``SmolVLMForConditionalGeneration``, e.g. HuggingFaceTB/SmolVLM-256M-Instruct).

An example of a third-party family: one module, one entry point (``[project.entry-points.speedq]
smolvlm = "speedq_smolvlm"``). speedq finds it by that entry point and calls ``speedq_families()``.

Module tree (transformers 5)::

    model.vision_model         SigLIP-style encoder: encoder.layers.N
                               (layer_norm1 -> self_attn.{q,k,v,out}_proj; layer_norm2 -> mlp.fc1 -> fc2)
    model.connector            pixel shuffle (scale_factor^2 tokens merged) -> modality_projection.proj
    model.text_model           Llama (SmolLM2): embed_tokens, layers.N
    lm_head

Scaling groups: vision ``layer_norm1 -> q,k,v``, ``v_proj -> out_proj``, ``layer_norm2 -> fc1``;
language as any Llama decoder, without ``v_proj -> o_proj`` because SmolLM2-135M/360M use grouped-query
attention; connector none (its input is the pixel-shuffled ``post_layernorm`` output, outside any block).

Inputs: SmolVLM's chat format ``<|im_start|>User:<image>{prompt}<end_of_utterance>\\nAssistant:``, with
an answer `` {answer}<end_of_utterance>``; ``SmolVLMProcessor`` expands ``<image>`` (no image splitting in
the tiny model). Batches are left-padded by speedq's shared ``speedq_core.chat_inputs``.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from torch import nn

from speedq_core.adapter import FamilyAdapter, ScalingGroup, config_from_arch
from speedq_core.hookspecs import hookimpl
from speedq_plugins.families.decoder import decoder_scaling_groups

# SmolVLM's own special tokens, which speedq's shared tiny vocabulary lacks.
EXTRA_TOKENS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """speedq's tiny word-level tokenizer plus SmolVLM's image and end-of-turn tokens (a copy: the
    shared tokenizer stays untouched)."""
    from speedq_plugins.tiny_tokenizer import build_tiny_tokenizer

    tok = copy.deepcopy(build_tiny_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": EXTRA_TOKENS})
    return tok


class SmolVLMAdapter(FamilyAdapter):
    name = "smolvlm"
    description = "SmolVLM: SigLIP encoder + pixel-shuffle connector + SmolLM2 (example plugin)"
    model_types = ("smolvlm",)
    component_paths = {
        "vision": "model.vision_model",
        "projector": "model.connector",
        "language": "model.text_model",
    }
    block_paths = {"vision": "model.vision_model.encoder.layers", "language": "model.text_model.layers"}
    embeddings_path = "model.text_model.embed_tokens"
    lm_head_path = "lm_head"

    template = "<|im_start|>User:<image>{prompt}<end_of_utterance>\nAssistant:"
    answer_template = " {answer}<end_of_utterance>"

    def model_class(self) -> type[nn.Module]:
        from transformers import SmolVLMForConditionalGeneration

        return SmolVLMForConditionalGeneration

    def config_from_dict(self, arch: dict[str, Any]) -> Any:
        from transformers import SmolVLMConfig

        return config_from_arch(SmolVLMConfig, arch)

    def tiny_config(self) -> Any:
        """2-layer vision encoder at 32 px / patch 8, pixel shuffle 2 (4 image tokens), 2-layer
        SmolLM2-style Llama with grouped-query attention: ~0.16M parameters."""
        tok = tiny_tokenizer()
        return self.config_from_dict({
            "model_type": "smolvlm",
            "image_token_id": tok.convert_tokens_to_ids("<image>"),
            "scale_factor": 2,
            "tie_word_embeddings": False,
            "text_config": {
                "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": len(tok), "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
                "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
                "eos_token_id": tok.convert_tokens_to_ids("<end_of_utterance>"),
            },
            "vision_config": {
                "model_type": "smolvlm_vision", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
            },
        })

    def tiny_processor(self, config: Any) -> Any:
        """transformers' ``SmolVLMProcessor`` around the tiny tokenizer, one 32 px tile per image."""
        from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

        vision = config.vision_config
        size = {"longest_edge": vision.image_size}
        tokens_per_image = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
        return SmolVLMProcessor(
            image_processor=SmolVLMImageProcessor(do_image_splitting=False, size=size, max_image_size=size),
            tokenizer=tiny_tokenizer(),
            video_processor=SmolVLMVideoProcessor(),
            image_seq_len=tokens_per_image,
        )

    def scaling_groups(self, component: str) -> list[ScalingGroup]:
        if component == "vision":
            return [
                ScalingGroup("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
                ScalingGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
                ScalingGroup("layer_norm2", ("mlp.fc1",), "mlp"),
            ]
        if component == "language":
            return decoder_scaling_groups(v_to_o=False)
        return []


@hookimpl
def speedq_families():
    return [SmolVLMAdapter()]
