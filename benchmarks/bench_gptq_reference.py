"""GPTQ: ours (baselines/gptq.py) against a reference implementation on the same layer, inputs and scheme.

Reference: vllm-project/llm-compressor's ``llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight``
(CPU-capable; ``pip install --no-deps llmcompressor compressed-tensors loguru``), with its group
parameters from compressed-tensors' ``calculate_qparams`` on the original weight's group min/max (what
its min-max observer gives; llm-compressor fixes the group parameters before the GPTQ loop, while
ours — like IST-DASLab/gptq — computes each group's parameters from the error-updated weights when
the group starts, and stores scales in fp16).

Layer: ``W`` 4864x896 (a Qwen2-0.5B ``up_proj`` shape) = Gaussian + a rank-16 component; calibration
``X`` = 16 sequences x 256 tokens, rank-8 correlated with three large channels. Both methods get the
same Hessian ``H = 2 X^T X / n``, ``damp = 0.01``, block size 128, no act-order. Reported: relative
output error ``||X (W - W_hat)^T||^2 / ||X W^T||^2`` (RTN for scale), ours/reference error ratio
(acceptance: within 2%), and wall time of the quantization call (Hessian excluded), best of
``--repeats``, measured side by side in one process.

    python benchmarks/bench_gptq_reference.py [--threads 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from baselines.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from speedq_core.quant import QuantScheme, quantize_weight

OUT = Path(__file__).parent / "results" / "gptq_reference.json"
OUTLIERS = (3, 17, 40)


def layer(seed: int = 0, out_features: int = 4864, in_features: int = 896, tokens: int = 16 * 256):
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(out_features, in_features, generator=g)
    w += 0.005 * torch.randn(out_features, 16, generator=g) @ torch.randn(16, in_features, generator=g)
    x = torch.randn(tokens, 8, generator=g) @ torch.randn(8, in_features, generator=g) / 8 ** 0.5
    x += 0.1 * torch.randn(tokens, in_features, generator=g)
    x[:, list(OUTLIERS)] *= 15
    return w, x


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w - w_hat).t()).pow(2).sum() / (x @ w.t()).pow(2).sum())


def reference_gptq(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight as llmc_quantize_weight

    args = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=False, strategy="group",
                            group_size=scheme.group_size)
    groups = w.reshape(w.shape[0], -1, scheme.group_size)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)

    def run():
        w_hat, _, _ = llmc_quantize_weight(w.clone()[None], h.clone()[None], scale[None], zero[None], None, args,
                                           blocksize=128, percdamp=0.01)
        return w_hat[0]
    return run


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    w, x = layer()
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    h = acc.hessian()
    rows = []
    for name in ("w4g128", "w2g16"):
        scheme = QuantScheme.parse(name)
        (ours, _), t_ours = timed(lambda: gptq_quantize(w, h, scheme, GPTQConfig()), args.repeats)
        ref, t_ref = timed(reference_gptq(w, h, scheme), args.repeats)
        err_ours = relative_error(w, ours.dequantize(), x)
        err_ref = relative_error(w, ref, x)
        err_rtn = relative_error(w, quantize_weight(w, scheme).dequantize(), x)
        row = {"scheme": name, "error_ours": err_ours, "error_reference": err_ref, "error_rtn": err_rtn,
               "error_ratio": err_ours / err_ref, "within_2pct": err_ours <= 1.02 * err_ref,
               "seconds_ours": t_ours, "seconds_reference": t_ref, "time_ratio": t_ours / t_ref}
        rows.append(row)
        print(f"{name}: rel. output error ours {err_ours:.5f}  reference {err_ref:.5f}  rtn {err_rtn:.5f}  "
              f"(ours/ref {row['error_ratio']:.3f})  time ours {t_ours:.2f}s  ref {t_ref:.2f}s  "
              f"(ours/ref {row['time_ratio']:.2f})")
    import llmcompressor

    result = {"layer": {"out": w.shape[0], "in": w.shape[1], "tokens": x.shape[0]},
              "reference": f"llmcompressor {llmcompressor.__version__} gptq_quantize.quantize_weight",
              "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads",
              "torch": torch.__version__, "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
