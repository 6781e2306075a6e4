"""SPEED-Q stage 1: block-wise AdaRound of the vision encoder (Nagel et al. 2020, as BRECQ runs it).

Per linear ``W`` ``(out, in)`` of a block, the grid is the round-to-nearest one: per-group min-max
scale and integer zero point (:func:`~speedq_core.quant.qweight.quantize_weight`), the scale replaced
by its stored value ``ŝ`` (fp16, or the bilevel ``s_hat`` — the scales are quantized first). Only the
rounding direction is learnt, through ``V`` ``(out, in)`` and the rectified sigmoid::

    h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1),   ζ = 1.1, γ = −0.1
    W̃    = ŝ · (clamp(⌊W/ŝ⌋ + h(V) + z, 0, 2^b − 1) − z)
    V₀   = −log((ζ − γ) / (frac(W/ŝ) − γ) − 1)          so that h(V₀) = W/ŝ − ⌊W/ŝ⌋

Block loss (BRECQ's ``lp_loss`` with p = 2 and its rounding regulariser)::

    L = mean_tokens ‖block_q(x_q) − block_fp(x_fp)‖²  +  λ · Σ_W Σ (1 − |2h(V) − 1|^β)

``‖·‖²`` sums over the hidden size, the mean runs over every token of the batch. The regulariser is
off for the first ``warmup`` fraction of the iterations, then ``β`` decays linearly from 20 to 2
(BRECQ's ``LinearTempDecay``); λ = 0.01, Adam with lr 1e-3 on ``V`` only. ``x_q`` are the block's
inputs in the model whose earlier blocks are already quantized; the target uses the inputs of the
float model, ``x_fp`` (BRECQ's ``asym=True``, what its ImageNet script runs) or, with
``target="quant_input"``, the quantized inputs (``block_fp(x_q)``). At the end each ``V`` is
hard-rounded (``h ≥ 0.5`` ⇔ ``V ≥ 0``), so the codes differ from round-to-nearest by at most ±1, and
the linear becomes a :class:`~speedq_core.quant.QuantLinear`. *Deviation* (``fallback``, on by
default): a block whose hard-rounded error on the calibration batches exceeds round-to-nearest's
keeps the RTN codes (with few iterations the annealing can end worse than RTN; BRECQ has no such
check).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from speedq_core.adapter import FamilyAdapter
from speedq_core.calibration import BlockInputs, capture_block_inputs, run_block
from speedq_core.errors import SchemeError
from speedq_core.quant import QuantLinear, QuantizedWeight, QuantScheme, find_linears, quantize_weight, swap_linears
from speedq_core.quant.groupwise import group_view
from speedq_core.quant.qweight import validate_shape

ZETA, GAMMA = 1.1, -0.1
TARGETS = ("fp", "quant_input")


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(frac: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = frac`` for ``frac`` in [0, 1): ``−log((ζ − γ)/(frac − γ) − 1)``."""
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)


@dataclass(frozen=True)
class AdaRoundConfig:
    iters: int = 20000
    lr: float = 1e-3
    weight: float = 0.01  # λ
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    target: str = "fp"
    seed: int = 42
    fallback: bool = True  # keep RTN codes for a block whose hard-rounded AdaRound error is higher

    def beta(self, it: int) -> float | None:
        """β at iteration ``it``, or None during the warm-up (no regulariser)."""
        start = self.warmup * self.iters
        if it < start:
            return None
        rel = (it - start) / max(1.0, self.iters - start)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - rel)


class AdaRoundLinear(nn.Module):
    """A linear whose rounding is learnt; ``mode`` is ``"soft"`` (h(V)), ``"hard"`` (h ≥ 0.5) or
    ``"rtn"`` (round to nearest, for comparison)."""

    def __init__(self, linear: nn.Linear, scheme: QuantScheme):
        super().__init__()
        weight = linear.weight.detach()
        self.rtn: QuantizedWeight = quantize_weight(weight, scheme)
        self.scheme, self.shape, self.mode = scheme, tuple(weight.shape), "soft"
        scale = self.rtn.scales().unsqueeze(-1)  # ŝ (out, in/G, 1)
        scaled = group_view(weight, scheme.group_size) / scale
        self.register_buffer("scale", scale)
        self.register_buffer("base", torch.floor(scaled))
        self.register_buffer("zero", self.rtn.zero.float().unsqueeze(-1))
        self.v = nn.Parameter(inverse_rectified_sigmoid(scaled - self.base))
        self.bias = linear.bias

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v) if self.mode == "soft" else (self.v >= 0).float()

    def weight_hat(self) -> torch.Tensor:
        """``W̃`` float32 ``(out, in)`` in the current mode."""
        if self.mode == "rtn":
            return self.rtn.dequantize()
        codes = torch.clamp(self.base + self.h() + self.zero, 0, self.scheme.maxq)
        return ((codes - self.zero) * self.scale).reshape(self.shape)

    def round_loss(self, beta: float) -> torch.Tensor:
        """``Σ (1 − |2h(V) − 1|^β)``."""
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_hat().to(x.dtype), bias)

    @torch.no_grad()
    def to_quantized_weight(self) -> QuantizedWeight:
        """The hard-rounded codes ``clamp(⌊W/ŝ⌋ + [V ≥ 0] + z, 0, 2^b − 1)`` on the RTN scales and zeros."""
        codes = torch.clamp(self.base + (self.v >= 0).float() + self.zero, 0, self.scheme.maxq)
        return dataclasses.replace(self.rtn, q=codes.reshape(self.shape).to(torch.uint8))


