"""SPEED-Q stage 2: train only the projector so the quantized ViT's features fit the float LLM.

The quantized ViT and the float (not quantized) LLM, embeddings and lm_head are frozen; the
projector's parameters are trained with the stage objective (official: answer CE with label
smoothing only; ``stage2_distill`` adds the KD term from the float teacher). Every other parameter
is left bit-identical.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn

from speedq_core.adapter import FamilyAdapter
from speedq_core.errors import SpeedqError
from speedq_core.training.loop import TrainConfig, train, train_deepspeed


@contextmanager
def only_trainable(model: nn.Module, params: list[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
    """Set ``requires_grad`` on ``params`` only, restoring every flag afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    chosen = {id(p) for p in params}
    for p, _ in flags:
        p.requires_grad_(id(p) in chosen)
    try:
        yield params
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def component_parameters(model: nn.Module, adapter: FamilyAdapter, parts: tuple[str, ...]) -> list[nn.Parameter]:
    """Parameters whose owner belongs to one of ``parts`` (components, ``embeddings``, ``lm_head``)."""
    seen, params = set(), []
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        if adapter.part_of(owner) in parts and id(param) not in seen:
            seen.add(id(param))
            params.append(param)
    return params


def run_training(model: nn.Module, params: list[nn.Parameter], batch_at: Callable, loss_fn: Callable,
                 cfg: TrainConfig, engine: str, ds_config: Any, desc: str) -> list[float]:
    """The plain loop or DeepSpeed over ``params`` only."""
    with only_trainable(model, params) as chosen:
        if engine == "deepspeed":
            return train_deepspeed(model, batch_at, loss_fn, cfg, chosen, ds_config=ds_config, desc=desc)
        if engine == "plain":
            return train(model, batch_at, loss_fn, cfg, chosen, desc=desc)
    raise SpeedqError(f"engine {engine!r} is unknown: use plain or deepspeed")


def train_projector(model: nn.Module, adapter: FamilyAdapter, batch_at: Callable, loss_fn: Callable,
                    cfg: TrainConfig, engine: str = "plain", ds_config: Any = None) -> dict[str, Any]:
    """Stage 2 in place; returns the loss curve's ends."""
    params = component_parameters(model, adapter, ("projector",))
    if not params:
        raise SpeedqError(f"the {adapter.name} adapter's projector has no parameters: skip stage 2 "
                          "(stages=1,3)")
    losses = run_training(model, params, batch_at, loss_fn, cfg, engine, ds_config, "speedq stage 2")
    return {"steps": cfg.steps, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "losses": losses}
