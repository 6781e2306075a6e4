"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023), following the reference ``fasterquant`` of IST-DASLab/gptq (``gptq.py``).

For a linear ``W`` ``(out, in)`` with calibration inputs ``x_t`` ``(in,)`` over ``n`` tokens::

    H = 2/n * sum_t x_t x_t^T                              (in, in), streamed over the calibration set
    dead columns (H_ii = 0):  H_ii = 1,  W[:, i] = 0
    H += lambda * I,   lambda = damp * mean(diag H)        (damp = 0.01)
    U = cholesky(H^-1)  upper                              (so H^-1 = U^T U)
    for blocks of B = 128 columns [i1, i2):                (lazy batch updates)
        for i in i1..i2-1:
            when i starts a group: s, z = eq. (1) on W[:, i:i+G]     (current weights, see below)
            q_i = clamp(round(w_i / s) + z, 0, 2^b - 1);  w_hat_i = (q_i - z) s
            e_i = (w_i - w_hat_i) / U_ii
            W[:, i:i2] -= e_i U[i, i:i2]                   (inside the block)
        W[:, i2:] -= E U[i1:i2, i2:]                       (once per block)

Choices, all as the reference unless said:

- Group parameters come from ``W[:, i:i+G]`` of the *lazily* updated matrix at the moment the group
  starts (the reference reads the outer ``W``, which already holds the updates of earlier blocks but
  not those of earlier columns of the current block; with ``G = B = 128`` that is fully current).
  They use this package's eq. (1) (``groupwise.minmax_params``: min/max of the group, scale stored in
  fp16), not the reference's range widened to include 0, so that GPTQ with ``H = I`` is exactly RTN.
- Bilevel schemes: a second-level group holds one input-group column across ``G_q`` rows, so when a
  group starts all of its scales are known; they are second-level quantized right then
  (``bilevel.quantize_scales``) and the codes, and the error feedback, use ``s_hat``. The result is
  a ``QuantizedWeight`` whose ``dequantize()`` is exactly the ``w_hat`` the error feedback used.
- ``act_order`` (off by default): columns are processed by decreasing ``H_ii``. A group's columns are
  then scattered, and the packed format has no ``g_idx``, so the group parameters are the *static*
  ones (reference ``--static-groups``): eq. (1) on each original group of the (dead-zeroed) ``W``
  before any update.
- ``H`` counts tokens (``2/n`` with ``n`` the number of non-padding tokens); the reference counts
  sequences, which only rescales ``H`` and changes nothing (the dampening is relative).
- A Cholesky failure (H not positive definite) retries with 10x the dampening, up to 3 times, then
  raises a SpeedqError naming the layer; NaN/Inf in ``H`` raises at once (no dampening can fix it,
  and Cholesky reads one triangle only, so it could pass unnoticed).
- Sequential: block by block, each block's inputs are the outputs of the already-quantized previous
  block (reference ``llama_sequential``); inside a block "true sequential" (the reference's
  ``--true-sequential``, GPTQModel's default): linears that read the same tensor (q/k/v, gate/up) are
  quantized together, in forward order, each stage's Hessians measured on the block whose earlier
  stages are already quantized. Linears of a part outside its blocks (e.g. a vision merger) are
  calibrated afterwards with full-model forwards.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from speedq_core.adapter import FamilyAdapter
from speedq_core.calibration import (
    BlockInputs,
    calibration_batches,
    capture_block_inputs,
    component_units,
    forward_order,
    full_name,
    linear_stages,
    model_linear_inputs,
    relative_name,
    release_freed_memory,
    run_block,
    stream_linear_inputs,
)
from speedq_core.errors import SpeedqError
from speedq_core.hookspecs import hookimpl
from speedq_core.method import Method, QuantContext
from speedq_core.quant.bilevel import dequantize_scales, quantize_scales, to_storage_precision
from speedq_core.quant.groupwise import minmax_params
from speedq_core.quant.qlinear import QuantLinear
from speedq_core.quant.qweight import QuantizedWeight, quantize_weight, validate_shape
from speedq_core.quant.scheme import QuantScheme
from speedq_core.quant.swap import swap_linears


@dataclass(frozen=True)
class GPTQConfig:
    """``damp``: lambda as a fraction of mean(diag H); ``block_size``: lazy-batch width B;
    ``act_order``: process columns by decreasing H_ii (static groups); ``true_sequential``: see module doc."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    true_sequential: bool = True
    retries: int = 3

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> GPTQConfig:
        known = {k: options[k] for k in ("damp", "block_size", "act_order", "true_sequential") if k in options}
        return cls(**known)


class HessianAccumulator:
    """Streaming ``H = 2/n sum_t x_t x_t^T`` over token batches ``x`` ``(n_t, in)``; float32 sum."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.t(), x)
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.n, 1))

    def take_hessian(self) -> torch.Tensor:
        """:meth:`hessian` computed in place: the accumulator's buffer becomes H (no second copy)."""
        hessian, self.sum = self.sum.mul_(2.0 / max(self.n, 1)), None
        return hessian


