"""Quantization schemes: ``w{b}g{G}`` (single level) and ``w{b}g{G}g{G_q}`` (bilevel).

A scheme is asymmetric: every group of ``G`` weights along the input dimension has a scale and an
integer zero point of ``b`` bits. Bilevel schemes quantize the first-level scales again with ``b_s``
bits in groups of ``G_q`` (paper eq. 2); the official SPEED-Q code uses ``b_s = 4`` at every weight
width, so that is the default and the name carries an ``s{b_s}`` suffix only when it differs.

Storage (what :mod:`speedq_core.quant.pack` and the exporter write): codes and zero points packed
in ``b`` bits, first-level scales in fp16 (single level) or packed in ``b_s`` bits plus an fp16
second-level scale and offset per group of ``G_q`` scales (bilevel).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from speedq_core.errors import SchemeError

VALID_BITS = (2, 3, 4, 8)
DEFAULT_SCALE_BITS = 4
SCALE_STORAGE_DTYPE = torch.float16
_PATTERN = re.compile(r"w(\d+)g(\d+)(?:g(\d+))?(?:s(\d+))?")
_SYNTAX = "write w{bits}g{group}[g{scale_group}][s{scale_bits}], bits in 2,3,4,8"


@dataclass(frozen=True)
class QuantScheme:
    """``bits`` b, ``group_size`` G, and for bilevel ``scale_bits`` b_s and ``scale_group_size`` G_q.

    Giving only ``scale_group_size`` selects bilevel with the official ``scale_bits = 4``.
    """

    bits: int
    group_size: int
    scale_bits: int | None = None
    scale_group_size: int | None = None

    def __post_init__(self) -> None:
        if self.scale_group_size is not None and self.scale_bits is None:
            object.__setattr__(self, "scale_bits", DEFAULT_SCALE_BITS)
        if self.bits not in VALID_BITS:
            raise SchemeError(f"bits={self.bits} is not supported: use one of 2, 3, 4, 8")
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise SchemeError(f"group size {self.group_size!r} is invalid: use a positive integer such as 32 or 128")
        if self.scale_bits is not None and self.scale_group_size is None:
            raise SchemeError("scale_bits needs scale_group_size: give both for a bilevel scheme or neither")
        if self.bilevel:
            if self.scale_bits not in VALID_BITS:
                raise SchemeError(f"scale bits {self.scale_bits} is not supported: use one of 2, 3, 4, 8")
            if not isinstance(self.scale_group_size, int) or self.scale_group_size <= 0:
                raise SchemeError(
                    f"scale group size {self.scale_group_size!r} is invalid: use a positive integer such as 16 or 128"
                )

    @property
    def bilevel(self) -> bool:
        return self.scale_group_size is not None

    @property
    def maxq(self) -> int:
        """Largest code, ``2^b - 1``."""
        return (1 << self.bits) - 1

    @property
    def name(self) -> str:
        """``w4g128``, ``w4g32g128``, ``w2g16g16s8`` (suffix only when b_s != 4)."""
        name = f"w{self.bits}g{self.group_size}"
        if self.bilevel:
            name += f"g{self.scale_group_size}"
            if self.scale_bits != DEFAULT_SCALE_BITS:
                name += f"s{self.scale_bits}"
        return name

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str) -> QuantScheme:
        """Inverse of :attr:`name`; raises :class:`SchemeError` with the syntax for anything else."""
        match = _PATTERN.fullmatch(text.strip().lower()) if isinstance(text, str) else None
        if match is None or (match.group(4) is not None and match.group(3) is None):
            raise SchemeError(f"bad scheme {text!r}: {_SYNTAX}")
        bits, group, scale_group, scale_bits = (None if g is None else int(g) for g in match.groups())
        try:
            return cls(bits, group, scale_bits, scale_group)
        except SchemeError as exc:
            raise SchemeError(f"bad scheme {text!r}: {_SYNTAX} ({exc})") from None

    def bits_per_weight(self, scale_dtype_bits: int = 16, zero_bits: int | None = None) -> float:
        """Average stored bits per weight, overhead included.

        single level: ``b + (scale_dtype_bits + zero_bits) / G``
        bilevel:      ``b + (b_s + zero_bits) / G + 2 * scale_dtype_bits / (G * G_q)``
        ``zero_bits`` defaults to ``b`` (integer zero points, as stored here); the common
        "w4g128 = 4.25 bits" convention counts an fp16 zero point (``zero_bits=16``).
        """
        zero_bits = self.bits if zero_bits is None else zero_bits
        if not self.bilevel:
            return self.bits + (scale_dtype_bits + zero_bits) / self.group_size
        per_group = (self.scale_bits + zero_bits) / self.group_size
        return self.bits + per_group + 2 * scale_dtype_bits / (self.group_size * self.scale_group_size)