def block_error(block: nn.Module, inputs: BlockInputs, targets: list[torch.Tensor]) -> float:
    """``mean_tokens ‖block(x) − target‖²`` over every calibration batch."""
    total, count = 0.0, 0
    with torch.no_grad():
        for out, tgt in zip(run_block(block, inputs), targets):
            total += (out.float() - tgt.float()).pow(2).sum(-1).sum().item()
            count += out[..., 0].numel()
    return total / max(1, count)


def _set_mode(modules: dict[str, AdaRoundLinear], mode: str) -> None:
    for module in modules.values():
        module.mode = mode


def reconstruct_block(block: nn.Module, names: list[str], scheme: QuantScheme, inputs: BlockInputs,
                      targets: list[torch.Tensor], cfg: AdaRoundConfig) -> dict[str, Any]:
    """AdaRound the linears ``names`` (relative to ``block``) of one block in place; they end as QuantLinear.

    Returns the block errors of RTN, of the soft start and of the hard-rounded result.
    """
    ada: dict[str, AdaRoundLinear] = {}

    def make(name: str, linear: nn.Linear) -> AdaRoundLinear:
        ada[name] = AdaRoundLinear(linear, scheme)
        return ada[name]

    swap_linears(block, names, make)
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for module in ada.values():
        module.v.requires_grad_(True)
    _set_mode(ada, "rtn")
    rtn_error = block_error(block, inputs, targets)
    _set_mode(ada, "soft")
    opt = torch.optim.Adam([m.v for m in ada.values()], lr=cfg.lr)
    pick = random.Random(cfg.seed)
    with torch.enable_grad():
        for it in range(cfg.iters):
            k = pick.randrange(len(inputs))
            sample = inputs.samples[k]
            out = block(*sample.args, **sample.kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            loss = (out.float() - targets[k].float()).pow(2).sum(-1).mean()
            beta = cfg.beta(it)
            if beta is not None:
                loss = loss + cfg.weight * sum(m.round_loss(beta) for m in ada.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p, flag in frozen:
        p.requires_grad_(flag)
    _set_mode(ada, "hard")
    ada_error = block_error(block, inputs, targets)
    flipped = sum(int((m.to_quantized_weight().q != m.rtn.q).sum()) for m in ada.values())
    kept_rtn = cfg.fallback and ada_error > rtn_error
    for name, module in ada.items():
        parent, _, child = name.rpartition(".")
        qweight = module.rtn if kept_rtn else module.to_quantized_weight()
        setattr(block.get_submodule(parent), child, QuantLinear.from_qweight(qweight, module.bias))
    total = sum(m.v.numel() for m in ada.values())
    return {"rtn_error": rtn_error, "adaround_error": ada_error, "flipped_fraction": flipped / max(1, total),
            "kept_rtn": kept_rtn}


def check_shapes(linears: dict[str, nn.Linear], scheme: QuantScheme) -> None:
    """Raise SchemeError naming the first linear ``scheme`` cannot quantize."""
    for name, linear in linears.items():
        try:
            validate_shape(scheme, tuple(linear.weight.shape))
        except SchemeError as exc:
            raise SchemeError(f"{name}: {exc}") from None


def quantize_vision(model: nn.Module, adapter: FamilyAdapter, scheme: QuantScheme, batches: list,
                    cfg: AdaRoundConfig, log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Stage 1 on ``model``'s vision blocks, in place; linears of the vision component outside its
    blocks are rounded to nearest. Returns per-block errors."""
    if cfg.target not in TARGETS:
        raise SchemeError(f"adaround_target {cfg.target!r} is unknown: use one of {', '.join(TARGETS)}")
    linears = adapter.linears(model, "vision")
    check_shapes(linears, scheme)
    blocks = adapter.blocks(model, "vision")
    summary: dict[str, Any] = {"blocks": {}}
    if blocks:
        x_q = capture_block_inputs(model, adapter, "vision", batches)
        x_fp = x_q
        for path, block in blocks:
            names = [n[len(path) + 1:] for n in linears if n.startswith(path + ".")]
            fp_out = run_block(block, x_fp)
            targets = fp_out if cfg.target == "fp" else run_block(block, x_q)
            stats = reconstruct_block(block, names, scheme, x_q, targets, cfg)
            summary["blocks"][path] = stats
            log(f"stage 1: {path}: block error RTN {stats['rtn_error']:.4g}, AdaRound {stats['adaround_error']:.4g}"
                f"{' (kept RTN)' if stats['kept_rtn'] else ''} ({len(names)} linears)")
            x_q, x_fp = x_q.replace_hidden(run_block(block, x_q)), x_fp.replace_hidden(fp_out)
    rest = [n for n in find_linears(model) if n in linears]
    swap_linears(model, rest, lambda name, lin: QuantLinear.from_linear(lin, quantize_weight(lin.weight.data, scheme)))
    summary["rtn_linears"] = rest
    return summary
