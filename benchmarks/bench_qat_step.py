"""Stage-3 training step: fake-quantized LLM vs the same step in float, side by side in one run.

    python benchmarks/bench_qat_step.py [--model tiny-internvl] [--steps 20] [--batch 8]

One AdamW step = forward + answer CE + backward + update on a batch of synthetic training samples,
for the model as it is (float32 on CPU), and with every LLM linear swapped to a FakeQuantLinear
(w4g32g128 and w2g16g16: scales recomputed each forward, masked STE, as SPEED-Q's QAT). Prints the
median step time of each and the ratio to float; writes results/qat_step.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from speedq_core.models import load_model
from speedq_core.plugins import get_plugins
from speedq_core.quant import FakeQuantLinear, swap_linears
from speedq_core.registry import load_registry
from speedq_core.training.losses import answer_ce

RESULTS = Path(__file__).resolve().parent / "results"


def step_times(model, inputs, steps: int) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        loss = answer_ce(model(**inputs.model_kwargs()).logits, inputs.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-internvl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    registry, plugins = load_registry(), get_plugins()
    preset = registry.model(args.model)
    loaded = load_model(preset, plugins.family(preset.family))
    samples = list(plugins.benchmarks["SpeedqSynth_TRAIN"].obj.samples(args.batch, 0))
    images, prompts, answers = zip(*samples)
    inputs = loaded.adapter.build_inputs(loaded.processor, list(images), list(prompts), list(answers))
    rows = {"float": statistics.median(step_times(copy.deepcopy(loaded.model), inputs, args.steps))}
    for scheme_name in ("w4g32g128", "w2g16g16"):
        scheme = registry.scheme(scheme_name)
        model = copy.deepcopy(loaded.model)
        names = list(loaded.adapter.linears(model, "language"))
        swap_linears(model, names, lambda name, linear: FakeQuantLinear.from_linear(linear, scheme))
        rows[scheme_name] = statistics.median(step_times(model, inputs, args.steps))
    print(f"{args.model}, batch {args.batch}, median of {args.steps} steps (CPU, 2 threads)")
    for name, seconds in rows.items():
        print(f"  {name:10} {seconds * 1000:8.1f} ms   x{seconds / rows['float']:.2f}")
    RESULTS.mkdir(exist_ok=True)
    data = {"model": args.model, "batch": args.batch, "steps": args.steps, "device": "cpu, 2 threads",
            "median_step_s": rows, "ratio_to_float": {k: v / rows["float"] for k, v in rows.items()}}
    (RESULTS / "qat_step.json").write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
