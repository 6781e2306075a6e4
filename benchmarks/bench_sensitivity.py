"""Quantization sensitivity of the shipped tiny models: RTN at 8/4/3/2 bits, LLM only and whole model.

    python benchmarks/bench_sensitivity.py [--samples 700] [--models tiny-internvl,tiny-qwen2-vl,tiny-llava]
                                           [--vlmeval] [--out benchmarks/results/sensitivity.json]

For each trained tiny preset (weights loaded through ``speedq_core.models.load_model``) it scores the
float model and RTN-quantized copies (``baselines.rtn``, the registry's default RTN schemes
w8g128 / w4g128 / w3g64 / w2g16) on the synthetic TEST split with the in-process greedy first-token
accuracy (:func:`speedq_plugins.tiny_models.direct_accuracy`; 700 samples = all of SpeedqSynth_TEST).
Two component sets: ``language`` (the baselines' default) and ``vision+projector+language`` (the
64-wide tiny ViT and projector take group size 64 where the scheme says 128). Also the noise
tolerance curve: accuracy after Gaussian noise of ``r`` times each weight's std is added to the LLM
linears (and lm_head), next to RTN's own relative weight error per scheme, which says how much noise
each bit width adds and how much the model can take.
``--vlmeval`` also scores the float and BF16 models through VLMEvalKit (``speedq_core.evaluate``).
Prints a table and writes the JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ("w8g128", "w4g128", "w3g64", "w2g16")
NOISE_RATIOS = (0.1, 0.35, 0.7, 1.0, 1.5)
COMPONENT_SETS = {"llm": ("language",), "whole": ("vision", "projector", "language")}


def rtn_copy(model, adapter, registry, scheme_name: str, components) -> torch.nn.Module:
    """The tiny-model trainer's :func:`~speedq_plugins.tiny_models.train.rtn_copy` of ``components``
    at ``scheme_name``, the group size capped at each component's width (64 for the tiny ViT)."""
    from speedq_plugins.tiny_models.train import capped_schemes
    from speedq_plugins.tiny_models.train import rtn_copy as quantized_copy

    return quantized_copy(adapter, model, capped_schemes(adapter, model, registry.scheme(scheme_name), components))


def relative_weight_error(model, adapter, scheme_name: str, registry) -> float:
    """``||W - RTN(W)|| / ||W||`` pooled over the LLM's linears: the weight noise RTN adds."""
    from speedq_core.quant import quantize_weight

    scheme = registry.scheme(scheme_name)
    num = den = 0.0
    for linear in adapter.linears(model, "language").values():
        w = linear.weight.data.float()
        num += float((w - quantize_weight(w, scheme).dequantize(torch.float32)).pow(2).sum())
        den += float(w.pow(2).sum())
    return (num / den) ** 0.5


def weight_kurtosis(model, adapter, component: str = "language") -> float:
    """Mean over ``component``'s linears of the kurtosis ``E[(w - mu)^4] / sigma^4`` of each weight
    (3 for a Gaussian; heavy-tailed weights, as in trained LLMs, score far higher)."""
    values = []
    for linear in adapter.linears(model, component).values():
        w = linear.weight.data.float().flatten()
        centred = w - w.mean()
        values.append(float(centred.pow(4).mean() / centred.pow(2).mean().pow(2)))
    return sum(values) / len(values)


def noisy_copy(model, adapter, ratio: float, head: bool, seed: int = 0) -> torch.nn.Module:
    """A copy whose LLM linears (and ``lm_head`` when ``head``) get ``W += N(0, (ratio * std(W))^2)``:
    the noise tolerance curve that RTN's relative weight error is read against."""
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    targets = list(adapter.linears(noisy, "language").values())
    if head:
        targets.append(noisy.get_submodule(adapter.lm_head_path))
    with torch.no_grad():
        for linear in targets:
            w = linear.weight
            w.add_(torch.randn(w.shape, generator=generator) * w.std() * ratio)
    return noisy.eval()


