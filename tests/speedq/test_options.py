"""Ablation flags (what is trained, which loss), option parsing and the errors for bad input."""
import json

import pytest
import torch
from helpers import FAST, SCHEME, context, samples, tiny
from torch import nn

from speedq_core.errors import SpeedqError
from speedq_core.method import QuantContext
from speedq_core.quant import QuantLinear, QuantScheme, quantize_weight
from speedq_core.training.losses import answer_ce
from speedq_plugins.speedq.method import SpeedQ, SpeedQProjector, SpeedQQAT
from speedq_plugins.speedq.objective import Objective
from speedq_plugins.speedq.options import OFFICIAL_LR, TINY_LOW_BIT_LR, TINY_LR, parse_options, resolve_lr


def _batch():
    adapter, model, processor = tiny()
    data = samples(4)
    return model, adapter.build_inputs(processor, [s[0] for s in data], [s[1] for s in data], [s[2] for s in data])


def test_loss_option_selects_the_terms():
    model, batch = _batch()
    with torch.no_grad():
        logits = model(**batch.model_kwargs()).logits
        task = Objective("task", label_smoothing=0.1).loss_fn(None)(model, batch)
        assert torch.allclose(task, answer_ce(logits, batch.labels, 0.1))
        # the student is its own teacher: KD is 0, so "distill" is 0 and "both" is CE alone
        assert Objective("distill", gamma=0.3).loss_fn(model)(model, batch).abs() < 1e-5
        both = Objective("both", gamma=0.3, label_smoothing=0.1).loss_fn(model)(model, batch)
        assert torch.allclose(both, task, atol=1e-5)


def test_official_defaults_and_parsing():
    opts = parse_options({})
    assert (opts.stages, opts.loss, opts.label_smoothing, opts.kd_normalize, opts.gamma_steps) == \
        ((1, 2, 3), "both", 0.1, "sequence_sum", 100)
    assert not (opts.stage2_distill or opts.quantize_projector or opts.kd_mask_shifted or opts.joint)
    parsed = parse_options({"stages": "3,1", "joint": "true", "qat_steps": "12", "lr": "2e-5"})
    assert parsed.stages == (1, 3) and parsed.joint and parsed.qat_steps == 12 and parsed.lr == 2e-5
    assert resolve_lr(opts, tiny()[1]) == TINY_LR and resolve_lr(opts, nn.Linear(5000, 5000)) == OFFICIAL_LR
    assert resolve_lr(opts, tiny()[1], bits=2) == TINY_LOW_BIT_LR
    assert resolve_lr(opts, nn.Linear(5000, 5000), bits=2) == OFFICIAL_LR
    with pytest.raises(SpeedqError, match="did you mean 'qat_steps'"):
        parse_options({"qat_step": 3})
    with pytest.raises(SpeedqError, match="use one of both, task, distill"):
        parse_options({"loss": "kl"})
    with pytest.raises(SpeedqError, match="runs stage 3 only"):
        parse_options({"stages": "1,2"}, forced_stages=(3,))


def test_task_loss_and_stage2_distill_flags(stages_from_stage1):
    adapter, model, _ = tiny()
    summary = SpeedQ().quantize(model, adapter, context(stages_from_stage1, loss="task", stage2_distill=True,
                                                       stages="2,3"))
    assert summary["stages"]["stage2"]["loss"] == "both" and 0 < summary["stages"]["stage2"]["gamma"] < 1
    assert summary["stages"]["stage3"]["loss"] == "task" and summary["stages"]["stage3"]["gamma"] is None
    written = json.loads((stages_from_stage1 / "options.json").read_text())["options"]
    assert written["loss"] == "task" and written["qat_steps"] == 4 and written["lr"] == FAST["lr"]


def test_joint_ablation_trains_vit_and_llm_in_one_qat(tmp_path):
    adapter, model, _ = tiny()
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    summary = SpeedQ().quantize(model, adapter, context(tmp_path, joint=True))
    assert list(summary["stages"]) == ["joint"] and "vision" in summary["stages"]["joint"]["trained_parts"]
    assert not (tmp_path / "stage1").exists() and (tmp_path / "joint" / "quant_config.json").is_file()
    for part in ("vision", "language"):
        assert all(isinstance(model.get_submodule(n), QuantLinear) for n in adapter.linears(tiny()[1], part))
    norm = "model.vision_tower.encoder.layer.0.layernorm_before.weight"
    assert not torch.equal(model.state_dict()[norm], float_state[norm])  # the ViT was trained


def test_projector_and_embeddings_flags(stages_from_stage1):
    adapter, model, _ = tiny()
    embed = model.get_submodule(adapter.embeddings_path).weight.detach().clone()
    summary = SpeedQ().quantize(model, adapter, context(stages_from_stage1, stages="3", quantize_projector=True,
                                                       train_embeddings=False, clip=False))
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in adapter.linears(tiny()[1], "projector"))
    assert torch.equal(model.get_submodule(adapter.embeddings_path).weight, embed)
    assert summary["stages"]["stage3"]["trained_parts"] == ["projector", "language"]


def test_run_dir_of_another_scheme_or_model_is_refused(stages_from_stage1):
    adapter, model, _ = tiny()
    with pytest.raises(SpeedqError, match="different scheme.*delete"):
        SpeedQProjector().quantize(model, adapter, context(stages_from_stage1, scheme=QuantScheme.parse("w4g16")))
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    with pytest.raises(SpeedqError, match="different model"):
        SpeedQProjector().quantize(model, adapter, context(stages_from_stage1))


def test_missing_or_mismatched_stages_name_the_fix(stages_from_stage1, tmp_path):
    adapter, model, _ = tiny()
    with pytest.raises(SpeedqError, match="run speedq-projector first"):
        SpeedQQAT().quantize(model, adapter, context(stages_from_stage1))
    with pytest.raises(SpeedqError, match="adaround_iters=10 but this run has 11: delete"):
        SpeedQ().quantize(model, adapter, context(stages_from_stage1, adaround_iters=11))
    with pytest.raises(SpeedqError, match="needs training samples"):
        SpeedQ().quantize(model, adapter, QuantContext(schemes={"vision": SCHEME}, out_dir=tmp_path / "b",
                                                       options={"stages": "1"}))
    quantized = tiny()[1]
    quantized.lm_head = QuantLinear.from_linear(quantized.lm_head, quantize_weight(quantized.lm_head.weight, SCHEME))
    with pytest.raises(SpeedqError, match="starts from the float model"):
        SpeedQ().quantize(quantized, adapter, context(tmp_path / "c"))


@pytest.mark.slow
def test_stage3_on_deepspeed_in_one_process(stages_from_stage2):
    adapter, model, _ = tiny()
    summary = SpeedQQAT().quantize(model, adapter, context(stages_from_stage2, engine="deepspeed", qat_steps=6))
    stage3 = summary["stages"]["stage3"]
    assert len(stage3["losses"]) == 6 and stage3["losses"][-1] < stage3["losses"][0]
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in adapter.linears(tiny()[1], "language"))
