"""SPEED-Q tests share one tiny model build and one stage-1 run (copied per test)."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import context, tiny  # noqa: E402

from speedq_plugins.speedq.method import SpeedQProjector, SpeedQViT  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: one intra-op thread avoids oversubscription and keeps timings stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory):
    """(stages dir after stage 1, state_dict of the model after stage 1)."""
    out = tmp_path_factory.mktemp("stage1") / "stages"
    adapter, model, _ = tiny()
    SpeedQViT().quantize(model, adapter, context(out))
    return out, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def stage2_run(stage1_run, tmp_path_factory):
    """(stages dir after stages 1 and 2, state_dict of the model after stage 2)."""
    out = tmp_path_factory.mktemp("stage2") / "stages"
    shutil.copytree(stage1_run[0], out)
    adapter, model, _ = tiny()
    SpeedQProjector().quantize(model, adapter, context(out))
    return out, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def stages_from_stage1(stage1_run, tmp_path):
    out = tmp_path / "stages"
    shutil.copytree(stage1_run[0], out)
    return out


@pytest.fixture
def stages_from_stage2(stage2_run, tmp_path):
    out = tmp_path / "stages"
    shutil.copytree(stage2_run[0], out)
    return out