def vlmeval_overall(adapter, model, processor, name: str) -> float | None:
    try:
        from speedq_core.evaluate import evaluate
        from speedq_plugins.synthetic import benchmark_generators
    except ImportError as exc:  # evaluation bridge or VLMEvalKit missing
        print(f"(VLMEvalKit scoring skipped: {exc})", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        scores = evaluate(adapter, model, processor, ["SpeedqSynth_TEST"], Path(tmp) / "work", name,
                          lmudata=Path(tmp) / "lmu", generators=benchmark_generators())
    return scores["SpeedqSynth_TEST"]["Overall"]


def _cell(score) -> str:
    return f"{score:>7.1f}" if score is not None else f"{'n/a':>7}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny-internvl,tiny-qwen2-vl,tiny-llava")
    parser.add_argument("--samples", type=int, default=700)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vlmeval", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sensitivity.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from speedq_core.errors import SchemeError
    from speedq_core.models import load_model
    from speedq_core.registry import load_registry
    from speedq_plugins.tiny_models import adapter_for, direct_accuracy
    from speedq_plugins.tiny_models.train import test_samples

    registry = load_registry()
    samples = test_samples(args.samples)
    results: dict = {"samples": args.samples, "metric": "greedy first-token accuracy (%) on SpeedqSynth_TEST",
                     "chance": 25.0, "method": "rtn", "models": {}}
    for name in [m for m in args.models.split(",") if m]:
        preset = registry.model(name)
        if not preset.weights:
            print(f"{name}: no trained weights shipped (registry.toml has no `weights` line): skipped",
                  file=sys.stderr)
            continue
        loaded = load_model(preset, adapter_for(name))
        adapter, model, processor = loaded.adapter, loaded.model, loaded.processor
        started = time.perf_counter()
        row: dict = {"source": loaded.source, "float": direct_accuracy(adapter, model, processor, samples)}
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        row["bf16"] = direct_accuracy(adapter, bf16, processor, samples)
        if args.vlmeval:  # the bar: the BF16 model scored by VLMEvalKit itself
            row["vlmeval_float_overall"] = vlmeval_overall(adapter, model, processor, name)
            row["vlmeval_bf16_overall"] = vlmeval_overall(adapter, bf16, processor, f"{name}-bf16")
        del bf16
        for key, components in COMPONENT_SETS.items():
            for scheme in SCHEMES:
                try:
                    quantized = rtn_copy(model, adapter, registry, scheme, components)
                except SchemeError as exc:  # a scheme a component cannot take
                    row[f"{key}/{scheme}"] = {"Overall": None, "error": str(exc)}
                    print(f"  {name} {key}/{scheme}: not applicable ({exc})", file=sys.stderr)
                    continue
                row[f"{key}/{scheme}"] = direct_accuracy(adapter, quantized, processor, samples)
                del quantized
                print(f"  {name} {key}/{scheme}: {row[f'{key}/{scheme}']['Overall']:.1f}", file=sys.stderr)
        row["rtn_relative_weight_error"] = {s: round(relative_weight_error(model, adapter, s, registry), 4)
                                            for s in SCHEMES}
        row["weight_kurtosis"] = {c: round(weight_kurtosis(model, adapter, c), 2) for c in ("vision", "language")}
        for head in (False, True):
            key = "noise/llm+head" if head else "noise/llm"
            row[key] = {str(r): direct_accuracy(adapter, noisy_copy(model, adapter, r, head), processor, samples)["Overall"]
                        for r in NOISE_RATIOS}
        row["seconds"] = round(time.perf_counter() - started, 1)
        results["models"][name] = row

    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


def print_table(results: dict) -> None:
    head = f"{'model':<15} {'components':<8} {'float':>6} {'bf16':>6} " + " ".join(f"{s:>7}" for s in SCHEMES)
    print(f"RTN sensitivity, {results['metric']}, {results['samples']} samples (chance 25)")
    print(head)
    print("-" * len(head))
    for name, row in results["models"].items():
        for key in COMPONENT_SETS:
            cells = " ".join(_cell(row[f"{key}/{s}"]["Overall"]) for s in SCHEMES)
            print(f"{name:<15} {key:<8} {row['float']['Overall']:>6.1f} {row['bf16']['Overall']:>6.1f} {cells}")
        if row.get("vlmeval_float_overall") is not None:
            print(f"{name:<15} VLMEvalKit: float {row['vlmeval_float_overall']:.1f}, "
                  f"bf16 {row['vlmeval_bf16_overall']:.1f}")
    for name, row in results["models"].items():
        errors = " ".join(f"{s}={e:.3f}" for s, e in row["rtn_relative_weight_error"].items())
        print(f"\n{name}: RTN relative weight error of the LLM linears: {errors}")
        for key in ("noise/llm", "noise/llm+head"):
            cells = " ".join(f"r={r}: {v:.1f}" for r, v in row[key].items())
            print(f"  Gaussian weight noise W += N(0, (r std W)^2), {key[6:]}: {cells}")
    # per-category view of the float model and the 2-bit LLM-only model
    for name, row in results["models"].items():
        cats = [c for c in row["float"] if c != "Overall"]
        print(f"\n{name} per category: " + " ".join(f"{c:>8}" for c in cats))
        for key in ("float", "llm/w4g128", "llm/w2g16", "whole/w2g16"):
            if row[key].get("Overall") is not None:
                print(f"  {key:<13}" + " " * 13 + " ".join(f"{row[key][c]:>8.0f}" for c in cats))


if __name__ == "__main__":
    main()
