import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from baselines.awq import AWQ, GroupCapture, group_loss, search_scale, valid_tokens
from baselines.mbq import MBQ, balance_ratios, modality_token_weights
from speedq_core.calibration import CalibrationSet, capture_block_inputs
from speedq_core.errors import SpeedqError
from speedq_core.method import QuantContext
from speedq_core.quant import QuantScheme
from speedq_plugins.families.llava import LlavaAdapter


@pytest.fixture(scope="module")
def llava():
    adapter = LlavaAdapter()
    config = adapter.tiny_config()
    torch.manual_seed(0)
    model = adapter.build_model(config)
    processor = adapter.tiny_processor(config)
    rng = np.random.default_rng(0)
    samples = [(Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)), "what is" + " here" * i,
                "a small cat") for i in range(3)]
    return adapter, model, CalibrationSet.from_triples(samples, n=3).with_processor(processor)


def quantize(method, llava, **options):
    adapter, model, calib = llava
    quantized = copy.deepcopy(model)
    ctx = QuantContext({"language": QuantScheme(4, 32)}, Path("unused"), calibration=calib,
                       options={"n_grid": 5, **options})
    return quantized, method.quantize(quantized, adapter, ctx)


def test_equal_weights_reproduce_awq_exactly(llava):
    awq, awq_summary = quantize(AWQ(), llava, clip="awq")
    mbq, mbq_summary = quantize(MBQ(), llava, clip="awq", text_tokens="text",
                                modality_weights={"image": 1.0, "text": 1.0})
    assert {k: v["ratio"] for k, v in awq_summary["language"]["groups"].items()} == \
           {k: v["ratio"] for k, v in mbq_summary["language"]["groups"].items()}
    a, b = awq.state_dict(), mbq.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_gradient_ratios_are_computed_and_floored_at_the_median(llava):
    _, summary = quantize(MBQ(), llava)
    ratios = summary["language"]["modality_ratios"]
    # one ratio per inspected module of every block (the tiny Llama has 4)
    assert set(ratios) == {f"{block}.{module}" for block in range(4)
                           for module in ("self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj")}
    assert ratios["0.self_attn"] == pytest.approx(ratios["0.self_attn.o_proj"])  # o_proj output = attention output
    assert all(r > 0 for r in ratios.values())
    floored = balance_ratios({(0, "m"): (1.0, 2.0), (1, "m"): (0.0, 1.0), (2, "m"): (3.0, 1.0)})
    assert floored == {(0, "m"): 0.5, (1, "m"): 0.5, (2, "m"): 3.0}
    with pytest.raises(SpeedqError, match="text-token gradient"):
        balance_ratios({(0, "m"): (1.0, 0.0)})


@torch.no_grad()
def test_lighter_image_weight_moves_error_from_text_to_image_tokens(llava):
    """The searched scales are the argmin of w_img*E_img + E_txt, so lowering w_img can only raise E_img
    and lower E_txt (exchange argument on the two minimisers). On this model the image tokens' error
    dominates the balanced sum, so the search moves when text is favoured (w_img = 1/50); image-heavy
    weights keep the balanced scales."""
    adapter, model, calib = llava
    block = copy.deepcopy(model.model.language_model.layers[0])
    inputs = capture_block_inputs(model, adapter, "language", calib.model_inputs(adapter, "language"))
    group = adapter.scaling_groups("language")[0]  # input_layernorm -> q, k, v ; inspect self_attn
    inspect = block.get_submodule(group.inspect)
    linears = [block.get_submodule(r) for r in group.linears]
    capture, feats = GroupCapture([], []), []
    inspect.register_forward_pre_hook(lambda m, a, k: capture.calls.append((a, k)), with_kwargs=True)
    inspect.register_forward_hook(lambda m, a, o: capture.outputs.append(o[0]))
    linears[0].register_forward_pre_hook(lambda m, a: feats.append(a[0].reshape(-1, a[0].shape[-1])))
    for sample in inputs:
        block(*sample.args, **sample.kwargs)
    x, scheme = torch.cat(feats), QuantScheme(2, 16)

    def errors(scales):
        return tuple(group_loss(inspect, linears, capture, inputs.samples, scales, scheme,
                                modality_token_weights(*w, "text")) for w in ((1.0, 0.0), (0.0, 1.0)))

    balanced, _ = search_scale(inspect, linears, capture, inputs.samples, x, scheme, 20, valid_tokens)
    text_heavy, _ = search_scale(inspect, linears, capture, inputs.samples, x, scheme, 20,
                                modality_token_weights(0.02, 1.0, "text"))
    (img_a, txt_a), (img_b, txt_b) = errors(balanced), errors(text_heavy)
    assert img_b >= img_a and txt_b <= txt_a
    assert (img_b, txt_b) != (img_a, txt_a)


def test_mbq_needs_answers(llava):
    adapter, model, calib = llava
    no_answers = CalibrationSet.from_triples([(s.image, s.prompt, None) for s in calib.samples], n=3)
    ctx = QuantContext({"language": QuantScheme(4, 32)}, Path("unused"),
                       calibration=no_answers.with_processor(calib.processor))
    with pytest.raises(SpeedqError, match="no answer tokens"):
        MBQ().quantize(copy.deepcopy(model), adapter, ctx)
