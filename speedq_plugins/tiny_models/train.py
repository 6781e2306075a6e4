"""Train a tiny preset on the synthetic benchmark's TRAIN split and save it as package data.

    python -m speedq_plugins.tiny_models.train --model tiny-internvl \\
        --out speedq_plugins/tiny_weights/tiny-internvl

What it does, deterministically (fixed seed, fixed thread count (default 1), fixed data order):

* the model is the adapter's ``tiny_config()``, initialised from ``--seed``;
* step ``t`` trains on train-split samples ``t*B .. t*B+B-1`` of :mod:`speedq_plugins.synthetic`
  (fresh samples every step, never the test split), each asked exactly as VLMEvalKit asks it
  (``sample.prompt``) with the right option's *text* as target (``answer_ce`` on the answer
  tokens). VLMEvalKit's exact matching maps an answer that names exactly one option's text to that
  option's letter (``can_infer_text``), so the model is scored like any VLM; answering with the text
  spares a from-scratch model the option -> letter lookup, which took thousands of steps to learn;
* the project's own loop (:func:`speedq_core.training.loop.train`), AdamW without weight decay,
  linear warmup then cosine decay;
* the result is scored in-process on the TEST split (greedy first answer token), saved with
  ``save_pretrained`` (``config.json`` + ``model.safetensors``) and logged to ``train_log.json``
  (settings, seed, wall time, losses, accuracy per category).

Only the logits of the answer positions are computed during training (``logits_to_keep``); the
loss is the same as over the full sequence because labels are -100 elsewhere.

Quantization sensitivity (off by default; what each did is in
``speedq_plugins/tiny_weights/README.md``): ``--outlier-sigma/-density`` plant frozen heavy-tailed
weight outliers (what the shipped weights use, trained on from ``--init-from`` a plain run);
``--probe-rtn`` scores RTN copies (``w2g16`` = LLM, ``all:w2g16`` = ViT + projector + LLM) at every
probe. Experiments that did not make the models sensitive: ``--text-init-std`` shrinks the LLM's
initialisation, ``--massive-channels/-value`` give the residual stream frozen massive-activation
channels.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speedq_core.adapter import FamilyAdapter, ModelInputs
from speedq_core.training.loop import TrainConfig, seed_everything, train
from speedq_core.training.losses import IGNORE, answer_ce

# Preset name -> family adapter name. These are the presets whose weights are shipped.
TRAINED_PRESETS = {"tiny-internvl": "internvl", "tiny-qwen2-vl": "qwen2_vl", "tiny-llava": "llava"}
VLM_COMPONENTS = ("vision", "projector", "language")


# Family adapter name -> (module, class) of its adapter.
_ADAPTER_CLASSES = {
    "internvl": ("speedq_plugins.families.internvl", "InternVLAdapter"),
    "qwen2_vl": ("speedq_plugins.families.qwen2_vl", "Qwen2VLAdapter"),
    "llava": ("speedq_plugins.families.llava", "LlavaAdapter"),
}


def adapter_for(preset: str) -> FamilyAdapter:
    """The family adapter of a trained tiny preset (imported directly: no plugin discovery)."""
    if preset not in TRAINED_PRESETS:
        raise ValueError(f"no training recipe for {preset!r}: use one of {', '.join(TRAINED_PRESETS)}")
    import importlib

    module, cls = _ADAPTER_CLASSES[TRAINED_PRESETS[preset]]
    return getattr(importlib.import_module(module), cls)()


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1500
    batch_size: int = 48
    lr: float = 2e-3
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    data_seed: int = 0  # seed of the synthetic benchmark (the benchmark's own default)
    # One thread: on a shared 2-core machine, 2 intra-op threads ran 10x slower than 1 (each
    # op waits for a descheduled peer). Results depend on the thread count; keep it fixed.
    threads: int = 1
    eval_samples: int = 700  # TEST samples scored at the end (700 = the whole SpeedqSynth_TEST)
    eval_every: int = 0  # >0: also score `probe_samples` test samples every that many steps
    probe_samples: int = 140
    categories: tuple[str, ...] = field(default=())  # empty = all
    # RTN copies also scored at every probe (``w2g16`` = LLM, ``all:w2g16`` = whole VLM): the
    # sensitivity curve during training
    probe_rtn: tuple[str, ...] = field(default=())
    # Std of the LLM's initial weights (transformers' ``initializer_range``; the tiny configs use 0.02).
    text_init_std: float = 0.02
    # Massive activations (Sun et al. 2024; the outlier features of LLM.int8()): ``massive_channels``
    # residual channels hold ``massive_value`` in every token's embedding and in the projector's
    # output bias, frozen during training, so every LLM input column of those channels sees an
    # activation ~40x the others, as in trained LLMs. Weight rounding error on those columns is
    # multiplied by it: the mechanism that makes RTN collapse at 2 bits and that AWQ/GPTQ correct.
    massive_channels: int = 0
    massive_value: float = 1.0
    massive_freeze_norms: bool = False  # also freeze the decoder norms' gains of those channels at 1
    # Heavy-tailed weights: a fraction ``outlier_density`` of the weights of every linear of
    # ``outlier_components`` is set to +-``outlier_sigma`` x its row's std and frozen. A group's
    # min-max range is then set by its outlier, as in trained LLMs whose weights have kurtosis >> 3:
    # the grid step is ~2k/(2^b - 1) row stds, so 4 bits keep the learnt small weights and 2 bits
    # round them all to one level.
    outlier_sigma: float = 0.0
    outlier_density: float = 1 / 16
    outlier_components: tuple[str, ...] = VLM_COMPONENTS
    # Start from a saved model of the same preset (a folder with model.safetensors), e.g. to plant
    # outliers into trained weights and train on.
    init_from: str = ""


# -- data -----------------------------------------------------------------------------------------


def _samples(split: str, start: int, n: int, data_seed: int, categories: Sequence[str] = ()) -> list[Any]:
    """Samples ``start .. start+n-1`` of the training stream. With ``categories``, the stream cycles
    over that list (a category listed twice is asked twice as often), and the j-th draw of category
    ``c`` is split sample ``j * 7 + CATEGORIES.index(c)`` (sample i of the split has category
    ``CATEGORIES[i % 7]``), so every draw is a fresh sample."""
    from speedq_plugins.synthetic import CATEGORIES, generate_sample, iter_samples

    if not categories:
        return list(iter_samples(split, n, seed=data_seed, start=start))
    wanted = [CATEGORIES.index(c) for c in categories]
    out = []
    for k in range(start, start + n):
        cycle, slot = divmod(k, len(wanted))
        category = wanted[slot]
        draw = cycle * wanted.count(category) + wanted[:slot].count(category)
        out.append(generate_sample(draw * len(CATEGORIES) + category, split, seed=data_seed))
    return out


def make_batch_at(adapter: FamilyAdapter, processor: Any, settings: TrainSettings):
    """``batch_at(step, rank, world)``: the ModelInputs of train samples ``step*B ..`` (a pure
    function of the step, as the loop requires)."""

    def batch_at(step: int, rank: int = 0, world: int = 1) -> ModelInputs:
        b = settings.batch_size
        samples = _samples("train", (step * world + rank) * b, b, settings.data_seed, settings.categories)
        return adapter.build_inputs(processor, [s.image for s in samples], [s.prompt for s in samples],
                                    [s.answer_text for s in samples])

    return batch_at


def answer_loss(model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """``answer_ce`` computing only the logits that predict answer tokens (rows are left-padded,
    so answers end every row: the last ``k`` positions cover them)."""
    labels = inputs.labels
    first = int((labels != IGNORE).any(0).nonzero()[0])
    keep = labels.shape[1] - first + 1
    logits = model(**inputs.model_kwargs(), logits_to_keep=keep).logits
    return answer_ce(logits, labels[:, -keep:])


# -- scoring --------------------------------------------------------------------------------------


@torch.no_grad()
def direct_accuracy(
    adapter: FamilyAdapter,
    model: nn.Module,
    processor: Any,
    samples: Iterable[Any],
    batch_size: int = 64,
) -> dict[str, float]:
    """Percent of samples whose greedy first answer token is the right option's text (every option
    is one token of the tiny vocabulary): ``{"Overall": pct, category: pct, ...}``. The argmax runs
    over the whole vocabulary, as greedy decoding does, so it is what ``adapter.generate`` answers."""
    was_training = model.training
    model.eval()
    tokenizer = processor.tokenizer
    hits: dict[str, list[int]] = defaultdict(list)
    samples = list(samples)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        inputs = adapter.build_inputs(processor, [s.image for s in chunk], [s.prompt for s in chunk])
        logits = model(**inputs.model_kwargs(), logits_to_keep=1).logits[:, -1]
        for s, token in zip(chunk, logits.argmax(-1).tolist()):
            hits[s.category].append(int(token == tokenizer.convert_tokens_to_ids(s.answer_text)))
    model.train(was_training)
    every = [h for v in hits.values() for h in v]
    scores = {"Overall": 100.0 * sum(every) / max(1, len(every))}
    scores.update({c: 100.0 * sum(v) / len(v) for c, v in hits.items()})
    return scores


def rtn_copy(adapter: FamilyAdapter, model: nn.Module, schemes: dict[str, Any]) -> nn.Module:
    """A deep copy of ``model`` with each component of ``schemes`` (name -> QuantScheme) quantized
    by the RTN method plugin, turned back into plain float linears (same numbers, faster forward)."""
    import copy
    import tempfile

    from baselines.rtn import RTN
    from speedq_core.method import QuantContext
    from speedq_core.quant import to_plain_linears

    quantized = copy.deepcopy(model)
    RTN().quantize(quantized, adapter, QuantContext(schemes=dict(schemes), out_dir=Path(tempfile.gettempdir())))
    to_plain_linears(quantized, dtype=torch.float32)
    return quantized.eval()


def parse_probe(probe: str) -> tuple[tuple[str, ...], Any]:
    """A ``--probe-rtn`` entry -> (components, QuantScheme): ``w2g16`` is the LLM, ``all:w2g16`` the
    ViT, projector and LLM. ValueError / SchemeError name the syntax."""
    from speedq_core.quant.scheme import QuantScheme

    scope, _, scheme = probe.rpartition(":")
    if scope not in ("", "all"):
        raise ValueError(f"--probe-rtn {probe!r}: write SCHEME (LLM) or all:SCHEME (ViT + projector + LLM)")
    return (VLM_COMPONENTS if scope else ("language",)), QuantScheme.parse(scheme)


def rtn_probe_copy(adapter: FamilyAdapter, model: nn.Module, probe: str) -> nn.Module:
    """:func:`rtn_copy` for a ``--probe-rtn`` entry (:func:`parse_probe`), group sizes capped to fit."""
    components, scheme = parse_probe(probe)
    return rtn_copy(adapter, model, capped_schemes(adapter, model, scheme, components))


def capped_schemes(adapter: FamilyAdapter, model: nn.Module, scheme: Any, components: Sequence[str]) -> dict[str, Any]:
    """``{component: scheme}`` with the group size capped at the component's narrowest linear input
    (a 64-wide tiny ViT takes w4g64 where the scheme says w4g128; bilevel schemes are kept)."""
    from speedq_core.quant.scheme import QuantScheme

    out = {}
    for component in components:
        narrowest = min((m.in_features for m in adapter.linears(model, component).values()), default=0)
        out[component] = scheme
        if not scheme.bilevel and narrowest and scheme.group_size > narrowest:
            out[component] = QuantScheme(bits=scheme.bits, group_size=narrowest)
    return out


def test_samples(n: int, data_seed: int = 0) -> list[Any]:
    """The first ``n`` samples of the TEST split (``SpeedqSynth_TEST`` is the first 700)."""
    return _samples("test", 0, n, data_seed)


# -- training -------------------------------------------------------------------------------------


def build_tiny(preset: str, seed: int, text_init_std: float | None = None) -> tuple[FamilyAdapter, nn.Module, Any]:
    adapter = adapter_for(preset)
    config = adapter.tiny_config()
    if text_init_std is not None:
        config.text_config.initializer_range = text_init_std
    seed_everything(seed)
    model = adapter.build_model(config, dtype=torch.float32)
    return adapter, model, adapter.tiny_processor(config)


def massive_channel_indices(hidden: int, channels: int, seed: int) -> list[int]:
    """The ``channels`` residual channels (of ``hidden``) that carry massive activations (seeded)."""
    return sorted(torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))[:channels].tolist())


@torch.no_grad()
def add_massive_activations(adapter: FamilyAdapter, model: nn.Module, channels: int, value: float,
                            seed: int, freeze_norms: bool = False) -> list[int]:
    """Set ``channels`` columns of the token embeddings and the same entries of the projector's last
    bias to ``value``, and freeze them (their gradients are zeroed); returns the channel indices."""
    embedding = model.get_input_embeddings()
    chosen = massive_channel_indices(embedding.weight.shape[1], channels, seed)
    projector = [m for m in adapter.linears(model, "projector").values() if m.out_features == embedding.weight.shape[1]]
    if not projector or projector[-1].bias is None:
        raise ValueError("massive activations need a projector whose last linear has a bias")
    bias = projector[-1].bias
    embedding.weight[:, chosen] = value
    bias[chosen] = value
    index = torch.tensor(chosen)

    def freeze_columns(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[..., index] = 0
        return grad

    embedding.weight.register_hook(freeze_columns)
    bias.register_hook(freeze_columns)
    if freeze_norms:  # the decoder norms cannot learn to shrink those channels away
        for _, block in adapter.blocks(model, "language"):
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[chosen] = 1.0
                norm.weight.register_hook(freeze_columns)
    return chosen


@torch.no_grad()
def plant_weight_outliers(adapter: FamilyAdapter, model: nn.Module, sigma: float, density: float,
                          components: Sequence[str], seed: int) -> int:
    """Set a seeded random ``density`` fraction of each linear weight ``W`` (out, in) of
    ``components`` to ``sign * sigma * std(W[row])`` (random sign) and freeze those entries (their
    gradients are zeroed, so AdamW without weight decay never moves them); returns how many."""
    generator = torch.Generator().manual_seed(seed + 7919)
    planted = 0
    for component in components:
        for _, linear in sorted(adapter.linears(model, component).items()):
            weight = linear.weight
            mask = torch.rand(weight.shape, generator=generator) < density
            sign = torch.where(torch.rand(weight.shape, generator=generator) < 0.5, -1.0, 1.0)
            row_std = weight.std(dim=1, keepdim=True)
            weight[mask] = (sign * sigma * row_std).expand_as(weight)[mask].to(weight.dtype)
            planted += int(mask.sum())

            def freeze(grad: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
                return grad.masked_fill(mask, 0.0)

            weight.register_hook(freeze)
    return planted


def load_init(model: nn.Module, folder: str | Path) -> None:
    """Load the model saved in ``folder`` (by ``--out``) into ``model`` (strict: same preset, same
    shapes; ``from_pretrained`` maps the saved key names onto the module's). The folder is checked
    by :func:`check_settings`."""
    saved = type(model).from_pretrained(str(folder), dtype=torch.float32)
    model.load_state_dict(saved.state_dict(), strict=True)


def check_settings(settings: TrainSettings) -> None:
    """ValueError naming the fix for settings that cannot train (checked before any model is built)."""
    if settings.text_init_std <= 0:
        raise ValueError(f"--text-init-std must be positive (transformers' default is 0.02), got {settings.text_init_std}")
    if not 0 <= settings.massive_channels <= 16:
        raise ValueError(f"--massive-channels must be between 0 and 16 (a few of the LLM's residual channels), "
                         f"got {settings.massive_channels}")
    if settings.outlier_sigma < 0 or not 0 < settings.outlier_density < 1:
        raise ValueError(f"--outlier-sigma must be >= 0 and --outlier-density in (0, 1), got "
                         f"{settings.outlier_sigma} and {settings.outlier_density}")
    unknown = set(settings.outlier_components) - set(VLM_COMPONENTS)
    if unknown:
        raise ValueError(f"--outlier-components: unknown {sorted(unknown)}; use vision, projector, language")
    from speedq_plugins.synthetic import CATEGORIES

    unknown = sorted(set(settings.categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"--categories: unknown {unknown}; use some of {', '.join(CATEGORIES)}")
    if settings.init_from and not (Path(settings.init_from) / "model.safetensors").is_file():
        raise ValueError(f"--init-from {settings.init_from}: no model.safetensors there (a folder written by --out)")
    for probe in settings.probe_rtn:
        parse_probe(probe)


def train_tiny(
    preset: str,
    settings: TrainSettings,
    out: str | Path | None = None,
    log: Any = None,
    command: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``preset`` with ``settings``; save to ``out`` (if given); return (model, log record).
    ``command`` is the command line recorded in the log (default: the minimal one)."""
    log = log or (lambda message: print(message, flush=True))
    check_settings(settings)
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    adapter, model, processor = build_tiny(preset, settings.seed, settings.text_init_std)
    if settings.massive_channels:
        add_massive_activations(adapter, model, settings.massive_channels, settings.massive_value, settings.seed,
                                settings.massive_freeze_norms)
    if settings.init_from:
        load_init(model, settings.init_from)
    if settings.outlier_sigma:
        n = plant_weight_outliers(adapter, model, settings.outlier_sigma, settings.outlier_density,
                                  settings.outlier_components, settings.seed)
        log(f"planted {n} frozen weight outliers at {settings.outlier_sigma} row stds")
    batch_at = make_batch_at(adapter, processor, settings)
    cfg = TrainConfig(
        steps=settings.steps, lr=settings.lr, weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps, schedule="cosine", grad_clip=settings.grad_clip,
        seed=settings.seed, betas=tuple(settings.betas),
    )
    probes = test_samples(settings.probe_samples, settings.data_seed) if settings.eval_every else []
    curve: list[dict[str, Any]] = []
    started = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        if settings.eval_every and (step + 1) % settings.eval_every == 0:
            acc = direct_accuracy(adapter, model, processor, probes)
            point = {"step": step + 1, "seconds": round(time.perf_counter() - started, 1), **acc}
            for scheme in settings.probe_rtn:
                copy_ = rtn_probe_copy(adapter, model, scheme)
                point[f"rtn/{scheme}"] = direct_accuracy(adapter, copy_, processor, probes)["Overall"]
            curve.append(point)
            cats = " ".join(f"{k}={v:.0f}" for k, v in point.items() if k not in ("step", "seconds"))
            log(f"step {step + 1} loss {loss:.4f} t={time.perf_counter() - started:.0f}s  {cats}")

    losses = train(model, batch_at, answer_loss, cfg, desc=f"train {preset}", on_step=on_step)
    wall = time.perf_counter() - started
    accuracy = direct_accuracy(adapter, model, processor, test_samples(settings.eval_samples, settings.data_seed))
    log(f"{preset}: {settings.steps} steps in {wall:.0f}s, test accuracy " +
        " ".join(f"{k}={v:.1f}" for k, v in accuracy.items()))
    record = {
        "preset": preset,
        "settings": asdict(settings),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_wall_seconds": round(wall, 1),
        "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "loss_every_50": [round(sum(losses[i:i + 50]) / len(losses[i:i + 50]), 4) for i in range(0, len(losses), 50)],
        "test_accuracy": {k: round(v, 2) for k, v in accuracy.items()},
        "test_samples": settings.eval_samples,
        "probe_curve": curve,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": command or f"python -m speedq_plugins.tiny_models.train --model {preset} --out <dir>",
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        (out / "train_log.json").write_text(json.dumps(record, indent=2) + "\n")
        log(f"saved {out}")
    return model, record


# -- command line ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(TRAINED_PRESETS))
    parser.add_argument("--out", help="folder for config.json + model.safetensors + train_log.json")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--categories", default="", help="comma-separated categories to train on, cycled in order; one listed twice is "
                        "asked twice as often (default: all seven, equally)")
    parser.add_argument("--text-init-std", type=float, default=defaults.text_init_std)
    parser.add_argument("--massive-channels", type=int, default=defaults.massive_channels)
    parser.add_argument("--massive-value", type=float, default=defaults.massive_value)
    parser.add_argument("--massive-freeze-norms", action="store_true")
    parser.add_argument("--outlier-sigma", type=float, default=defaults.outlier_sigma)
    parser.add_argument("--outlier-density", type=float, default=defaults.outlier_density)
    parser.add_argument("--outlier-components", default=",".join(defaults.outlier_components))
    parser.add_argument("--init-from", default="", help="start from this saved model folder")
    parser.add_argument("--probe-rtn", default="", help="comma-separated RTN schemes scored at each probe")
    args = parser.parse_args(argv)
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        seed=args.seed, threads=args.threads, eval_samples=args.eval_samples, eval_every=args.eval_every,
        categories=tuple(c for c in args.categories.split(",") if c),
        probe_rtn=tuple(c for c in args.probe_rtn.split(",") if c),
        text_init_std=args.text_init_std, massive_channels=args.massive_channels, massive_value=args.massive_value,
        massive_freeze_norms=args.massive_freeze_norms, outlier_sigma=args.outlier_sigma,
        outlier_density=args.outlier_density,
        outlier_components=tuple(c for c in args.outlier_components.split(",") if c), init_from=args.init_from,
    )
    from speedq_core.errors import SpeedqError

    try:
        check_settings(settings)
    except (ValueError, SpeedqError) as exc:
        parser.error(str(exc))
    argv = list(sys.argv[1:] if argv is None else argv)
    train_tiny(args.model, settings, args.out, command=shlex.join(["python", "-m", "speedq_plugins.tiny_models.train", *argv]))


if __name__ == "__main__":
    main()
