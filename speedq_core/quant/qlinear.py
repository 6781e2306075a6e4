"""Inference linear layer over a packed quantized weight.

``QuantLinear`` keeps exactly the tensors that go to disk (see ``packed_layout``) as buffers, so its
``state_dict`` *is* the export, and every forward dequantizes them through
``QuantizedWeight.dequantize``: ``y = F.linear(x, w_hat.to(x.dtype), b)``. A model quantized in
memory and the same model reloaded from disk therefore compute bit-identical outputs.

The packed buffers keep their dtype under ``module.to(dtype)`` / ``.half()``: fp16 scales are moved
as int16 bit patterns, so casting a model to bf16 casts only the bias.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from speedq_core.errors import SchemeError
from speedq_core.quant.qweight import QuantizedWeight, check_packed, packed_layout, validate_shape
from speedq_core.quant.scheme import QuantScheme


def check_fits(qweight: QuantizedWeight, weight: torch.Tensor, kind: str) -> None:
    """SchemeError unless ``qweight`` has ``weight``'s shape (``kind``: "linear" or "embedding")."""
    if tuple(qweight.shape) != tuple(weight.shape):
        article = "an" if kind[0] in "aeiou" else "a"
        raise SchemeError(
            f"quantized weight of shape {tuple(qweight.shape)} does not fit {article} {kind} of shape "
            f"{tuple(weight.shape)}: quantize this {kind}'s own weight"
        )


class PackedBuffers(nn.Module):
    """Base of modules holding packed buffers (``self._layout``: name -> (shape, dtype)): a dtype cast
    of the module (``.to(bfloat16)``) must not touch them, so fp16 scales travel as int16 bits."""

    _layout: dict

    def _apply(self, fn, recurse=True):
        float_buffers = [name for name in self._layout if self._buffers[name].is_floating_point()]
        for name in float_buffers:
            self._buffers[name] = self._buffers[name].view(torch.int16)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in float_buffers:
                self._buffers[name] = self._buffers[name].view(self._layout[name][1])


class QuantLinear(PackedBuffers):
    """Packed ``(out, in)`` weight with ``scheme``, optional bias."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        validate_shape(scheme, (out_features, in_features))
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self._layout = packed_layout(scheme, (out_features, in_features))
        for name, (shape, buf_dtype) in self._layout.items():
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], scheme: QuantScheme, shape: tuple[int, int],
                    bias: torch.Tensor | None = None) -> QuantLinear:
        """A QuantLinear over packed ``tensors`` (checked against ``packed_layout``) and ``bias``, without copies."""
        check_packed(tensors, scheme, shape)
        out_features, in_features = shape
        module = cls(in_features, out_features, scheme, bias=False, device="meta")
        for name in module._layout:
            setattr(module, name, tensors[name].detach())
        if bias is not None:
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return module

    @classmethod
    def from_qweight(cls, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        """A QuantLinear holding ``qweight.to_packed_tensors()`` and a copy of ``bias``."""
        bias = None if bias is None else bias.detach().clone()
        return cls.from_packed(qweight.to_packed_tensors(), qweight.scheme, qweight.shape, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qweight: QuantizedWeight) -> QuantLinear:
        """Replace ``linear`` by its quantized weight ``qweight`` (shape-checked) and its bias."""
        check_fits(qweight, linear.weight, "linear")
        return cls.from_qweight(qweight, linear.bias)

    @property
    def qweight(self) -> QuantizedWeight:
        """The QuantizedWeight these buffers encode."""
        tensors = {name: getattr(self, name) for name in self._layout}
        return QuantizedWeight.from_packed_tensors(tensors, self.scheme, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        cache = getattr(self, "_dequantized", None)
        if cache is None:
            return F.linear(x, self.qweight.dequantize(x.dtype), bias)
        if x.dtype not in cache:  # same dequantize as above, kept for the cache's scope
            cache[x.dtype] = self.qweight.dequantize(x.dtype)
        return F.linear(x, cache[x.dtype], bias)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear with ``w_hat`` in ``dtype`` (default: the bias dtype, else bfloat16)."""
        default = torch.bfloat16 if self.bias is None else self.bias.dtype
        return dequantized_linear(self.qweight, self.bias, dtype or default)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, " \
               f"bias={self.bias is not None}"


def dequantized_linear(qweight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """nn.Linear with weight ``qweight.dequantize(dtype)`` and a copy of ``bias`` in ``dtype``."""
    out_features, in_features = qweight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=dtype)
    linear.weight = nn.Parameter(qweight.dequantize(dtype))
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype).clone())
    return linear


@contextlib.contextmanager
def dequantized_cache(model: nn.Module) -> Iterator[None]:
    """Within the block, each QuantLinear dequantizes its weight once per dtype and reuses it.

    For evaluation loops (generation calls every linear once per token): outputs are identical, the
    cost is a float copy of every quantized weight for the block's duration, freed at its end.
    """
    modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for module in modules:
        module._dequantized = {}
    try:
        yield
    finally:
        for module in modules:
            module._dequantized = None
