"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
MLSys 2024), following the reference mit-han-lab/llm-awq (``awq/quantize/auto_scale.py``,
``auto_clip.py``, ``pre_quant.py``).

Per block, with every input captured once from the float block:

1. Scale search, per ScalingGroup ``(prev, linears, inspect)`` of the adapter. ``x`` is the group's
   linear input (non-padding tokens), ``x_mean = mean_t |x|`` per input channel, and for
   ``alpha`` in ``{0, 1/20, ..., 19/20}``::

       s = clamp(x_mean^alpha, min=1e-4);   s = s / sqrt(max(s) * min(s))
       W_j <- Q(W_j * s) / s  for every linear j of the group      (Q = the scheme's quantizer)
       loss(alpha) = sum_t w_t * || inspect(x)_t - inspect_float(x)_t ||^2

   with ``w_t`` = 1 on non-padding tokens (MBQ changes only ``w_t``, see baselines/mbq.py). The best
   ``s`` is folded in: ``prev`` output channels divided by ``s`` (norm weight and bias, or the last
   ``len(s)`` output rows and bias of a preceding linear) and the linears' input columns multiplied
   by ``s``, which leaves the float function unchanged. As the reference, every group is searched on
   the float block (other groups unscaled) and the scales are applied after all searches; the cached
   linear inputs are divided by ``s``.
2. Clipping search (``clip``): ``"awq"`` (default, the reference ``auto_clip``): per group of ``G``
   weights of a row, a symmetric bound ``max|w| * (1 - i/20)``, ``i < 10``, minimising
   ``mean_t (sum_{k in g} x_tk (Q(clip(w)) - w)_k)^2`` on ~512 evenly strided tokens, skipped for the
   query/key projections (their output feeds ``q k^T``; reference rule on the leaf names ``q_*``,
   ``k_*``, ``query``, ``key``, ``Wqkv``, plus fused ``qkv``); ``"asymmetric"``: the package's
   independent lower/upper search (``speedq_core.quant.clipping``); ``"none"``.
3. Quantize every linear with the scheme (``quantize_weight`` of the clipped, scaled weight) into a
   QuantLinear.

Deviations, documented: the scale search quantizes with the scheme's own quantizer (fp16 scales, bilevel
``s_hat`` when the scheme has a second level) instead of the reference's float ``pseudo_quantize``,
so it scores exactly what is stored; the clip search uses single-level float scales (as the
reference and the package's clipping search). Padding tokens are excluded from every statistic.
The next block's inputs are the *float* block's outputs (``propagate="float"``, the reference
``run_awq``); ``propagate="quantized"`` feeds the quantized block's outputs instead. Units without
scaling groups (a projector, lm_head) and linears outside any block get only steps 2 and 3.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from speedq_core.adapter import FamilyAdapter, ScalingGroup
from speedq_core.calibration import (
    BlockInputs,
    BlockSample,
    calibration_batches,
    capture_block_inputs,
    component_units,
    forward_order,
    full_name,
    linear_input_hooks,
    model_linear_inputs,
    relative_name,
    run_block,
    select_tokens,
)
from speedq_core.errors import SpeedqError
from speedq_core.hookspecs import hookimpl
from speedq_core.method import Method, QuantContext
from speedq_core.quant.clipping import search_clip
from speedq_core.quant.groupwise import dequantize_groupwise, group_view, quantize_groupwise
from speedq_core.quant.qlinear import QuantLinear
from speedq_core.quant.qweight import quantize_weight
from speedq_core.quant.scheme import QuantScheme
from speedq_core.quant.swap import swap_linears

CLIP_MODES = ("awq", "asymmetric", "none")
NO_CLIP_PREFIXES = ("q_", "k_")
NO_CLIP_NAMES = ("query", "key", "wqkv", "qkv")

# weights(sample, output) -> per-token weights laid out as output[..., 0], or None for "every token, weight 1"
TokenWeights = Callable[[BlockSample, torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class AWQConfig:
    n_grid: int = 20
    clip: str = "awq"
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    propagate: str = "float"

    def __post_init__(self) -> None:
        if self.clip not in CLIP_MODES:
            raise SpeedqError(f"clip={self.clip!r} is not known: use one of {', '.join(CLIP_MODES)}")
        if self.propagate not in ("float", "quantized"):
            raise SpeedqError(f"propagate={self.propagate!r} is not known: use float or quantized")

    @classmethod
    def from_options(cls, options: dict[str, Any], **defaults: Any) -> AWQConfig:
        fields = ("n_grid", "clip", "clip_grid", "max_shrink", "clip_tokens", "propagate")
        return cls(**{**defaults, **{k: options[k] for k in fields if k in options}})


def valid_tokens(sample: BlockSample, output: torch.Tensor) -> torch.Tensor | None:
    """AWQ's token weights: 1 on non-padding tokens (None: no mask, every token counts)."""
    mask = sample.token_mask("valid", output.shape)
    return None if mask is None else mask.float()


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def weighted_error(reference: torch.Tensor, output: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``sum_t w_t ||output_t - reference_t||^2`` (float32) over the tokens of ``(..., D)`` outputs."""
    err = (output.float() - reference.float()).pow(2).sum(dim=-1)
    return err.sum() if weights is None else (err * weights).sum()


@dataclass
class GroupCapture:
    """What one ScalingGroup's search needs, per sample: the inspect module's call and float output."""

    calls: list[tuple[tuple, dict]]
    outputs: list[torch.Tensor]


def should_clip(rel: str) -> bool:
    leaf = rel.rsplit(".", 1)[-1].lower()
    return not (leaf.startswith(NO_CLIP_PREFIXES) or leaf in NO_CLIP_NAMES)


# ---- step 1: scales ---------------------------------------------------------------------------------
def scale_candidates(x_mean: torch.Tensor, n_grid: int) -> list[torch.Tensor]:
    """``s(alpha)`` for ``alpha = k / n_grid``, ``k < n_grid`` (reference normalisation)."""
    out = []
    for k in range(n_grid):
        s = x_mean.pow(k / n_grid).clamp(min=1e-4)
        out.append(s / (s.max() * s.min()).sqrt())
    return out


@torch.no_grad()
def group_loss(inspect: nn.Module, linears: list[nn.Linear], capture: GroupCapture, samples: list[BlockSample],
               scales: torch.Tensor, scheme: QuantScheme, weights: TokenWeights = valid_tokens) -> float:
    """``sum_t w_t ||inspect(x; Q(W s)/s)_t - inspect_float(x)_t||^2`` over all samples; weights restored after."""
    originals = [linear.weight.data for linear in linears]
    try:
        for linear, w in zip(linears, originals):
            linear.weight.data = (quantize_weight(w.float() * scales, scheme).dequantize() / scales).to(w.dtype)
        return sum(float(weighted_error(ref, _first(inspect(*args, **kwargs)), weights(sample, ref)))
                   for (args, kwargs), ref, sample in zip(capture.calls, capture.outputs, samples))
    finally:
        for linear, w in zip(linears, originals):
            linear.weight.data = w


def search_scale(inspect: nn.Module, linears: list[nn.Linear], capture: GroupCapture, samples: list[BlockSample],
                 x: torch.Tensor, scheme: QuantScheme, n_grid: int = 20,
                 weights: TokenWeights = valid_tokens) -> tuple[torch.Tensor, dict[str, Any]]:
    """The best ``s`` ``(in,)`` for the group and ``{"ratio", "loss", "history"}`` (module docstring, step 1)."""
    best_loss, best_k, best_s, history = float("inf"), -1, None, []
    for k, s in enumerate(scale_candidates(x.abs().float().mean(0), n_grid)):
        loss = group_loss(inspect, linears, capture, samples, s, scheme, weights)
        history.append(loss)
        if loss < best_loss:
            best_loss, best_k, best_s = loss, k, s
    if best_s is None:
        raise SpeedqError(f"the AWQ scale search found no finite loss (history {history}): the calibration "
                          "inputs of this block hold NaN/Inf")
    return best_s, {"ratio": best_k / n_grid, "loss": best_loss, "history": history}


@torch.no_grad()
def apply_scale(block: nn.Module, group: ScalingGroup, scales: torch.Tensor) -> None:
    """Fold ``s`` into the group: ``prev`` outputs / s, the linears' input columns * s (float function kept)."""
    prev = block.get_submodule(group.prev)
    n = scales.numel()
    if isinstance(prev, nn.Linear):
        prev.weight[-n:].div_(scales.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias[-n:].div_(scales.to(prev.bias.dtype))
    elif isinstance(getattr(prev, "weight", None), torch.Tensor) and prev.weight.shape == (n,):
        prev.weight.div_(scales.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(scales.to(prev.bias.dtype))
    else:
        raise SpeedqError(f"cannot fold AWQ scales into {group.prev!r} ({type(prev).__name__}): the scaling group's "
                          "prev must be a linear or a norm with a per-channel weight; fix the family adapter")
    for rel in group.linears:
        linear = block.get_submodule(rel)
        linear.weight.mul_(scales.view(1, -1).to(linear.weight.dtype))


# ---- step 2: clipping ---------------------------------------------------------------------------------
@torch.no_grad()
def awq_clip(weight: torch.Tensor, x: torch.Tensor, scheme: QuantScheme, n_grid: int = 20, max_shrink: float = 0.5,
             n_tokens: int = 512, rows_per_chunk: int = 256) -> torch.Tensor:
    """Reference ``auto_clip_layer``: the best symmetric bound ``max_val`` ``(out, in/G)`` (step 2)."""
    G = scheme.group_size
    x = x.reshape(-1, x.shape[-1]).float()
    xg = group_view(x[:: max(1, x.shape[0] // n_tokens)], G)
    best_all = []
    for rows in weight.float().split(rows_per_chunk):
        wg = group_view(rows, G)
        org_max = wg.abs().amax(dim=-1)
        org_out = torch.einsum("tgk,rgk->rtg", xg, wg)
        best, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            q, s, z = quantize_groupwise(rows, scheme.bits, G, -max_val, max_val)
            cur = torch.einsum("tgk,rgk->rtg", xg, group_view(dequantize_groupwise(q, s, z, G), G))
            err = (cur - org_out).pow(2).mean(dim=1)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, max_val, best)
        best_all.append(best)
    return torch.cat(best_all)


def clip_bounds(rel: str, weight: torch.Tensor, x: torch.Tensor | None, scheme: QuantScheme,
                config: AWQConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if config.clip == "none" or x is None or x.numel() == 0 or not should_clip(rel):
        return None, None
    if config.clip == "asymmetric":
        return search_clip(weight, x, scheme, n_grid=config.clip_grid, max_shrink=config.max_shrink,
                           n_tokens=config.clip_tokens)
    max_val = awq_clip(weight, x, scheme, config.clip_grid, config.max_shrink, config.clip_tokens)
    return -max_val, max_val


# ---- the method ---------------------------------------------------------------------------------------
class AWQ(Method):
    name = "awq"
    description = "AWQ (MLSys'24): activation-aware per-channel scaling + clipping search, then RTN"
    default_schemes = {8: "w8g128", 4: "w4g128", 3: "w3g64", 2: "w2g16"}
    default_components = ("language",)
    needs_calibration = True
    config_defaults: dict[str, Any] = {}

    def quantize(self, model: nn.Module, adapter: FamilyAdapter, ctx: QuantContext) -> dict[str, Any]:
        config = AWQConfig.from_options(ctx.options, **self.config_defaults)
        summary: dict[str, Any] = {}
        for part in forward_order(ctx.schemes):
            if not adapter.linears(model, part):
                continue
            start = time.perf_counter()
            batches = calibration_batches(ctx.calibration, adapter, part, self.name)
            stats = self.quantize_part(model, adapter, part, ctx.schemes[part], batches, config, ctx)
            summary[part] = {"scheme": ctx.schemes[part].name, "linears": len(stats["linears"]), **stats,
                             "seconds": time.perf_counter() - start}
        return summary

    # MBQ overrides these two.
    def prepare(self, model: nn.Module, adapter: FamilyAdapter, part: str, batches: list, ctx: QuantContext) -> dict:
        """State computed once per part before the blocks (MBQ: modality sensitivities); its ``"summary"``
        entry goes into the part's summary."""
        return {}

    def token_weights(self, state: dict, unit_index: int, group: ScalingGroup) -> TokenWeights:
        return valid_tokens

    def quantize_part(self, model: nn.Module, adapter: FamilyAdapter, part: str, scheme: QuantScheme, batches: list,
                      config: AWQConfig, ctx: QuantContext) -> dict[str, Any]:
        remaining = set(adapter.linears(model, part))
        units = component_units(model, adapter, part)
        groups = adapter.scaling_groups(part) if adapter.blocks(model, part) else []
        state = self.prepare(model, adapter, part, batches, ctx)
        stats: dict[str, Any] = {"groups": {}, "linears": {}, **state.get("summary", {})}
        inputs = capture_block_inputs(model, adapter, part, batches) if units else None
        for index, (path, unit) in enumerate(units):
            rels = [rel for name in sorted(remaining) if (rel := relative_name(path, name)) is not None]
            outputs, xs = self.scale_unit(unit, path, index, inputs, rels, groups, scheme, config, state, stats)
            names = [full_name(path, rel) for rel in rels]
            self.finish_linears(model, names, {full_name(path, rel): x for rel, x in xs.items()}, scheme, config, stats)
            if config.propagate == "quantized":
                outputs = run_block(model.get_submodule(path), inputs)
            inputs = inputs.replace_hidden(outputs)
            remaining.difference_update(names)
            ctx.log(f"{self.name}: {part} {index + 1}/{len(units)} {path}")
        if remaining:
            names = sorted(remaining)
            feats: dict[str, list[torch.Tensor]] = {name: [] for name in names}
            model_linear_inputs(model, batches, names, lambda name, x: feats[name].append(x.detach()))
            xs = {name: torch.cat(v) for name, v in feats.items() if v}
            self.finish_linears(model, names, xs, scheme, config, stats)
            ctx.log(f"{self.name}: {part}: {len(names)} linears outside blocks")
        return stats

    @torch.no_grad()
    def scale_unit(self, unit: nn.Module, path: str, index: int, inputs: BlockInputs, rels: list[str],
                   groups: list[ScalingGroup], scheme: QuantScheme, config: AWQConfig, state: dict,
                   stats: dict) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Step 1 on one unit: returns its float outputs (before any change) and the linears' inputs
        ``(tokens, in)``, divided by the scales folded into them."""
        captures = {g.inspect: GroupCapture([], []) for g in groups}
        feats: dict[str, list[torch.Tensor]] = {rel: [] for rel in rels}
        outputs = []
        for sample in inputs:
            handles = []
            for inspect, capture in captures.items():
                module = unit.get_submodule(inspect)
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, c=capture: c.calls.append((a, k)), with_kwargs=True))
                handles.append(module.register_forward_hook(
                    lambda m, a, o, c=capture: c.outputs.append(_first(o).detach())))
            try:
                with linear_input_hooks(unit, rels, lambda rel, x: feats[rel].append(select_tokens(x, sample).detach())):
                    outputs.append(_first(unit(*sample.args, **sample.kwargs)))
            finally:
                for handle in handles:
                    handle.remove()
        xs = {rel: torch.cat(v) for rel, v in feats.items() if v}
        for group in groups:
            missing = [rel for rel in group.linears if rel not in xs]
            if missing:
                raise SpeedqError(f"scaling group {group} of {path}: {missing[0]!r} is not a linear of this block "
                                  "that the forward reaches; fix the family adapter's scaling_groups")
            linears = [unit.get_submodule(rel) for rel in group.linears]
            scales, info = search_scale(unit.get_submodule(group.inspect), linears, captures[group.inspect],
                                        inputs.samples, xs[group.linears[0]], scheme, config.n_grid,
                                        self.token_weights(state, index, group))
            stats["groups"][f"{path}.{group.prev}->{','.join(group.linears)}"] = {
                "ratio": info["ratio"], "loss": info["loss"]}
            apply_scale(unit, group, scales)
            for rel in group.linears:
                xs[rel] = xs[rel] / scales.to(xs[rel].dtype)
        return outputs, xs

    def finish_linears(self, model: nn.Module, names: list[str], xs: dict[str, torch.Tensor],
                       scheme: QuantScheme, config: AWQConfig, stats: dict) -> None:
        """Steps 2-3: clip and quantize the named linears of ``model`` into QuantLinears."""
        def make(name: str, linear: nn.Linear) -> QuantLinear:
            clip_min, clip_max = clip_bounds(name, linear.weight.data, xs.get(name), scheme, config)
            stats["linears"][name] = {"clipped": clip_min is not None,
                                      "tokens": int(xs[name].shape[0]) if name in xs else 0}
            return QuantLinear.from_linear(linear, quantize_weight(linear.weight.data, scheme, clip_min, clip_max))

        swap_linears(model, names, make)


@hookimpl
def speedq_methods() -> list[Method]:
    return [AWQ()]
