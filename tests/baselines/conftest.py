"""Tiny text-only Llama models with realistic activations (low-rank, a few large channels) for the baselines."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from speedq_core.adapter import FamilyAdapter
from speedq_plugins.families.decoder import decoder_scaling_groups

HIDDEN, VOCAB, OUTLIERS = 64, 256, (3, 17, 40)


class TinyLlamaAdapter(FamilyAdapter):
    """A ``LlamaForCausalLM`` seen as a VLM with only a language component."""

    name = "tiny-llama"
    component_paths = {"language": "model"}
    block_paths = {"language": "model.layers"}
    embeddings_path = "model.embed_tokens"
    lm_head_path = "lm_head"

    def scaling_groups(self, component: str):
        return decoder_scaling_groups(v_to_o=True) if component == "language" else []


def correlated(n: int, dim: int, generator: torch.Generator, rank: int = 8) -> torch.Tensor:
    """``(n, dim)`` rows on a rank-``rank`` subspace plus 10% noise, with ``OUTLIERS`` channels x15."""
    x = torch.randn(n, rank, generator=generator) @ torch.randn(rank, dim, generator=generator)
    x = x / rank ** 0.5 + 0.1 * torch.randn(n, dim, generator=generator)
    x[:, [c for c in OUTLIERS if c < dim]] *= 15
    return x


def tiny_llama(seed: int = 0, layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                         max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(correlated(VOCAB, HIDDEN, generator))
    return model


def token_batches(n: int = 8, seq: int = 32, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (1, seq), generator=generator)} for _ in range(n)]


@pytest.fixture
def adapter() -> TinyLlamaAdapter:
    return TinyLlamaAdapter()