def inverse_cholesky(hessian: torch.Tensor, damp: float, name: str, retries: int = 3) -> tuple[torch.Tensor, float]:
    """Upper ``U`` with ``U^T U = (H + lambda I)^-1`` and the lambda used; 10x lambda per failed try.

    ``hessian`` is damped in place (the diagonal is restored after a failed try), and its
    Cholesky factor is inverted and refactored in its own buffer, so one ``(in, in)`` matrix lives
    besides ``hessian``: the down projection of a 1B model has a 90 MiB Hessian, and the naive
    chain held six of them at once.
    """
    if not torch.isfinite(hessian).all():
        raise SpeedqError(
            f"the GPTQ Hessian of {name} holds NaN/Inf (its calibration inputs overflow): check the calibration "
            "data, or run the model in float32 for calibration"
        )
    base = float(hessian.diagonal().mean())
    lam = damp * base
    for attempt in range(retries + 1):
        lam = damp * (10 ** attempt) * base
        hessian.diagonal().add_(lam)
        lower, info = torch.linalg.cholesky_ex(hessian)
        hessian.diagonal().sub_(lam)
        if info == 0 and torch.isfinite(lower).all():
            # (L L^T)^-1 and its upper Cholesky factor, both written into L's buffer (LAPACK
            # potri/potrf work in place; torch keeps the pointer when out= is the input)
            torch.cholesky_inverse(lower, out=lower)
            torch.linalg.cholesky_ex(lower, upper=True, out=(lower, info))
            if info == 0 and torch.isfinite(lower).all():
                return lower, lam
    raise SpeedqError(
        f"GPTQ cannot invert the Hessian of {name} even with dampening {lam:.3g} after {retries} retries: "
        "add calibration samples or raise the damp option"
    )


