"""Training loops: a plain single-process loop and a DeepSpeed one, sharing one step driver.

Data order is a function of the step (``batch_at(step, rank, world)``), so a resumed run sees the
same batches as an uninterrupted one. Each step: loss = loss_fn(model, batch); backward; optimizer
step. A non-finite loss skips the step with a warning; ``max_bad_steps`` in a row stop training.
Checkpoints are written every ``checkpoint_every`` steps, atomically; ``resume=True`` continues from
the newest one.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from speedq_core.errors import CheckpointError, SpeedqError

BatchAt = Callable[[int, int, int], Any]  # (step, rank, world_size) -> batch
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" or "cosine" (after warmup)
    grad_clip: float | None = 1.0
    seed: int = 42
    max_bad_steps: int = 5
    betas: tuple[float, float] = (0.9, 0.999)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then constant or cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))
    return cfg.lr


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Driver:
    """The part of a training loop both backends share: LR schedule, NaN policy, progress, logging."""

    def __init__(self, cfg: TrainConfig, desc: str, on_step: Callable[[int, float], None] | None):
        self.cfg, self.desc, self.on_step = cfg, desc, on_step
        self.losses: list[float] = []
        self.bad = 0

    def finite(self, step: int, loss: torch.Tensor) -> bool:
        if torch.isfinite(loss).all():
            self.bad = 0
            return True
        self.bad += 1
        warnings.warn(f"{self.desc}: step {step} loss is {loss.item()}, step skipped")
        if self.bad >= self.cfg.max_bad_steps:
            raise SpeedqError(
                f"{self.desc}: {self.bad} non-finite losses in a row at step {step}: lower the "
                f"learning rate or check the data"
            )
        return False

    def record(self, step: int, loss: float, bar: tqdm) -> None:
        self.losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if self.on_step is not None:
            self.on_step(step, loss)

    def due(self, step: int) -> bool:
        every = self.cfg.checkpoint_every
        return bool(self.cfg.checkpoint_dir and every and (step + 1) % every == 0)


def _trainable(model: nn.Module, params: Iterable[nn.Parameter] | None, desc: str) -> list[nn.Parameter]:
    chosen = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not chosen:
        raise SpeedqError(f"{desc}: no trainable parameters: check which components are frozen")
    return chosen


# -- plain single-process loop ---------------------------------------------------------------


def _save_plain(ckpt_dir: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                losses: list[float]) -> None:
    """Write step-N.pt via a temp file, then point ``latest`` at it (both atomic renames)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": {k: v for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "losses": losses,
        "rng": (random.getstate(), np.random.get_state(), torch.get_rng_state()),
    }
    fd, tmp = tempfile.mkstemp(dir=ckpt_dir, suffix=".tmp")
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, ckpt_dir / f"step-{step}.pt")
    _write_latest(ckpt_dir, f"step-{step}.pt")


