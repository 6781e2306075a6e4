"""Worker for the 2-process DeepSpeed test: trains a small MLP; argv: out_dir kill_at_step."""
import json
import sys
from pathlib import Path

import torch
from torch import nn

from speedq_core.training.loop import TrainConfig, train_deepspeed

out, kill_at = Path(sys.argv[1]), int(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def batch_at(step, rank, world):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 6, generator=g)
    return x, (x[:, :2].sum(-1, keepdim=True) * 0.5).tanh()


def loss_fn(m, batch):
    x, y = batch
    return (m(x) - y).pow(2).mean()


def die(step, loss):
    if step == kill_at:
        raise SystemExit(3)


cfg = TrainConfig(steps=30, lr=1e-2, checkpoint_dir=str(out / "ckpt"), checkpoint_every=5, resume=True)
losses = train_deepspeed(model, batch_at, loss_fn, cfg, on_step=die)
rank = torch.distributed.get_rank()
torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"rank{rank}.pt")
if rank == 0:
    (out / "losses.json").write_text(json.dumps(losses))
