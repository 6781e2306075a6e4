"""Bilevel quantization: the first-level scales quantized again (paper eq. 2, official SPEED-Q order).

Order. As in the official code, the weight is viewed ``(out, in/G, G)`` and permuted to
``(in/G, out, G)`` before the scales are flattened, so the scale matrix ``S`` ``(out, n)`` is read
column by column: a second-level group holds the scales of **one input-group column across ``G_q``
consecutive output rows**.

Padding. When ``G_q`` does not divide ``out`` (InternVL's vocabulary of 151674 rows with
``G_q = 128``: embeddings and lm_head), the rows of ``S`` are padded up to ``ceil(out/G_q) * G_q``
with copies of the last row, for the second-level grouping only. A copy of a value already in the
last (partial) group leaves its min and max, hence ``s2``, ``m2`` and every code, unchanged; the
padded second-level parameters ``(n, ceil(out/G_q))`` are stored and the codes of the padding rows
are dropped (``q_s`` stays ``(out, n)``). This is exactly "the last group holds ``out mod G_q``
scales"; the official code has no such case (it never quantizes a row count that ``G_q`` misses).

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


def n_scale_groups(out_features: int, scale_group_size: int) -> int:
    """Second-level groups per scale column: ``ceil(out / G_q)`` (the last one partial when ``G_q`` misses)."""
    return -(-out_features // scale_group_size)


def scale_groups(scale: torch.Tensor, scale_group_size: int) -> torch.Tensor:
    """``S`` ``(out, n)`` -> ``(n, ceil(out/G_q), G_q)``: group ``[j, r]`` = column ``j``, rows ``r*G_q .. r*G_q+G_q-1``.

    Rows past ``out`` (padding) repeat the last row, so a partial group's min and max are its own.
    """
    out_features, n_groups = scale.shape
    n_second = n_scale_groups(out_features, scale_group_size)
    pad = n_second * scale_group_size - out_features
    if pad:
        scale = torch.cat([scale, scale[-1:].expand(pad, n_groups)])
    return scale.float().t().reshape(n_groups, n_second, scale_group_size)


def ungroup(groups: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of :func:`scale_groups`: ``(n, ceil(out/G_q), G_q)`` -> ``(out, n)``, padding rows dropped."""
    return groups.reshape(groups.shape[0], -1)[:, :out_features].t().contiguous()


def quantize_scales(
    scale: torch.Tensor, bits: int, scale_group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize first-level scales ``S`` ``(out, n)``.

    Returns ``q_s`` uint8 ``(out, n)``, ``s2`` and ``m2`` float32 ``(n, ceil(out/G_q))`` (fp16-exact values).
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
    return ungroup(codes, scale.shape[0]).to(torch.uint8), scale2, min2


def dequantize_scales(
    scale_q: torch.Tensor, scale2: torch.Tensor, min2: torch.Tensor, scale_group_size: int
) -> torch.Tensor:
    """``s_hat = q_s * s2 + m2``: ``q_s`` ``(out, n)``, ``s2``/``m2`` ``(n, ceil(out/G_q))`` -> float32 ``(out, n)``."""
    groups = scale_groups(scale_q, scale_group_size)
    s_hat = groups * scale2.float().unsqueeze(-1) + min2.float().unsqueeze(-1)
    return ungroup(s_hat, scale_q.shape[0])
