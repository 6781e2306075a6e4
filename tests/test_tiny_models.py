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


def test_the_embedded_default_and_two_more_families_ship_weights():
    assert {"tiny-internvl", "tiny-llava", "tiny-qwen2-vl"} <= set(PRESETS)


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
    # far above chance (25%; logged 90.6%, 91.7% and 80.4% on all 700), and the colour categories are solved
    assert scores["Overall"] >= 65.0 and scores["color"] == 100.0 and scores["hue"] >= 90.0, scores
    # the first 140 test samples (20 per category) agree with the logged whole-split accuracy
    assert abs(scores["Overall"] - logged["Overall"]) <= 12.0, (scores, logged)


@pytest.mark.parametrize("name", PRESETS)
def test_shipped_weights_are_quantization_sensitive(registry, name):
    """As real 1-2B VLMs are (paper Table 1): RTN of the LLM at w4g128 stays within a few points of
    float, at w2g16 it loses at least 15 (measured on all 700: see benchmarks/results/sensitivity.json)."""
    from speedq_plugins.tiny_models.train import rtn_probe_copy

    torch.set_num_threads(min(2, torch.get_num_threads()))
    preset, _ = _shipped(registry, name)
    loaded = load_model(preset, adapter_for(name))
    samples = synth_test_samples(140)

    def accuracy(model):
        return direct_accuracy(loaded.adapter, model, loaded.processor, samples)["Overall"]

    full = accuracy(loaded.model)
    w4 = accuracy(rtn_probe_copy(loaded.adapter, loaded.model, "w4g128"))
    w2 = accuracy(rtn_probe_copy(loaded.adapter, loaded.model, "w2g16"))
    assert abs(full - w4) <= 6.0 and full - w2 >= 15.0, (full, w4, w2)


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


@pytest.mark.parametrize("name", sorted(TRAINED_PRESETS))
def test_train_script_writes_a_loadable_folder(tmp_path, registry, name):
    from speedq_plugins.tiny_models.train import main

    out = tmp_path / name
    main(["--model", name, "--out", str(out), "--steps", "2", "--batch-size", "2",
          "--warmup-steps", "1", "--eval-samples", "7"])
    assert {"config.json", "model.safetensors", "train_log.json"} <= {p.name for p in out.iterdir()}
    command = json.loads((out / "train_log.json").read_text())["command"]
    assert command.startswith(f"python -m speedq_plugins.tiny_models.train --model {name}") and "--steps 2" in command
    loaded = load_model(registry.model(name), adapter_for(name), model_path=str(out))
    assert loaded.model.config.model_type == TRAINED_PRESETS[name]


def test_massive_activation_channels_stay_frozen():
    """``massive_channels`` columns hold ``massive_value`` in the embeddings and the projector's last
    bias before and after training; every other entry trains."""
    from speedq_plugins.tiny_models.train import build_tiny, massive_channel_indices

    settings = TrainSettings(steps=3, batch_size=4, warmup_steps=1, eval_samples=7, massive_channels=2,
                             massive_value=0.75)
    model, _ = train_tiny("tiny-internvl", settings, log=lambda *_: None)
    embedding = model.get_input_embeddings().weight
    chosen = massive_channel_indices(embedding.shape[1], 2, settings.seed)
    bias = model.model.multi_modal_projector.linear_2.bias
    assert torch.all(embedding[:, chosen] == 0.75) and torch.all(bias[chosen] == 0.75)
    others = [c for c in range(embedding.shape[1]) if c not in chosen]
    assert embedding[:, others].std() < 0.1  # the rest keeps its small initialisation...
    _, fresh, _ = build_tiny("tiny-internvl", settings.seed)
    assert not torch.equal(embedding[:, others], fresh.get_input_embeddings().weight[:, others])  # ...and trains


def test_rtn_probe_copy_quantizes_only_the_llm():
    from speedq_plugins.tiny_models.train import build_tiny, rtn_probe_copy

    adapter, model, _ = build_tiny("tiny-internvl", 0)
    copy_ = rtn_probe_copy(adapter, model, "w2g16")
    before, after = model.state_dict(), copy_.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    language = {k for k in before if adapter.part_of(k.rsplit(".", 1)[0]) == "language" and k.endswith("proj.weight")}
    assert changed == language and language


