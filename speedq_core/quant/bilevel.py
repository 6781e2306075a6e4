"""Bilevel quantization: the first-level scales quantized again (paper eq. 2, official SPEED-Q order).

Order. As in the official code, the weight is viewed ``(out, in/G, G)`` and permuted to
``(in/G, out, G)`` before the scales are flattened, so the scale matrix ``S`` ``(out, n)`` is read
column by column: a second-level group holds the scales of **one input-group column across ``G_q``
consecutive output rows**. Needs ``out % G_q == 0``.

Per second-level group of ``G_q`` scales, with ``maxq_s = 2^{b_s} - 1``::

    lo, hi = min(S_g), max(S_g)           (lo, hi = -1, +1 when lo == hi, as the official code)
    s2 = max((hi - lo) / maxq_s, 1e-5)    float, stored fp16
    m2 = lo                               float, stored fp16
    q_s = clamp(round((S - m2) / s2), 0, maxq_s)
    s_hat = q_s * s2 + m2

The official code keeps a float zero ``z2 = -lo / s2`` and computes ``s_hat = (q_s - z2) * s2``; that
is the same number (``m2 = -z2 * s2``). We store ``m2`` because it is bounded by the scales
themselves, while ``z2`` overflows fp16 when the scales of a group are nearly equal. ``s_hat`` is
always positive (``q_s >= 0`` and ``m2 = min(S) > 0``; in a degenerate group ``q_s >= 8``).
"""
from __future__ import annotations

import torch

from speedq_core.errors import SchemeError
from speedq_core.quant.groupwise import SCALE_FLOOR
from speedq_core.quant.scheme import SCALE_STORAGE_DTYPE


def to_storage_precision(x: torch.Tensor) -> torch.Tensor:
    """Round float32 ``x`` to the scale storage dtype (fp16) and back, so memory and disk agree bit for bit."""
    rounded = x.to(SCALE_STORAGE_DTYPE).float()
    if not torch.isfinite(rounded).all():
        raise SchemeError(
            f"a quantization scale overflows {SCALE_STORAGE_DTYPE}: the weight range is too large; "
            "clip the weight (clipping.search_clip) before quantizing"
        )
    return rounded


def check_scale_group_size(out_features: int, scale_group_size: int) -> None:
    """Raise SchemeError unless ``G_q`` divides ``out``."""
    if out_features % scale_group_size:
        raise SchemeError(
            f"scale group size {scale_group_size} does not divide out_features={out_features}: "
            "choose a second-level group size that divides it or quantize this layer single-level"
        )


def scale_groups(scale: torch.Tensor, scale_group_size: int) -> torch.Tensor:
    """``S`` ``(out, n)`` -> ``(n, out/G_q, G_q)``: group ``[j, r]`` = column ``j``, rows ``r*G_q .. r*G_q+G_q-1``."""
    out_features, n_groups = scale.shape
    check_scale_group_size(out_features, scale_group_size)
    return scale.float().t().reshape(n_groups, out_features // scale_group_size, scale_group_size)


def quantize_scales(
    scale: torch.Tensor, bits: int, scale_group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize first-level scales ``S`` ``(out, n)``.

    Returns ``q_s`` uint8 ``(out, n)``, ``s2`` and ``m2`` float32 ``(n, out/G_q)`` (fp16-exact values).
    """
    maxq = (1 << bits) - 1
    groups = scale_groups(scale, scale_group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    degenerate = lo == hi
    lo = torch.where(degenerate, -1.0, lo)
    hi = torch.where(degenerate, 1.0, hi)
    scale2 = to_storage_precision(((hi - lo) / maxq).clamp_min(SCALE_FLOOR))
    min2 = to_storage_precision(lo)
    codes = torch.round((groups - min2.unsqueeze(-1)) / scale2.unsqueeze(-1)).clamp(0, maxq)
    return codes.reshape(scale.shape[1], -1).t().to(torch.uint8).contiguous(), scale2, min2


def dequantize_scales(
    scale_q: torch.Tensor, scale2: torch.Tensor, min2: torch.Tensor, scale_group_size: int
) -> torch.Tensor:
    """``s_hat = q_s * s2 + m2``: ``q_s`` ``(out, n)``, ``s2``/``m2`` ``(n, out/G_q)`` -> float32 ``(out, n)``."""
    groups = scale_groups(scale_q, scale_group_size)
    s_hat = groups * scale2.float().unsqueeze(-1) + min2.float().unsqueeze(-1)
    return s_hat.reshape(scale_q.shape[1], -1).t().contiguous()
