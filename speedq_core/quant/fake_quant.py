"""Fake-quantized linear layer for quantization-aware training (straight-through estimator).

``learnable="none"`` (official SPEED-Q): at every forward the scales and zero points are recomputed
from the current weight with :func:`~speedq_core.quant.qweight.quantize_weight` (no gradient to
them) and the weight gradient is the identity masked to the representable range of its group::

    forward:  w_hat = (q - z) * s          (exactly QuantizedWeight.dequantize())
    backward: dL/dw = dL/dw_hat * [-s*z <= w <= s*(2^b - 1 - z)]

``learnable="scale_zero"`` (LSQ-style): float ``scale`` and ``zero`` parameters ``(out, in/G)``,
initialised from the weight, are trained; ``round`` passes gradients straight through::

    s' = storable(max(scale, 1e-5)),  z' = clamp(round(zero), 0, 2^b - 1)
    w_hat = (clamp(round(w / s') + z', 0, 2^b - 1) - z') * s'

``storable`` is the fp16 rounding, or the bilevel quantize-dequantize of the scales; in both modes
the forward value equals ``to_quantized_weight().dequantize()`` bit for bit, so QAT exports exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speedq_core.errors import SchemeError
from speedq_core.quant.bilevel import dequantize_scales, quantize_scales, to_storage_precision
from speedq_core.quant.groupwise import SCALE_FLOOR, clip_weight, group_view, minmax_params
from speedq_core.quant.qlinear import dequantized_linear
from speedq_core.quant.qweight import QuantizedWeight, encode_weight, quantize_weight, validate_shape
from speedq_core.quant.scheme import QuantScheme

LEARNABLE = ("none", "scale_zero")


def straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Forward ``value`` exactly, backward the identity to ``x``: ``value + (x - x.detach())``."""
    return value.detach() + (x - x.detach())


def masked_ste(w: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    """Forward ``qweight.dequantize()``; gradient to ``w`` masked to ``[-s*z, s*(2^b-1-z)]`` per group."""
    group_size = qweight.scheme.group_size
    wg = group_view(w, group_size)
    scale = qweight.scales().unsqueeze(-1)
    zero = qweight.zero.float().unsqueeze(-1)
    inside = (wg >= -scale * zero) & (wg <= scale * (qweight.scheme.maxq - zero))
    return qweight.dequantize().detach() + ((wg - wg.detach()) * inside).reshape(w.shape)


def storable_scales(scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The scales as stored (fp16-rounded or bilevel ``s_hat``) of float ``scale`` ``(out, in/G)``, no gradient."""
    with torch.no_grad():
        if scheme.bilevel:
            codes, scale2, min2 = quantize_scales(scale, scheme.scale_bits, scheme.scale_group_size)
            return dequantize_scales(codes, scale2, min2, scheme.scale_group_size)
        return to_storage_precision(scale)


class FakeQuantLinear(nn.Module):
    """``y = x @ w_hat^T + b`` with ``w_hat`` the fake-quantized ``weight`` (a Parameter, trained in float)."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = True,
                 learnable: str = "none", device=None, dtype=None):
        super().__init__()
        if learnable not in LEARNABLE:
            raise SchemeError(f"learnable={learnable!r} is not supported: use one of {', '.join(LEARNABLE)}")
        validate_shape(scheme, (out_features, in_features))
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.learnable = scheme, learnable
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if learnable == "scale_zero":
            n_groups = in_features // scheme.group_size
            self.scale = nn.Parameter(torch.ones(out_features, n_groups, device=device))
            self.zero = nn.Parameter(torch.zeros(out_features, n_groups, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, learnable: str = "none",
                    clip_min=None, clip_max=None) -> FakeQuantLinear:
        """Wrap ``linear``, sharing its weight and bias Parameters.

        ``clip_min``/``clip_max`` (``(out, in/G)`` or ``(out, 1)``, see clipping.py) are applied to the
        weight in place, as the official code bakes its clipping into the weights before QAT.
        """
        module = cls(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None,
                     learnable=learnable, device="meta")
        module.weight, module.bias = linear.weight, linear.bias
        with torch.no_grad():
            if clip_min is not None or clip_max is not None:
                clipped = clip_weight(linear.weight, scheme.group_size, clip_min, clip_max)
                linear.weight.copy_(clipped.to(linear.weight.dtype))
            if learnable == "scale_zero":
                scale, zero = minmax_params(linear.weight, scheme.bits, scheme.group_size)
                module.scale = nn.Parameter(scale)
                module.zero = nn.Parameter(zero.float())
        return module

    def _learned_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s', z')`` of the module docstring, with straight-through gradients to ``scale`` and ``zero``."""
        scale = self.scale.clamp_min(SCALE_FLOOR)
        stored = straight_through(scale, storable_scales(scale.detach(), self.scheme))
        zero = straight_through(self.zero, torch.round(self.zero.detach()).clamp(0, self.scheme.maxq))
        return stored, zero

    def fake_weight(self) -> torch.Tensor:
        """The fake-quantized weight, float32 ``(out, in)``, differentiable as described above."""
        if self.learnable == "none":
            with torch.no_grad():
                qweight = quantize_weight(self.weight, self.scheme)
            return masked_ste(self.weight, qweight)
        scale, zero = (p.unsqueeze(-1) for p in self._learned_params())
        wg = group_view(self.weight, self.scheme.group_size) / scale
        q = (straight_through(wg, torch.round(wg)) + zero).clamp(0, self.scheme.maxq)
        return ((q - zero) * scale).reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.fake_weight().to(x.dtype), bias)

    @torch.no_grad()
    def to_quantized_weight(self) -> QuantizedWeight:
        """The current state as a QuantizedWeight whose ``dequantize()`` equals the forward's ``w_hat``."""
        if self.learnable == "none":
            return quantize_weight(self.weight, self.scheme)
        scale = self.scale.clamp_min(SCALE_FLOOR)
        zero = torch.round(self.zero).clamp(0, self.scheme.maxq)
        return encode_weight(self.weight, self.scheme, scale, zero)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding ``w_hat`` in ``dtype`` (default: the weight's dtype)."""
        return dequantized_linear(self.to_quantized_weight(), self.bias, dtype or self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, " \
               f"learnable={self.learnable}"

