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

PRESETS = sorted(TRAINED_PRESETS)


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _shipped(registry, name):
    """The preset and its shipped weights folder. Skips (loudly, with -ra) while registry.toml has
    no ``weights`` line for the preset: no trained weights are shipped yet. Fails when the line
    exists but the folder is missing from the installed package."""
    preset = registry.model(name)
    if not preset.weights:
        pytest.skip(f"{name}: no trained weights shipped yet (registry.toml has no `weights` line); "
                    f"train with `python -m speedq_plugins.tiny_models.train --model {name} --out ...`")
    folder = embedded_weights_dir(preset)
    if folder is None:
        pytest.fail(f"{name}: registry.toml names {preset.weights}, which is not in the package")
    return preset, folder


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
    assert log["preset"] == name and log["test_accuracy"]["Overall"] >= 90.0


@pytest.mark.parametrize("name", PRESETS)
def test_shipped_weights_answer_the_test_split(registry, name):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    preset, _ = _shipped(registry, name)
    loaded = load_model(preset, adapter_for(name))
    scores = direct_accuracy(loaded.adapter, loaded.model, loaded.processor, synth_test_samples(63))
    assert scores["Overall"] >= 85.0, scores


@pytest.mark.parametrize("name", PRESETS)
def test_shipped_model_generates_a_letter(registry, name):
    preset, _ = _shipped(registry, name)
    loaded = load_model(preset, adapter_for(name))
    sample = synth_test_samples(1)[0]
    answer = loaded.adapter.generate(loaded.model, loaded.processor, sample.image, sample.prompt, 4)
    assert answer[:1] in "ABCD" and answer[:1], answer


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
