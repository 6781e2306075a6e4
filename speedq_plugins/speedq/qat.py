"""SPEED-Q stage 3: asymmetric clipping, then quantization-aware training with self-distillation.

1. Clipping (paper eq. 4, :func:`speedq_core.quant.search_clip`): per linear to be quantized, a
   lower and an upper bound per group, searched on that linear's calibration inputs. Blocks are
   streamed (:mod:`speedq_core.calibration`); every block's inputs come from the float model (the
   bounds are applied only after the search, as AWQ's ``run_awq`` computes the next block's
   inputs before searching). Linears outside blocks (projector, lm_head) get theirs from full
   forwards. At most ``clip_tokens`` tokens per linear are kept, strided over the batches.
2. Each such linear becomes a :class:`~speedq_core.quant.FakeQuantLinear` with the clipped weight
   (official: scales and zeros recomputed at every forward, masked straight-through gradient).
3. Training of the chosen parameters with the stage objective (:mod:`.objective`).
4. Every FakeQuantLinear is frozen into a QuantLinear through ``to_quantized_weight()``, so the export
   computes exactly what training evaluated.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from speedq_core.adapter import FamilyAdapter
from speedq_core.calibration import capture_block_inputs, model_linear_inputs, stream_linear_inputs
from speedq_core.quant import FakeQuantLinear, QuantScheme, search_clip, swap_linears, to_quant_linears
from speedq_core.training.loop import TrainConfig
from speedq_plugins.speedq.adaround import check_shapes
from speedq_plugins.speedq.projector import run_training

Bounds = dict[str, tuple[torch.Tensor, torch.Tensor]]


class _TokenSink:
    """Keeps up to ``budget`` rows of each linear's inputs, an even share per batch, strided."""

    def __init__(self, budget: int, n_batches: int):
        self.per_batch = max(1, budget // max(1, n_batches))
        self.rows: dict[str, list[torch.Tensor]] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        step = max(1, x.shape[0] // self.per_batch)
        self.rows.setdefault(name, []).append(x[::step][: self.per_batch].detach().float())

    def pop(self, name: str) -> torch.Tensor:
        return torch.cat(self.rows.pop(name))


@torch.no_grad()
def search_clipping(model: nn.Module, adapter: FamilyAdapter, targets: dict[str, QuantScheme], batches: list,
                    n_grid: int = 20, max_shrink: float = 0.5, tokens: int = 512) -> Bounds:
    """``{name: (clip_min, clip_max)}`` for every linear in ``targets`` (full names)."""
    bounds: Bounds = {}
    remaining = dict(targets)
    for part in ("vision", "language"):
        blocks = adapter.blocks(model, part)
        if not blocks or not any(adapter.part_of(n) == part for n in remaining):
            continue
        inputs = capture_block_inputs(model, adapter, part, batches)
        for path, block in blocks:
            names = {n[len(path) + 1:]: n for n in remaining if n.startswith(path + ".")}
            sink = _TokenSink(tokens, len(inputs))
            outputs = stream_linear_inputs(block, inputs, list(names), sink)
            for rel, full in names.items():
                weight = block.get_submodule(rel).weight
                bounds[full] = search_clip(weight, sink.pop(rel), remaining.pop(full), n_grid, max_shrink, tokens)
            inputs = inputs.replace_hidden(outputs)
    if remaining:
        sink = _TokenSink(tokens, len(batches))
        model_linear_inputs(model, batches, list(remaining), sink)
        for name, scheme in remaining.items():
            weight = model.get_submodule(name).weight
            bounds[name] = search_clip(weight, sink.pop(name), scheme, n_grid, max_shrink, tokens)
    return bounds


def fake_quantize(model: nn.Module, targets: dict[str, QuantScheme], bounds: Bounds) -> list[str]:
    """Swap each target linear for a FakeQuantLinear, baking in its clip bounds (if any)."""
    for name, scheme in targets.items():
        check_shapes({name: model.get_submodule(name)}, scheme)

    def make(name: str, linear: nn.Linear) -> FakeQuantLinear:
        lo, hi = bounds.get(name, (None, None))
        return FakeQuantLinear.from_linear(linear, targets[name], clip_min=lo, clip_max=hi)

    return swap_linears(model, list(targets), make)


def run_qat(model: nn.Module, targets: dict[str, QuantScheme], params: list[nn.Parameter], batch_at: Callable,
            loss_fn: Callable, cfg: TrainConfig, engine: str = "plain", ds_config: Any = None) -> dict[str, Any]:
    """Train ``params`` with the ``targets`` already fake-quantized; then freeze them into QuantLinear."""
    losses = run_training(model, params, batch_at, loss_fn, cfg, engine, ds_config, "speedq QAT")
    frozen = to_quant_linears(model)
    return {"steps": cfg.steps, "quantized_linears": len(frozen), "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "losses": losses}
