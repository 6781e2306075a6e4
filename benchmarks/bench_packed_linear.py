"""Packed ``QuantLinear`` vs the bf16 ``nn.Linear`` at InternVL3-1B shapes: time and weight memory.

Run from the repository root (about 2 minutes on 2 cores):

    python benchmarks/bench_packed_linear.py [--repeats 25]

For each shape (in -> out) of InternVL3-1B (896 -> 4864 LLM gate/up, 4864 -> 896 LLM down, 1024 -> 4096
ViT fc1), batch 1 and batch 512 (bf16 activations), and scheme w4g32g128 / w2g16g16, it times, side by
side in one loop (the median of ``--repeats`` rounds, each round running every variant once):

    bf16      nn.Linear with the bf16 weight w_hat (the reference)
    packed    QuantLinear.forward: unpack codes/zeros/scale codes, dequantize (float32), cast, F.linear
    cached    F.linear with a dequantized bf16 weight cached once (what a "dequantize once per batch >=
              threshold" cache would cost per call; the one-off dequantization is reported as ``dequant_ms``)

and reports time ratios of the medians (the minimum of each is kept in the JSON: on a shared machine
the minimum is the less disturbed number) packed/bf16 and cached/bf16, plus the weight memory ratio: bytes of the
QuantLinear's buffers over the bf16 weight's, which must equal ``scheme.bits_per_weight() / 16``
(checked; bias-free linears). A cache adds a full bf16 weight (ratio + 1.0) for as long as it lives.
Writes ``benchmarks/results/packed_linear.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from speedq_core.quant import QuantLinear, QuantScheme, quantize_weight

SHAPES = [(896, 4864), (4864, 896), (1024, 4096)]  # (in, out)
BATCHES = [1, 512]
SCHEMES = ["w4g32g128", "w2g16g16"]
RESULTS = Path(__file__).parent / "results" / "packed_linear.json"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def buffer_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


@torch.inference_mode()
def bench(in_features: int, out_features: int, scheme: QuantScheme, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    quant = QuantLinear.from_linear(linear, quantize_weight(linear.weight, scheme))
    reference = quant.to_linear(torch.bfloat16)  # same w_hat in bf16: outputs comparable
    memory_ratio = buffer_bytes(quant) / (linear.weight.numel() * 2)
    assert memory_ratio == scheme.bits_per_weight() / 16, (memory_ratio, scheme.bits_per_weight() / 16)
    dequant_ms = statistics.median(timed(lambda: quant.qweight.dequantize(torch.bfloat16)) for _ in range(3))
    cache = quant.qweight.dequantize(torch.bfloat16)
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, in_features, dtype=torch.bfloat16)
        assert torch.equal(quant(x), reference(x)) and torch.equal(F.linear(x, cache), reference(x))
        times = {"bf16": [], "packed": [], "cached": []}
        for _ in range(repeats):
            times["bf16"].append(timed(lambda: reference(x)))
            times["packed"].append(timed(lambda: quant(x)))
            times["cached"].append(timed(lambda: F.linear(x, cache)))
        median = {k: statistics.median(v) for k, v in times.items()}
        rows.append({
            "shape": f"{in_features}->{out_features}", "batch": batch, "scheme": scheme.name,
            "bf16_ms": median["bf16"], "packed_ms": median["packed"], "cached_ms": median["cached"],
            "packed_over_bf16": median["packed"] / median["bf16"], "cached_over_bf16": median["cached"] / median["bf16"],
            "min_ms": {k: min(v) for k, v in times.items()},
            "dequant_ms": dequant_ms, "weight_memory_ratio": memory_ratio,
            "bits_per_weight_over_16": scheme.bits_per_weight() / 16,
            "cached_memory_ratio": memory_ratio + 1.0,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [row for name in SCHEMES for in_f, out_f in SHAPES
            for row in bench(in_f, out_f, QuantScheme.parse(name), args.repeats)]
    header = (f"{'shape':<11} {'batch':>5} {'scheme':<10} {'bf16 ms':>8} {'packed ms':>10} {'cached ms':>10} "
              f"{'packed/bf16':>11} {'cached/bf16':>11} {'dequant ms':>10} {'mem ratio':>9} {'bpw/16':>7}")
    print(header)
    for r in rows:
        print(f"{r['shape']:<11} {r['batch']:>5} {r['scheme']:<10} {r['bf16_ms']:8.2f} {r['packed_ms']:10.2f} "
              f"{r['cached_ms']:10.2f} {r['packed_over_bf16']:11.1f} {r['cached_over_bf16']:11.2f} "
              f"{r['dequant_ms']:10.1f} {r['weight_memory_ratio']:9.4f} {r['bits_per_weight_over_16']:7.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "threads": 2, "repeats": args.repeats, "cpus": os.cpu_count(),
            "load_average_1m_at_end": os.getloadavg()[0]}
    RESULTS.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
