"""A quantized weight: integer codes, zero points and (possibly bilevel) scales, plus its packed form.

Every float field holds float32 values that are exactly representable in fp16, the storage dtype,
so an in-memory weight and one reloaded from disk dequantize to the same bits. Codes are computed
against the *stored* scales (fp16-rounded, or the second-level reconstruction ``s_hat``), while the
zero point is computed from the float first-level scale — the official SPEED-Q order
(``find_params``: zero from ``s``, then ``s`` replaced by ``s_hat``, then ``q = round(w/s_hat + z)``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from speedq_core.errors import CheckpointError
from speedq_core.quant.bilevel import (
    dequantize_scales,
    n_scale_groups,
    quantize_scales,
    to_storage_precision,
)
from speedq_core.quant.groupwise import (
    check_group_size,
    clip_weight,
    dequantize_groupwise,
    minmax_params,
    quantize_with_params,
)
from speedq_core.quant.pack import pack_bits, packed_nbytes, unpack_bits
from speedq_core.quant.scheme import SCALE_STORAGE_DTYPE, QuantScheme


@dataclass(eq=False)
class QuantizedWeight:
    """``q`` uint8 ``(out, in)``, ``zero`` uint8 ``(out, in/G)``; then either ``scale`` float32
    ``(out, in/G)`` (single level) or ``scale_q`` uint8 ``(out, in/G)`` with ``scale2`` and ``min2``
    float32 ``(in/G, ceil(out/G_q))`` (bilevel, see :mod:`speedq_core.quant.bilevel`)."""

    scheme: QuantScheme
    shape: tuple[int, int]
    q: torch.Tensor
    zero: torch.Tensor
    scale: torch.Tensor | None = None
    scale_q: torch.Tensor | None = None
    scale2: torch.Tensor | None = None
    min2: torch.Tensor | None = None

    def scales(self) -> torch.Tensor:
        """Effective first-level scales ``s`` (single level) or ``s_hat`` (bilevel), float32 ``(out, in/G)``."""
        if self.scheme.bilevel:
            return dequantize_scales(self.scale_q, self.scale2, self.min2, self.scheme.scale_group_size)
        return self.scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``w_hat = (q - z) * s`` in float32, then cast to ``dtype``; shape ``(out, in)``."""
        return dequantize_groupwise(self.q, self.scales(), self.zero, self.scheme.group_size).to(dtype)

    def to_packed_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors as stored: bit-packed ``codes``/``zeros`` (and ``scale_codes``), fp16 scales."""
        bits = self.scheme.bits
        packed = {"codes": pack_bits(self.q, bits), "zeros": pack_bits(self.zero, bits)}
        if self.scheme.bilevel:
            packed["scale_codes"] = pack_bits(self.scale_q, self.scheme.scale_bits)
            packed["scale2"] = self.scale2.to(SCALE_STORAGE_DTYPE)
            packed["min2"] = self.min2.to(SCALE_STORAGE_DTYPE)
        else:
            packed["scales"] = self.scale.to(SCALE_STORAGE_DTYPE)
        return packed

    @classmethod
    def from_packed_tensors(
        cls, tensors: dict[str, torch.Tensor], scheme: QuantScheme, shape: tuple[int, int]
    ) -> QuantizedWeight:
        """Inverse of :meth:`to_packed_tensors`; raises CheckpointError naming a missing or mis-shaped tensor."""
        check_packed(tensors, scheme, shape)
        out_features, in_features = shape
        n_groups = in_features // scheme.group_size
        fields = {
            "q": unpack_bits(tensors["codes"], scheme.bits, out_features * in_features).view(shape),
            "zero": unpack_bits(tensors["zeros"], scheme.bits, out_features * n_groups).view(out_features, n_groups),
        }
        if scheme.bilevel:
            codes = unpack_bits(tensors["scale_codes"], scheme.scale_bits, out_features * n_groups)
            fields.update(
                scale_q=codes.view(out_features, n_groups),
                scale2=tensors["scale2"].float(),
                min2=tensors["min2"].float(),
            )
        else:
            fields["scale"] = tensors["scales"].float()
        return cls(scheme=scheme, shape=tuple(shape), **fields)


def check_packed(tensors: dict[str, torch.Tensor], scheme: QuantScheme, shape: tuple[int, int]) -> None:
    """Raise CheckpointError naming the first tensor of :func:`packed_layout` that is missing or mis-shaped."""
    for key, (want_shape, want_dtype) in packed_layout(scheme, shape).items():
        if key not in tensors:
            raise CheckpointError(f"packed tensor {key!r} is missing for a {scheme.name} weight: re-export the model")
        got = tensors[key]
        if tuple(got.shape) != want_shape or got.dtype != want_dtype:
            raise CheckpointError(
                f"packed tensor {key!r} is {tuple(got.shape)} {got.dtype}, expected {want_shape} {want_dtype} "
                f"for a {scheme.name} weight of shape {tuple(shape)}: re-export the model"
            )


def packed_layout(scheme: QuantScheme, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor :meth:`QuantizedWeight.to_packed_tensors` returns."""
    out_features, in_features = shape
    n_groups = in_features // scheme.group_size
    layout = {
        "codes": ((packed_nbytes(out_features * in_features, scheme.bits),), torch.uint8),
        "zeros": ((packed_nbytes(out_features * n_groups, scheme.bits),), torch.uint8),
    }
    if scheme.bilevel:
        second = (n_groups, n_scale_groups(out_features, scheme.scale_group_size))
        layout["scale_codes"] = ((packed_nbytes(out_features * n_groups, scheme.scale_bits),), torch.uint8)
        layout["scale2"] = (second, SCALE_STORAGE_DTYPE)
        layout["min2"] = (second, SCALE_STORAGE_DTYPE)
    else:
        layout["scales"] = ((out_features, n_groups), SCALE_STORAGE_DTYPE)
    return layout