def _write_latest(ckpt_dir: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=ckpt_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(name)
    os.replace(tmp, ckpt_dir / "latest")


def _load_plain(ckpt_dir: Path, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[float]]:
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return 0, []
    path = ckpt_dir / latest.read_text().strip()
    try:
        state = torch.load(path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except Exception as exc:
        raise CheckpointError(f"cannot resume from {path} ({exc}): delete {ckpt_dir} to start over") from None
    random.setstate(state["rng"][0])
    np.random.set_state(state["rng"][1])
    torch.set_rng_state(state["rng"][2])
    return state["step"] + 1, list(state["losses"])


def train(
    model: nn.Module,
    batch_at: BatchAt,
    loss_fn: LossFn,
    cfg: TrainConfig,
    params: Iterable[nn.Parameter] | None = None,
    desc: str = "train",
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``params`` (default: every parameter with requires_grad) in this process."""
    seed_everything(cfg.seed)
    chosen = _trainable(model, params, desc)
    opt = torch.optim.AdamW(chosen, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    driver = _Driver(cfg, desc, on_step)
    start = 0
    if cfg.resume and cfg.checkpoint_dir:
        start, driver.losses = _load_plain(Path(cfg.checkpoint_dir), model, opt)
    model.train()
    with torch.enable_grad(), tqdm(total=cfg.steps, initial=start, desc=desc, leave=False) as bar:
        for step in range(start, cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = loss_fn(model, batch_at(step, 0, 1))
            opt.zero_grad(set_to_none=True)
            if driver.finite(step, loss):
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(chosen, cfg.grad_clip)
                opt.step()
                driver.record(step, loss.item(), bar)
            if driver.due(step):
                _save_plain(Path(cfg.checkpoint_dir), step, model, opt, driver.losses)
    model.eval()
    return driver.losses


# -- DeepSpeed -------------------------------------------------------------------------------


def load_ds_config(source: str | Path | dict | None, cfg: TrainConfig, micro_batch: int = 1) -> dict:
    """A DeepSpeed config: the user's JSON (path or dict) with speedq's optimizer defaults filled in.

    Defaults: ZeRO-2, AdamW with cfg.lr / weight decay, gradient clipping, bf16 only where a GPU
    supports it. Keys the user set win.
    """
    user: dict = {}
    if isinstance(source, dict):
        user = dict(source)
    elif source:
        try:
            user = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SpeedqError(f"DeepSpeed config {source} does not parse ({exc}): pass a JSON file") from None
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                  "betas": list(cfg.betas)}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    if cfg.grad_clip:
        config["gradient_clipping"] = cfg.grad_clip
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        config["bf16"] = {"enabled": True}
    config.update(user)
    return config


def train_deepspeed(
    model: nn.Module,
    batch_at: BatchAt,
    loss_fn: LossFn,
    cfg: TrainConfig,
    params: Iterable[nn.Parameter] | None = None,
    ds_config: str | Path | dict | None = None,
    desc: str = "train",
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train with ``deepspeed.initialize`` (data parallel over the launched processes).

    Launch with ``deepspeed`` or ``torchrun``; a single plain process also works (world size 1).
    Rank r at step t trains on ``batch_at(t, r, world)``. Checkpoints: DeepSpeed's own
    ``save_checkpoint`` under checkpoint_dir/step-N (its ``latest`` file is written last).
    """
    import deepspeed
    import torch.distributed as dist

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    seed_everything(cfg.seed)
    chosen = _trainable(model, params, desc)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=chosen,
                                           config=load_ds_config(ds_config, cfg))
    rank, world = dist.get_rank(), dist.get_world_size()
    driver = _Driver(cfg, desc, on_step)
    start = 0
    if cfg.resume and cfg.checkpoint_dir and (Path(cfg.checkpoint_dir) / "latest").exists():
        path, client = engine.load_checkpoint(cfg.checkpoint_dir)
        if path is None:
            raise CheckpointError(f"cannot resume from {cfg.checkpoint_dir}: delete it to start over")
        start, driver.losses = client["step"] + 1, list(client["losses"])
    engine.train()
    with torch.enable_grad(), tqdm(total=cfg.steps, initial=start, desc=desc, leave=False,
                                   disable=rank != 0) as bar:
        for step in range(start, cfg.steps):
            for group in engine.optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = loss_fn(engine.module, batch_at(step, rank, world))
            ok = torch.tensor(float(torch.isfinite(loss).all()))
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank skips together
            if driver.finite(step, loss if ok.item() else torch.tensor(float("nan"))):
                engine.backward(loss)
                engine.step()
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                driver.record(step, mean.item() / world, bar)
            if driver.due(step):
                engine.save_checkpoint(cfg.checkpoint_dir, tag=f"step-{step}",
                                       client_state={"step": step, "losses": driver.losses})
    engine.eval()
    return driver.losses


def clear_checkpoints(ckpt_dir: str | Path) -> None:
    """Remove a finished run's training checkpoints (they can be large)."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)
