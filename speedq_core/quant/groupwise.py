"""Group-wise asymmetric min-max quantization (paper eq. 1, as the official SPEED-Q code does it).

A weight ``W`` of shape ``(out, in)`` is cut into ``n = in / G`` groups of ``G`` consecutive inputs
per output row. Per group, with ``maxq = 2^b - 1``::

    lo, hi = min(w), max(w)             (lo, hi = -1, +1 when lo == hi)
    s = max((hi - lo) / maxq, 1e-5)
    z = clamp(round(-lo / s), 0, maxq)  integer zero point of b bits
    q = clamp(round(w / s) + z, 0, maxq)
    w_hat = (q - z) * s

All arithmetic is float32 whatever the input dtype; ``round`` is round-half-to-even (torch.round).
"""
from __future__ import annotations

import torch

from speedq_core.errors import SchemeError

SCALE_FLOOR = 1e-5


def check_group_size(shape: tuple[int, ...], group_size: int) -> None:
    """Raise SchemeError unless ``shape`` is ``(out, in)`` with ``in % G == 0``; the message suggests a ``G``."""
    if len(shape) != 2:
        raise SchemeError(f"expected a 2-D weight (out, in), got shape {tuple(shape)}: flatten it first")
    out_features, in_features = shape
    if in_features % group_size:
        divisors = [g for g in (256, 128, 64, 32, 16, 8) if in_features % g == 0]
        smaller = [g for g in divisors if g < group_size]
        hint = f"use group size {(smaller or divisors)[0]}" if divisors else "use a group size that divides it"
        raise SchemeError(
            f"group size {group_size} does not divide in_features={in_features} of a "
            f"({out_features}, {in_features}) weight: {hint}"
        )


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(out, in)`` -> float32 ``(out, in/G, G)``; raises SchemeError when ``G`` does not divide ``in``."""
    check_group_size(tuple(w.shape), group_size)
    return w.float().reshape(w.shape[0], w.shape[1] // group_size, group_size)


def expand(params: torch.Tensor) -> torch.Tensor:
    """Per-group ``(out, n)`` -> ``(out, n, 1)`` ready to broadcast against :func:`group_view`."""
    return params.float().unsqueeze(-1)


def clip_weight(w: torch.Tensor, group_size: int, clip_min=None, clip_max=None) -> torch.Tensor:
    """``clamp(w, clip_min, clip_max)`` per group; bounds broadcast to ``(out, in/G)`` (``(out, 1)`` = per row).

    Returns float32 ``(out, in)``.
    """
    wg = group_view(w, group_size)
    if clip_min is not None:
        wg = torch.maximum(wg, expand(torch.as_tensor(clip_min, device=wg.device)))
    if clip_max is not None:
        wg = torch.minimum(wg, expand(torch.as_tensor(clip_max, device=wg.device)))
    return wg.reshape(w.shape)


@torch.no_grad()
def minmax_params(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``s`` (float32 ``(out, in/G)``) and zero ``z`` (uint8 ``(out, in/G)``) of eq. (1)."""
    maxq = (1 << bits) - 1
    wg = group_view(w, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    degenerate = lo == hi
    lo = torch.where(degenerate, -1.0, lo)
    hi = torch.where(degenerate, 1.0, hi)
    scale = ((hi - lo) / maxq).clamp_min(SCALE_FLOOR)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero.to(torch.uint8)


def quantize_with_params(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``q = clamp(round(w / s) + z, 0, 2^b - 1)``, uint8 ``(out, in)``, for given ``s``, ``z`` ``(out, in/G)``."""
    group_size = w.shape[-1] // scale.shape[-1]
    wg = group_view(w, group_size)
    q = torch.round(wg / expand(scale)) + expand(zero)
    return q.clamp(0, (1 << bits) - 1).to(torch.uint8).reshape(w.shape)


def dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w_hat = (q - z) * s``: codes ``(out, in)``, ``s``/``z`` ``(out, in/G)`` -> float32 ``(out, in)``."""
    qg = group_view(q, group_size)
    return ((qg - expand(zero)) * expand(scale)).reshape(q.shape)


@torch.no_grad()
def quantize_groupwise(
    w: torch.Tensor, bits: int, group_size: int, clip_min=None, clip_max=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. (1) on ``clamp(w, clip_min, clip_max)``.

    Returns ``q`` uint8 ``(out, in)``, ``s`` float32 ``(out, in/G)`` and ``z`` uint8 ``(out, in/G)``.
    """
    w = clip_weight(w, group_size, clip_min, clip_max)
    scale, zero = minmax_params(w, bits, group_size)
    return quantize_with_params(w, scale, zero, bits), scale, zero