def validate_shape(scheme: QuantScheme, shape: tuple[int, int]) -> None:
    """Raise SchemeError unless ``G`` divides ``in`` (any ``out`` works: second-level groups are padded)."""
    check_group_size(tuple(shape), scheme.group_size)


@torch.no_grad()
def encode_weight(w: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor, zero: torch.Tensor) -> QuantizedWeight:
    """Codes of ``w`` ``(out, in)`` for first-level ``scale`` (float) and ``zero`` (integer) ``(out, in/G)``.

    The scale is first made storable (fp16-rounded, or bilevel-quantized to ``s_hat``); then
    ``q = clamp(round(w / s_stored) + z, 0, 2^b - 1)``.
    """
    fields = {}
    if scheme.bilevel:
        scale_q, scale2, min2 = quantize_scales(scale, scheme.scale_bits, scheme.scale_group_size)
        stored = dequantize_scales(scale_q, scale2, min2, scheme.scale_group_size)
        fields.update(scale_q=scale_q, scale2=scale2, min2=min2)
    else:
        stored = fields["scale"] = to_storage_precision(scale)
    zero = zero.to(torch.uint8)
    q = quantize_with_params(w, stored, zero, scheme.bits)
    return QuantizedWeight(scheme=scheme, shape=tuple(w.shape), q=q, zero=zero, **fields)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, scheme: QuantScheme, clip_min=None, clip_max=None) -> QuantizedWeight:
    """Round-to-nearest with ``scheme`` (eq. 1, and eq. 2 when bilevel) of ``clamp(w, clip_min, clip_max)``.

    ``w`` ``(out, in)`` any float dtype; clip bounds broadcast to ``(out, in/G)``.
    """
    w = clip_weight(w, scheme.group_size, clip_min, clip_max)
    scale, zero = minmax_params(w, scheme.bits, scheme.group_size)
    return encode_weight(w, scheme, scale, zero)


def relative_error(w: torch.Tensor, scheme: QuantScheme) -> float:
    """``||w_hat - w||_F / ||w||_F`` for round-to-nearest with ``scheme``."""
    w = w.float()
    return float(torch.linalg.norm(quantize_weight(w, scheme).dequantize() - w) / torch.linalg.norm(w))
