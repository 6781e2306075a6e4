"""AWQ scaling groups of a Llama/Qwen2-style decoder layer, shared by the families built on one."""
from __future__ import annotations

from speedq_core.adapter import ScalingGroup


def decoder_scaling_groups(v_to_o: bool) -> list[ScalingGroup]:
    """``input_layernorm -> q,k,v``; ``v_proj -> o_proj`` only when ``v_to_o`` (their shapes match,
    i.e. no grouped-query attention); ``post_attention_layernorm -> gate,up``; ``up_proj -> down_proj``
    (SwiGLU: ``down(act(gate) * up)`` is linear in ``up``'s output)."""
    groups = [
        ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ]
    if v_to_o:
        groups.append(ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    groups += [
        ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ]
    return groups