def test_planted_weight_outliers_stay_frozen_while_the_rest_trains(tmp_path):
    """``--outlier-sigma k``: about ``density`` of every ViT/projector/LLM weight becomes
    +-k x its row's std of the starting weights, and training (from a saved model) moves every
    other entry but never those."""
    from speedq_plugins.tiny_models.train import build_tiny

    start = tmp_path / "start"
    train_tiny("tiny-internvl", TrainSettings(steps=1, batch_size=2, warmup_steps=1, eval_samples=7), out=start,
               log=lambda *_: None)
    adapter, saved, _ = build_tiny("tiny-internvl", 0)
    saved = type(saved).from_pretrained(str(start), dtype=torch.float32)
    settings = TrainSettings(steps=3, batch_size=4, warmup_steps=1, eval_samples=7, outlier_sigma=10.0,
                             outlier_density=0.05, init_from=str(start))
    model, _ = train_tiny("tiny-internvl", settings, log=lambda *_: None)
    names = [n for c in ("vision", "projector", "language") for n in adapter.linears(model, c)]
    assert names and not any(n.endswith("lm_head") for n in names)
    trained, before = dict(model.named_modules()), dict(saved.named_modules())
    planted = total = 0
    for name in names:
        w, w0 = trained[name].weight, before[name].weight
        big = (w.abs() / w0.std(dim=1, keepdim=True) - 10.0).abs() < 1e-4  # exactly +-10 row stds
        planted += int(big.sum())
        total += w.numel()
        assert not torch.equal(w[~big], w0[~big]), name  # the rest trains
    assert 0.04 < planted / total < 0.06
    again, _ = train_tiny("tiny-internvl", settings, log=lambda *_: None)  # seeded: same positions
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_whole_model_probe_caps_the_group_at_the_vit_width():
    """``all:w4g128`` quantizes the 64-wide ViT at w4g64 and the LLM at w4g128."""
    from speedq_core.quant.scheme import QuantScheme
    from speedq_plugins.tiny_models.train import build_tiny, capped_schemes, rtn_probe_copy

    adapter, model, _ = build_tiny("tiny-internvl", 0)
    schemes = capped_schemes(adapter, model, QuantScheme.parse("w4g128"), ("vision", "language"))
    assert schemes["vision"] == QuantScheme.parse("w4g64") and schemes["language"] == QuantScheme.parse("w4g128")
    copy_ = rtn_probe_copy(adapter, model, "all:w4g128")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, copy_.state_dict()[k])}
    assert {adapter.part_of(k.rsplit(".", 1)[0]) for k in changed} == {"vision", "projector", "language"}


@pytest.mark.parametrize("args, message", [
    (["--massive-channels", "999"], "--massive-channels must be between 0 and 16"),
    (["--outlier-sigma", "8", "--outlier-density", "1.5"], "--outlier-density in (0, 1)"),
    (["--outlier-sigma", "8", "--outlier-components", "vit"], "unknown ['vit']"),
    (["--init-from", "/nonexistent"], "no model.safetensors there"),
    (["--probe-rtn", "llm:w2g16"], "all:SCHEME"),
    (["--text-init-std", "0"], "--text-init-std must be positive"),
    (["--probe-rtn", "w2q16"], "w2q16"),
    (["--categories", "position,colour"], "--categories: unknown ['colour']; use some of color, shape"),
])
def test_bad_training_options_are_one_line_errors(args, message, capsys, tmp_path):
    from speedq_plugins.tiny_models.train import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", "tiny-internvl", "--out", str(tmp_path / "m"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and not (tmp_path / "m").exists()


def test_listed_categories_are_weighted_and_every_draw_is_fresh():
    """``--categories position,position,shape``: the stream cycles over the list, so position is
    asked twice as often as shape, and the j-th position draw is train sample j * 7 + 5 (the split
    cycles through the seven categories), never a repeat."""
    from speedq_plugins.synthetic import CATEGORIES, generate_sample
    from speedq_plugins.tiny_models.train import _samples

    drawn = _samples("train", 3, 27, 0, ("position", "position", "shape"))  # stream samples 3 .. 29
    assert [s.category for s in drawn] == ["position", "position", "shape"] * 9
    position, shape = CATEGORIES.index("position"), CATEGORIES.index("shape")
    expected = []
    for cycle in range(1, 10):  # samples 3 .. 29 are cycles 1 .. 9 of the three-slot list
        expected += [(2 * cycle) * 7 + position, (2 * cycle + 1) * 7 + position, cycle * 7 + shape]
    assert len(set(expected)) == len(expected)
    for sample, index in zip(drawn, expected):
        reference = generate_sample(index, "train", seed=0)
        assert sample.prompt == reference.prompt and sample.image.tobytes() == reference.image.tobytes()


def test_a_preset_without_a_recipe_is_refused_by_name():
    with pytest.raises(ValueError, match="no training recipe for 'tiny-fastvlm': use one of tiny-internvl, tiny-qwen2-vl, tiny-llava"):
        adapter_for("tiny-fastvlm")
