"""RTN: round-to-nearest group-wise quantization, no calibration data.

Each selected ``nn.Linear`` weight W (out, in) becomes q = clamp(round(W/s) + z, 0, 2^b - 1) with
per-group min-max scale and zero (``speedq_core.quant.groupwise``; bilevel scales when the scheme
has a second level), stored as a ``QuantLinear``. The token embedding table (V, h), when the part
``embeddings`` is asked, is quantized the same way along h and stored as a ``QuantEmbedding``.

A tied lm_head is the embedding table itself: quantizing either part quantizes that one tensor once,
with the scheme given (the two must agree when both are given), and the head becomes a QuantLinear
over the embedding's buffers (see ``speedq_core.quant.qembedding``).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from speedq_core.adapter import FamilyAdapter
from speedq_core.errors import SchemeError
from speedq_core.hookspecs import hookimpl
from speedq_core.method import Method, QuantContext
from speedq_core.quant import (
    QuantEmbedding,
    QuantLinear,
    QuantScheme,
    quantize_weight,
    swap_embeddings,
    swap_linears,
    tied_linears,
)


def merge_tied_head(model: nn.Module, adapter: FamilyAdapter,
                    schemes: dict[str, QuantScheme]) -> dict[str, QuantScheme]:
    """``schemes`` with a tied ``lm_head`` folded into ``embeddings`` (one tensor, quantized once)."""
    if adapter.lm_head_path not in tied_linears(model, adapter.embeddings_path):
        return dict(schemes)
    embeddings, head = schemes.get("embeddings"), schemes.get("lm_head")
    if embeddings and head and embeddings != head:
        raise SchemeError(
            f"lm_head is tied to the embeddings (one tensor) but got {head.name} and {embeddings.name}: "
            "give both parts the same scheme, or only one of them"
        )
    merged = {part: scheme for part, scheme in schemes.items() if part != "lm_head"}
    if embeddings or head:
        merged["embeddings"] = embeddings or head
    return merged


class RTN(Method):
    name = "rtn"
    description = "round-to-nearest, per-group min-max (no calibration)"
    default_schemes = {8: "w8g128", 4: "w4g128", 3: "w3g64", 2: "w2g16"}
    default_components = ("language",)

    def quantize(self, model: nn.Module, adapter: FamilyAdapter, ctx: QuantContext) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        for part, scheme in merge_tied_head(model, adapter, ctx.schemes).items():
            if part == "embeddings":
                def make_embedding(name: str, embedding: nn.Embedding, scheme=scheme) -> QuantEmbedding:
                    return QuantEmbedding.from_embedding(embedding, quantize_weight(embedding.weight.data, scheme))

                names = swap_embeddings(model, [adapter.embeddings_path], make_embedding)
                summary[part] = {"scheme": scheme.name, "modules": names}
                ctx.log(f"rtn: embeddings: {', '.join(names)} -> {scheme.name}")
                continue
            linears = adapter.linears(model, part)

            def make(name: str, linear: nn.Linear, scheme=scheme) -> QuantLinear:
                return QuantLinear.from_linear(linear, quantize_weight(linear.weight.data, scheme))

            swap_linears(model, list(linears), make)
            summary[part] = {"scheme": scheme.name, "linears": len(linears)}
            ctx.log(f"rtn: {part}: {len(linears)} linears -> {scheme.name}")
        return summary


@hookimpl
def speedq_methods() -> list[Method]:
    return [RTN()]
