"""Training loops: determinism, kill-and-resume equality, NaN policy, DeepSpeed with 2 processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from speedq_core.errors import SpeedqError
from speedq_core.training.loop import TrainConfig, load_ds_config, train

HERE = Path(__file__).parent


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def _batch_at(step, rank, world):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 6, generator=g)
    return x, (x[:, :2].sum(-1, keepdim=True) * 0.5).tanh()


def _mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


class _Kill(Exception):
    pass


def test_loss_goes_down_and_is_deterministic():
    cfg = TrainConfig(steps=60, lr=1e-2)
    a, b = _model(), _model()
    losses_a = train(a, _batch_at, _mse, cfg)
    losses_b = train(b, _batch_at, _mse, cfg)
    assert losses_a == losses_b
    assert sum(losses_a[-10:]) < 0.5 * sum(losses_a[:10])


def test_kill_and_resume_ends_with_the_same_weights(tmp_path):
    ref = _model()
    train(ref, _batch_at, _mse, TrainConfig(steps=30, lr=1e-2))
    cfg = TrainConfig(steps=30, lr=1e-2, checkpoint_dir=str(tmp_path), checkpoint_every=5, resume=True)
    model = _model()

    def die(step, loss):
        if step == 17:
            raise _Kill

    with pytest.raises(_Kill):
        train(model, _batch_at, _mse, cfg, on_step=die)
    assert (tmp_path / "latest").read_text() == "step-14.pt"
    resumed = _model()  # a fresh process: fresh model, state comes from the checkpoint
    train(resumed, _batch_at, _mse, cfg)
    for p, q in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_nan_steps_are_skipped_then_stop(recwarn):
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        loss = _mse(model, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    losses = train(_model(), _batch_at, sometimes_nan, TrainConfig(steps=6, lr=1e-2))
    assert len(losses) == 5 and any("skipped" in str(w.message) for w in recwarn)
    with pytest.raises(SpeedqError, match="3 non-finite losses in a row"):
        train(_model(), _batch_at, lambda m, b: _mse(m, b) * float("nan"),
              TrainConfig(steps=6, max_bad_steps=3))


def test_deepspeed_config_that_does_not_parse(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{zero: 2")
    with pytest.raises(SpeedqError, match="does not parse"):
        load_ds_config(bad, TrainConfig(steps=1))
    good = tmp_path / "ok.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert load_ds_config(good, TrainConfig(steps=1, lr=3e-4))["optimizer"]["params"]["lr"] == 3e-4


@pytest.mark.slow
def test_deepspeed_two_processes_zero2_identical_weights(tmp_path):
    """torchrun with 2 CPU processes (gloo, ZeRO-2): both ranks end with the same weights, the loss
    goes down, and a killed-then-resumed run ends where an uninterrupted one does."""
    script = HERE / "ds_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out, steps_to_kill):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29561", str(script), str(out), str(steps_to_kill)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)

    full = launch(tmp_path / "full", -1)
    assert full.returncode == 0, full.stderr[-3000:]
    w0 = torch.load(tmp_path / "full" / "rank0.pt")
    w1 = torch.load(tmp_path / "full" / "rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    losses = json.loads((tmp_path / "full" / "losses.json").read_text())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    killed = launch(tmp_path / "resumed", 12)
    assert killed.returncode != 0
    resumed = launch(tmp_path / "resumed", -1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    r0 = torch.load(tmp_path / "resumed" / "rank0.pt")
    assert all(torch.allclose(w0[k], r0[k], atol=1e-6) for k in w0)
