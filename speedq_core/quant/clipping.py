"""Asymmetric clipping search (paper eq. 4, as the official ``autoclip.py``).

For a linear ``W`` ``(out, in)`` and calibration inputs ``X`` ``(tokens, in)``, every group ``g`` of
row ``r`` (``G`` inputs, the quantization group) gets its own lower and upper bound, searched on a
full 2-D grid with ``n = int(max_shrink * n_grid)`` steps each::

    alpha_i = min(W_rg) * (1 - i / n_grid),   beta_j = max(W_rg) * (1 - j / n_grid),   0 <= i, j < n
    err_rg(alpha, beta) = mean_t ( sum_{k in g} (Q(clip(W, alpha, beta))_rk - W_rk) * X_tk )^2

and keeps the pair with the lowest error. ``Q`` is single-level eq. (1) with the scheme's ``b`` and
``G`` (float scales, no bilevel), as in the official search. Each group's term of ``W X`` is
scored on its own (as AWQ's ``auto_clip`` does), so the groups are independent and the search is
exact per group; ``i = j = 0`` is "no clipping", so the searched bounds never score worse than none.
Unlike AWQ (one symmetric shrink of ``max|w|``), the two ends shrink independently.
Memory is bounded by chunking over output rows and subsampling tokens with a fixed stride.
"""
from __future__ import annotations

import torch

from speedq_core.quant.groupwise import dequantize_groupwise, group_view, quantize_groupwise
from speedq_core.quant.scheme import QuantScheme


def _group_errors(w: torch.Tensor, x: torch.Tensor, scheme: QuantScheme, clip_min, clip_max) -> torch.Tensor:
    """``err_rg`` ``(rows, in/G)`` for weight rows ``w`` ``(rows, in)`` and tokens ``x`` ``(tokens, in)``."""
    q, scale, zero = quantize_groupwise(w, scheme.bits, scheme.group_size, clip_min, clip_max)
    diff = group_view(dequantize_groupwise(q, scale, zero, scheme.group_size) - w.float(), scheme.group_size)
    partial = torch.einsum("rgk,tgk->rtg", diff, group_view(x, scheme.group_size))
    return partial.pow(2).mean(dim=1)


def _subsample(inputs: torch.Tensor, n_tokens: int) -> torch.Tensor:
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    return x[:: max(1, x.shape[0] // n_tokens)][:n_tokens]


@torch.no_grad()
def clip_error(weight: torch.Tensor, inputs: torch.Tensor, scheme: QuantScheme, clip_min=None, clip_max=None,
               n_tokens: int = 512) -> torch.Tensor:
    """The search objective ``err_rg`` ``(out, in/G)`` for given bounds (None = no clipping)."""
    return _group_errors(weight, _subsample(inputs, n_tokens), scheme, clip_min, clip_max)


@torch.no_grad()
def search_clip(weight: torch.Tensor, inputs: torch.Tensor, scheme: QuantScheme, n_grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 512,
                rows_per_chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``(clip_min, clip_max)``, float32 ``(out, in/G)``, for ``weight`` ``(out, in)``, ``inputs`` ``(..., in)``.

    The bounds feed ``quantize_weight(w, scheme, clip_min, clip_max)`` and ``FakeQuantLinear.from_linear``.
    """
    x = _subsample(inputs, n_tokens).to(weight.device)
    steps = int(max_shrink * n_grid)
    mins, maxs = [], []
    for rows in weight.split(rows_per_chunk):
        wg = group_view(rows, scheme.group_size)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(steps):
            alpha = lo * (1 - i / n_grid)
            for j in range(steps):
                beta = hi * (1 - j / n_grid)
                err = _group_errors(rows, x, scheme, alpha, beta)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_lo = torch.where(better, alpha, best_lo)
                best_hi = torch.where(better, beta, best_hi)
        mins.append(best_lo)
        maxs.append(best_hi)
    return torch.cat(mins), torch.cat(maxs)
