"""Stages 2 and 3 on the tiny InternVL: what each trains and leaves alone, and stage-alone == together."""
import pytest
import torch
from helpers import SCHEME, context, samples, tiny
from torch import nn

from speedq_core.export import load_quantized
from speedq_core.plugins import get_plugins
from speedq_core.quant import QuantLinear
from speedq_plugins.speedq.method import SpeedQ, SpeedQProjector, SpeedQQAT, SpeedQViT, stage_id


def _part(adapter, key):
    return adapter.part_of(key.rsplit(".", 1)[0])


def _changed(before, after):
    assert before.keys() == after.keys()
    return {k for k in after if not torch.equal(before[k], after[k])}


def test_methods_are_registered_with_official_defaults():
    methods = get_plugins().methods
    for name in ("speedq", "speedq-vit", "speedq-projector", "speedq-qat"):
        assert name in methods
    speedq = methods["speedq"].obj
    assert speedq.scheme_for_bits(4) == "w4g32g128" and speedq.scheme_for_bits(2) == "w2g16g16"
    assert speedq.default_components == ("vision", "language")


def test_stage1_quantizes_only_the_vit(stage1_run):
    out, state = stage1_run
    adapter, model, _ = tiny()
    float_state = model.state_dict()
    for name in adapter.linears(model, "vision"):
        assert f"{name}.codes" in state and f"{name}.weight" not in state
    assert all(_part(adapter, k) == "vision" for k in _changed(
        {k: v for k, v in float_state.items() if k in state}, {k: v for k, v in state.items() if k in float_state}))
    assert (out / "stage1" / "quant_config.json").is_file() and (out / "options.json").is_file()


def test_stage2_changes_only_projector_parameters(stage1_run, stages_from_stage1):
    adapter, model, _ = tiny()
    summary = SpeedQProjector().quantize(model, adapter, context(stages_from_stage1))
    after = model.state_dict()
    changed = _changed(stage1_run[1], after)
    projector = {k for k in after if _part(adapter, k) == "projector"}
    assert changed == projector  # every projector tensor trained, every other one bit-identical
    assert summary["stages"]["stage2"]["loss"] == "task" and summary["stages"]["stage2"]["gamma"] is None
    assert "reused" in summary["stages"]["stage1"]


def test_stage3_quantizes_llm_keeps_vit_and_exports_exactly(stage2_run, stages_from_stage2):
    adapter, model, processor = tiny()
    summary = SpeedQQAT().quantize(model, adapter, context(stages_from_stage2, qat_steps=8))
    state = model.state_dict()
    vision = {k for k in state if _part(adapter, k) == "vision"}
    assert all(torch.equal(state[k], stage2_run[1][k]) for k in vision)
    for name in adapter.linears(tiny()[1], "language"):
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear) and module.scheme == SCHEME
    for part in ("projector", "lm_head"):  # official: not quantized
        assert all(type(model.get_submodule(n)) is nn.Linear for n in adapter.linears(tiny()[1], part))
    stage3 = summary["stages"]["stage3"]
    assert stage3["quantized_linears"] == len(adapter.linears(tiny()[1], "language"))
    assert 0 < stage3["gamma"] < 1
    assert sum(stage3["losses"][-2:]) < sum(stage3["losses"][:2])
    reloaded = load_quantized(tiny()[1], stages_from_stage2 / "stage3")
    batch = adapter.build_inputs(processor, [s[0] for s in samples(2)], [s[1] for s in samples(2)])
    with torch.no_grad():
        assert torch.equal(model(**batch.model_kwargs()).logits, reloaded(**batch.model_kwargs()).logits)


@pytest.mark.slow
def test_stage3_loss_goes_down_over_a_few_dozen_steps(stages_from_stage2):
    adapter, model, _ = tiny()
    summary = SpeedQQAT().quantize(model, adapter, context(stages_from_stage2, calibration=samples(64),
                                                          qat_steps=30))
    losses = summary["stages"]["stage3"]["losses"]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


@pytest.mark.slow
def test_stages_alone_equal_stages_together(stage1_run, tmp_path):
    together, alone = tmp_path / "together", tmp_path / "alone"
    adapter, model_a, _ = tiny()
    SpeedQ().quantize(model_a, adapter, context(together))
    for method in (SpeedQViT(), SpeedQProjector(), SpeedQQAT()):
        adapter, model_b, _ = tiny()
        method.quantize(model_b, adapter, context(alone))
    assert not _changed(model_a.state_dict(), model_b.state_dict())
    for stage in ("stage1", "stage2", "stage3"):
        assert stage_id(together / stage) == stage_id(alone / stage)
    assert stage_id(together / "stage1") == stage_id(stage1_run[0] / "stage1")


def test_finished_stages_are_reused(stages_from_stage2):
    adapter, model, _ = tiny()
    SpeedQQAT().quantize(model, adapter, context(stages_from_stage2))
    first = model.state_dict()
    adapter, again, _ = tiny()
    summary = SpeedQ().quantize(again, adapter, context(stages_from_stage2))
    assert list(summary["stages"]) == ["stage3"] and "reused" in summary["stages"]["stage3"]
    assert not _changed(first, again.state_dict())
