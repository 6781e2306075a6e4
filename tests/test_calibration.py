import json

import numpy as np
import pytest
import torch
from PIL import Image

from speedq_core.calibration import (
    CalibrationSet,
    calibration_batches,
    capture_block_inputs,
    capture_linear_inputs,
    component_units,
    run_block,
)
from speedq_core.errors import SpeedqError
from speedq_plugins.families.llava import LlavaAdapter


def image(seed: int, size: int = 40) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def triples(n: int):
    return [(image(i), "what is shown" + " here" * i, f"answer {i}") for i in range(n)]


@pytest.fixture(scope="module")
def llava():
    adapter = LlavaAdapter()
    config = adapter.tiny_config()
    torch.manual_seed(0)
    return adapter, adapter.build_model(config), adapter.tiny_processor(config)


@pytest.fixture
def llava_json(tmp_path):
    entries = []
    for i in range(3):
        image(i).save(tmp_path / f"img{i}.png")
        entries.append({"image": f"img{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nDescribe picture {i}."},
            {"from": "gpt", "value": f"It is picture {i}."}]})
    entries.append({"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}]})
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(entries))
    return path, entries


# ---- data source ------------------------------------------------------------------------------------
def test_llava_json_reads_prompts_answers_and_images(llava_json, tmp_path):
    path, _ = llava_json
    calib = CalibrationSet.from_llava_json(path, tmp_path, n=3)
    assert len(calib) == 3 and not calib.vision_only
    prompts = sorted(s.prompt for s in calib.samples)
    assert prompts == [f"Describe picture {i}." for i in range(3)]
    assert all(s.answer.startswith("It is picture") and s.image.mode == "RGB" for s in calib.samples)


def test_fewer_samples_than_asked_warns(llava_json, tmp_path):
    path, _ = llava_json
    with pytest.warns(UserWarning, match="3 usable calibration samples, 128 were asked"):
        assert len(CalibrationSet.from_llava_json(path, tmp_path)) == 3


def test_missing_image_names_the_file(llava_json, tmp_path):
    path, _ = llava_json
    (tmp_path / "img1.png").unlink()
    with pytest.raises(SpeedqError, match=r"entry 1: image .*img1\.png does not exist"):
        CalibrationSet.from_llava_json(path, tmp_path, n=3)


def test_undecodable_image_is_named(llava_json, tmp_path):
    path, _ = llava_json
    (tmp_path / "img2.png").write_bytes(b"not a png")
    with pytest.raises(SpeedqError, match=r"img2\.png cannot be decoded"):
        CalibrationSet.from_llava_json(path, tmp_path, n=3)


def test_empty_conversation_is_named(llava_json, tmp_path):
    path, entries = llava_json
    entries[0]["conversations"] = []
    path.write_text(json.dumps(entries))
    with pytest.raises(SpeedqError, match="entry 0 has an empty conversation"):
        CalibrationSet.from_llava_json(path, tmp_path, n=3)


def test_no_usable_sample_is_an_error(tmp_path):
    path = tmp_path / "calib.json"
    path.write_text(json.dumps([{"conversations": []}]))
    with pytest.raises(SpeedqError, match="no usable calibration sample"):
        CalibrationSet.from_llava_json(path, tmp_path)
    with pytest.raises(SpeedqError, match="does not exist"):
        CalibrationSet.from_llava_json(tmp_path / "nope.json", tmp_path)


def test_image_folder_is_vision_only(tmp_path, llava):
    adapter, _, processor = llava
    for i in range(2):
        image(i).save(tmp_path / f"{i}.jpg")
    (tmp_path / "notes.txt").write_text("ignored")
    calib = CalibrationSet.from_image_folder(tmp_path, n=2).with_processor(processor)
    assert calib.vision_only and len(calib) == 2
    assert len(calib.model_inputs(adapter, "vision")) == 2
    with pytest.raises(SpeedqError, match="holds images only"):
        calib.model_inputs(adapter, "language")


def test_triples_and_bad_triples():
    assert len(CalibrationSet.from_triples(triples(5), n=4)) == 4
    with pytest.raises(SpeedqError, match="sample 1: expected a PIL image"):
        CalibrationSet.from_triples([(image(0), "a", "b"), ("x.png", "a", "b")], n=2)


def test_processor_is_required(llava):
    adapter, _, _ = llava
    with pytest.raises(SpeedqError, match="with_processor"):
        calibration_batches(CalibrationSet.from_triples(triples(1), n=1), adapter, "language", "gptq")


# ---- block-by-block engine ----------------------------------------------------------------------------
@torch.no_grad()
def test_block_by_block_equals_full_forward(llava):
    adapter, model, processor = llava
    calib = CalibrationSet.from_triples(triples(3), n=3).with_processor(processor)
    batches = calib.model_inputs(adapter, "language", batch_size=2)
    inputs = capture_block_inputs(model, adapter, "language", batches)
    blocks = component_units(model, adapter, "language")
    final_norm = model.model.language_model.norm  # transformers reports the last layer after the norm
    for i, (_, block) in enumerate(blocks):
        inputs = inputs.replace_hidden(run_block(block, inputs))
        for sample, batch in zip(inputs, batches):
            full = model(**batch.model_kwargs(), output_hidden_states=True, use_cache=False).hidden_states
            ours = final_norm(sample.hidden) if i == len(blocks) - 1 else sample.hidden
            torch.testing.assert_close(ours, full[i + 1], rtol=0, atol=1e-6)

    vision_batches = calib.model_inputs(adapter, "vision")
    inputs = capture_block_inputs(model, adapter, "vision", vision_batches)
    tower = model.model.vision_tower
    for i, (_, block) in enumerate(component_units(model, adapter, "vision")):
        inputs = inputs.replace_hidden(run_block(block, inputs))
        for sample, batch in zip(inputs, vision_batches):
            full = tower(batch.tensors["pixel_values"], output_hidden_states=True).hidden_states
            torch.testing.assert_close(sample.hidden, full[i + 1], rtol=0, atol=1e-6)


@torch.no_grad()
def test_token_masks_mark_image_and_answer_tokens(llava):
    adapter, model, processor = llava
    calib = CalibrationSet.from_triples(triples(2), n=2).with_processor(processor)
    batches = calib.model_inputs(adapter, "language", batch_size=2)
    sample = capture_block_inputs(model, adapter, "language", batches).samples[0]
    ids = batches[0].tensors["input_ids"]
    masks = sample.masks
    assert masks["image"].sum() == (ids == model.config.image_token_id).sum() == 2 * 64  # (48 / 6)^2 each
    assert torch.equal(masks["answer"], batches[0].labels != -100)
    assert torch.equal(masks["text"], masks["valid"] & ~masks["image"])
    assert not masks["valid"].all()  # left padding of the shorter sample

    vision = capture_block_inputs(model, adapter, "vision", calib.model_inputs(adapter, "vision")).samples[0]
    assert vision.masks is None


@torch.no_grad()
def test_linear_inputs_skip_padding(llava):
    adapter, model, processor = llava
    calib = CalibrationSet.from_triples(triples(2), n=2).with_processor(processor)
    batches = calib.model_inputs(adapter, "language", batch_size=2)
    inputs = capture_block_inputs(model, adapter, "language", batches)
    feats = capture_linear_inputs(model.model.language_model.layers[0], inputs, ["self_attn.q_proj", "mlp.down_proj"])
    n_valid = int(batches[0].tensors["attention_mask"].sum())
    assert feats["self_attn.q_proj"].shape == (n_valid, 128)  # hidden size
    assert feats["mlp.down_proj"].shape == (n_valid, 384)  # intermediate size