def _column_params(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Stored scale and zero ``(out, n)`` of eq. (1) on ``w`` ``(out, n*G)`` plus the fields that store them."""
    scale, zero = minmax_params(w, scheme.bits, scheme.group_size)
    if scheme.bilevel:
        scale_q, scale2, min2 = quantize_scales(scale, scheme.scale_bits, scheme.scale_group_size)
        stored = dequantize_scales(scale_q, scale2, min2, scheme.scale_group_size)
        return stored, zero, {"scale_q": scale_q, "scale2": scale2, "min2": min2}
    stored = to_storage_precision(scale)
    return stored, zero, {"scale": stored}


def _assemble(fields: list[dict]) -> dict[str, torch.Tensor]:
    """Per-group field dicts (each ``(out, 1)`` / ``(1, out/G_q)``) -> the QuantizedWeight fields."""
    axis = {"scale": 1, "scale_q": 1, "scale2": 0, "min2": 0}
    return {key: torch.cat([f[key] for f in fields], dim=axis[key]) for key in fields[0]}


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, config: GPTQConfig = GPTQConfig(),
                  name: str = "linear", consume_hessian: bool = False) -> tuple[QuantizedWeight, dict[str, float]]:
    """GPTQ of ``weight`` ``(out, in)`` given ``hessian`` ``(in, in)`` (module docstring); returns the
    QuantizedWeight and stats (``loss`` = reference ``sum (w - w_hat)^2 / U_ii^2 / 2``, ``damp``).
    ``consume_hessian``: work in ``hessian`` itself (a float32 tensor the caller gives up) instead
    of a copy."""
    validate_shape(scheme, tuple(weight.shape))
    W = weight.detach().float().clone()
    out_features, columns = W.shape
    G, maxq = scheme.group_size, scheme.maxq
    H = hessian.detach().to(W.device, torch.float32)
    if not (consume_hessian and H.data_ptr() == hessian.data_ptr()):
        H = H.clone()
    del hessian  # a consumed Hessian now lives only in H, and is freed with it below
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = None
    static = None
    if config.act_order:
        static = _column_params(W, scheme)
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U, lam = inverse_cholesky(H, config.damp, name, config.retries)
    del H

    codes = torch.zeros(out_features, columns, dtype=torch.uint8, device=W.device)
    zeros = torch.zeros(out_features, columns // G, dtype=torch.uint8, device=W.device)
    fields: list[dict] = []
    loss = torch.zeros((), device=W.device)
    scale_col = zero_col = None
    for i1 in range(0, columns, config.block_size):
        i2 = min(i1 + config.block_size, columns)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                group = int(perm[col]) // G
                scale_col, zero_col = static[0][:, group], static[1][:, group].float()
            elif col % G == 0:
                stored, zero, stored_fields = _column_params(W[:, col:col + G], scheme)
                scale_col, zero_col = stored[:, 0], zero[:, 0].float()
                zeros[:, col // G] = zero[:, 0]
                fields.append(stored_fields)
            w = W1[:, i]
            q = torch.clamp(torch.round(w / scale_col) + zero_col, 0, maxq)
            w_hat = (q - zero_col) * scale_col
            codes[:, col] = q.to(torch.uint8)
            d = U1[i, i]
            err = (w - w_hat) / d
            loss += (err * err).sum() / 2
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
        zeros = static[1]
        stored_fields = static[2]
    else:
        stored_fields = _assemble(fields)
    qweight = QuantizedWeight(scheme=scheme, shape=(out_features, columns), q=codes.contiguous(),
                              zero=zeros.contiguous(), **stored_fields)
    return qweight, {"loss": float(loss), "damp": lam, "dead_columns": int(dead.sum())}


class GPTQ(Method):
    name = "gptq"
    description = "GPTQ (ICLR'23): Hessian-based error feedback, block by block on calibration data"
    default_schemes = {8: "w8g128", 4: "w4g128", 3: "w3g64", 2: "w2g16"}
    default_components = ("language",)
    needs_calibration = True

    def quantize(self, model: nn.Module, adapter: FamilyAdapter, ctx: QuantContext) -> dict[str, Any]:
        config = GPTQConfig.from_options(ctx.options)
        summary: dict[str, Any] = {}
        for part in forward_order(ctx.schemes):
            linears = adapter.linears(model, part)
            if not linears:
                continue
            start = time.perf_counter()
            batches = calibration_batches(ctx.calibration, adapter, part, self.name)
            stats = quantize_part(model, adapter, part, ctx.schemes[part], batches, config, ctx)
            summary[part] = {"scheme": ctx.schemes[part].name, "linears": len(stats), "layers": stats,
                             "seconds": time.perf_counter() - start}
        return summary


def _quantize_linears(model: nn.Module, names: list[str], hessians: dict[str, HessianAccumulator],
                      scheme: QuantScheme, config: GPTQConfig, stats: dict, ctx: QuantContext) -> None:
    """GPTQ (or RTN where no token reached the linear) of the named linears, swapped for QuantLinears."""
    def make(name: str, linear: nn.Linear) -> QuantLinear:
        acc = hessians[name]
        if acc.n == 0:
            ctx.log(f"gptq: {name} saw no calibration token: round-to-nearest")
            stats[name] = {"tokens": 0}
            return QuantLinear.from_linear(linear, quantize_weight(linear.weight.data, scheme))
        qweight, info = gptq_quantize(linear.weight.data, acc.take_hessian(), scheme, config, name,
                                      consume_hessian=True)
        stats[name] = {"tokens": acc.n, **info}
        return QuantLinear.from_linear(linear, qweight)

    swap_linears(model, names, make)


def quantize_part(model: nn.Module, adapter: FamilyAdapter, part: str, scheme: QuantScheme, batches: list,
                  config: GPTQConfig, ctx: QuantContext) -> dict[str, dict]:
    """GPTQ of every linear of ``part``, unit by unit (module docstring); returns per-linear stats."""
    remaining = set(adapter.linears(model, part))
    stats: dict[str, dict] = {}
    units = component_units(model, adapter, part)
    inputs: BlockInputs | None = capture_block_inputs(model, adapter, part, batches) if units else None
    for index, (path, unit) in enumerate(units):
        rels = [rel for name in sorted(remaining) if (rel := relative_name(path, name)) is not None]
        rels = [rel for _, rel in sorted((_module_index(unit, rel), rel) for rel in rels)]
        stages = linear_stages(unit, inputs.samples[0], rels) if config.true_sequential else [rels]
        for stage in stages:
            accs = {rel: HessianAccumulator(unit.get_submodule(rel).in_features) for rel in stage}
            stream_linear_inputs(unit, inputs, stage, lambda rel, x: accs[rel].add(x))
            names = [full_name(path, rel) for rel in stage]
            _quantize_linears(model, names, {full_name(path, r): a for r, a in accs.items()}, scheme, config, stats, ctx)
            remaining.difference_update(names)
            del accs
            release_freed_memory()  # the stage's Hessians and float copies, before the next stage
        inputs = inputs.replace_hidden(run_block(unit, inputs))
        ctx.log(f"gptq: {part} {index + 1}/{len(units)} {path}")
    if remaining:
        names = sorted(remaining)
        accs = {name: HessianAccumulator(model.get_submodule(name).in_features) for name in names}
        model_linear_inputs(model, batches, names, lambda name, x: accs[name].add(x))
        _quantize_linears(model, names, accs, scheme, config, stats, ctx)
        ctx.log(f"gptq: {part}: {len(names)} linears outside blocks")
    return stats


def _module_index(root: nn.Module, rel: str) -> int:
    """Registration order of submodule ``rel`` under ``root`` (stable order for linears never called)."""
    for i, (name, _) in enumerate(root.named_modules()):
        if name == rel:
            return i
    return -1


@hookimpl
def speedq_methods() -> list[Method]:
    return [GPTQ()]
