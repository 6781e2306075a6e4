"""RTN: round-to-nearest group-wise quantization, no calibration data.

Each selected ``nn.Linear`` weight W (out, in) becomes q = clamp(round(W/s) + z, 0, 2^b - 1) with
per-group min-max scale and zero (``speedq_core.quant.groupwise``; bilevel scales when the scheme
has a second level), stored as a ``QuantLinear``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from speedq_core.adapter import FamilyAdapter
from speedq_core.errors import SchemeError
from speedq_core.hookspecs import hookimpl
from speedq_core.method import Method, QuantContext
from speedq_core.quant import QuantLinear, quantize_weight, swap_linears


class RTN(Method):
    name = "rtn"
    description = "round-to-nearest, per-group min-max (no calibration)"
    default_schemes = {8: "w8g128", 4: "w4g128", 3: "w3g64", 2: "w2g16"}
    default_components = ("language",)

    def quantize(self, model: nn.Module, adapter: FamilyAdapter, ctx: QuantContext) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        for part, scheme in ctx.schemes.items():
            linears = adapter.linears(model, part)

            def make(name: str, linear: nn.Linear, scheme=scheme) -> QuantLinear:
                try:
                    return QuantLinear.from_linear(linear, quantize_weight(linear.weight.data, scheme))
                except SchemeError as exc:
                    raise SchemeError(f"{name}: {exc}") from None

            swap_linears(model, list(linears), make)
            summary[part] = {"scheme": scheme.name, "linears": len(linears)}
            ctx.log(f"rtn: {part}: {len(linears)} linears -> {scheme.name}")
        return summary


@hookimpl
def speedq_methods() -> list[Method]:
    return [RTN()]
