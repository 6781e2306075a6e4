"""The embedded default models: shipped weights load, answer the synthetic test split, and the
training script is reproducible. Nothing here trains more than a few steps."""
from __future__ import annotations

import json

import pytest
import torch

from speedq_core.models import embedded_weights_dir, load_model
from speedq_core.registry import load_registry
from speedq_plugins.tiny_models import TRAINED_PRESETS, TrainSettings, adapter_for, direct_accuracy
from speedq_plugins.tiny_models.train import test_samples as synth_test_samples
from speedq_plugins.tiny_models.train import train_tiny

# the presets that ship trained weights (registry.toml names them); the others build from a seed
PRESETS = sorted(name for name in TRAINED_PRESETS if load_registry().model(name).weights)


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _shipped(registry, name):
    """The preset and its shipped weights folder; fails when the folder registry.toml names is not in
    the installed package."""
    preset = registry.model(name)
    folder = embedded_weights_dir(preset)
    if folder is None:
        pytest.fail(f"{name}: registry.toml names {preset.weights}, which is not in the package")
    return preset, folder


def test_the_embedded_default_ships_weights():
    assert "tiny-internvl" in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_shipped_weights_load(registry, name):
    preset, folder = _shipped(registry, name)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    loaded = load_model(preset, adapter_for(name))
    assert loaded.source.startswith("embedded weights"), loaded.source
    # the shipped config is the adapter's tiny_config (same architecture the registry describes)
    tiny = loaded.adapter.tiny_config()
    assert loaded.model.config.text_config.num_hidden_layers == tiny.text_config.num_hidden_layers
    assert loaded.model.config.text_config.vocab_size == tiny.text_config.vocab_size
    log = json.loads((folder / "train_log.json").read_text())
    assert log["preset"] == name and log["test_samples"] == 700


@pytest.mark.parametrize("name", PRESETS)
def test_shipped_weights_answer_the_test_split(registry, name):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    preset, _ = _shipped(registry, name)
    loaded = load_model(preset, adapter_for(name))
    samples = synth_test_samples(140)
    scores = direct_accuracy(loaded.adapter, loaded.model, loaded.processor, samples)
    logged = json.loads((embedded_weights_dir(preset) / "train_log.json").read_text())["test_accuracy"]
    # well above chance (25%), and the colour categories are solved
    assert scores["Overall"] >= 45.0 and scores["color"] == 100.0, scores
    # the first 140 test samples (20 per category) agree with the logged whole-split accuracy
    assert abs(scores["Overall"] - logged["Overall"]) <= 12.0, (scores, logged)


@pytest.mark.parametrize("name", PRESETS)
def test_shipped_model_answers_with_an_option(registry, name):
    """The tiny models answer with an option's text, which VLMEvalKit's exact matching maps to the
    option's letter (``can_infer_text``); a colour question must get the right option."""
    preset, _ = _shipped(registry, name)
    loaded = load_model(preset, adapter_for(name))
    sample = next(s for s in synth_test_samples(14) if s.category == "color")
    answer = loaded.adapter.generate(loaded.model, loaded.processor, sample.image, sample.prompt, 4)
    assert answer == sample.answer_text, (answer, sample.options)


def test_training_is_reproducible(tmp_path):
    """Two short runs with one seed give identical weights; another seed gives different ones."""
    settings = TrainSettings(steps=3, batch_size=4, warmup_steps=1, eval_samples=7)

    def weights(seed):
        model, record = train_tiny("tiny-internvl", TrainSettings(**{**settings.__dict__, "seed": seed}),
                                   log=lambda *_: None)
        assert len(record["loss_every_50"]) == 1
        return {k: v.clone() for k, v in model.state_dict().items()}

    first, second, other = weights(0), weights(0), weights(1)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_train_script_writes_a_loadable_folder(tmp_path, registry):
    from speedq_plugins.tiny_models.train import main

    out = tmp_path / "tiny-qwen2-vl"
    main(["--model", "tiny-qwen2-vl", "--out", str(out), "--steps", "2", "--batch-size", "2",
          "--warmup-steps", "1", "--eval-samples", "7"])
    assert {"config.json", "model.safetensors", "train_log.json"} <= {p.name for p in out.iterdir()}
    loaded = load_model(registry.model("tiny-qwen2-vl"), adapter_for("tiny-qwen2-vl"), model_path=str(out))
    assert loaded.model.config.model_type == "qwen2_vl"
