"""Calibration-based methods on the full-size InternVL3-1B LLM: wall time and peak memory.

    python benchmarks/bench_calibration_memory.py [--methods rtn,gptq,awq] [--samples 16] [--tokens 256]

The ``internvl3-1b`` preset (registry architecture, random bf16 weights, seed 0) quantized LLM-only at
w4g128 by each method, each in its own process so ``ru_maxrss`` is that method's peak. Calibration is
text-only (``samples`` x ``tokens`` random token ids, fed as ready batches: no tokenizer or image
needed), so MBQ would reduce to AWQ and is left out. The claim checked: peak RSS stays near
model + one block's activations, because the calibration engine runs the LLM block by block.
Prints a table and writes results/calibration_memory.json (rows of methods not rerun are kept).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20


def child(method: str, samples: int, tokens: int) -> dict:
    import torch

    from speedq_core.method import QuantContext
    from speedq_core.models import preset_config
    from speedq_core.plugins import get_plugins
    from speedq_core.registry import load_registry

    torch.set_num_threads(2)
    torch.manual_seed(0)
    registry, plugins = load_registry(), get_plugins()
    preset = registry.model("internvl3-1b")
    adapter = plugins.family(preset.family)
    model = adapter.build_model(preset_config(preset, adapter), dtype=torch.bfloat16)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = model.config.text_config.vocab_size
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, vocab, (1, tokens), generator=gen),
                "attention_mask": torch.ones(1, tokens, dtype=torch.long)} for _ in range(samples)]
    ctx = QuantContext({"language": registry.scheme("w4g128")}, Path("/tmp"), calibration=batches)
    start = time.perf_counter()
    plugins.method(method).quantize(model, adapter, ctx)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hidden = model.config.text_config.hidden_size
    inter = model.config.text_config.intermediate_size
    # one block's calibration activations: its inputs and outputs (bf16) plus the widest linear input
    block_acts = samples * tokens * (2 * hidden + inter) * 2
    return {"method": method, "wall_s": round(wall, 1), "peak_rss_mib": round(peak / MIB),
            "rss_after_build_mib": round(rss_model / MIB), "model_mib": round(params / MIB),
            "one_block_activations_mib": round(block_acts / MIB, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="rtn,gptq,awq")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.samples, args.tokens)))
        return
    rows = []
    for method in args.methods.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", method, "--samples", str(args.samples),
                              "--tokens", str(args.tokens)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"{'method':8} {'wall s':>8} {'peak RSS MiB':>13} {'after build':>12} {'weights':>8} {'1 block acts':>13}")
    for r in rows:
        print(f"{r['method']:8} {r['wall_s']:8} {r['peak_rss_mib']:13} {r['rss_after_build_mib']:12} "
              f"{r['model_mib']:8} {r['one_block_activations_mib']:13}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "calibration_memory.json"
    calibration = f"{args.samples} x {args.tokens} tokens, text only"
    if path.is_file():  # rows of methods not rerun now are kept when the calibration matches
        old = json.loads(path.read_text())
        if old.get("calibration") == calibration:
            rerun = {r["method"] for r in rows}
            rows = [r for r in old["rows"] if r["method"] not in rerun] + rows
    data = {"model": "internvl3-1b (random bf16)", "scheme": "w4g128", "components": ["language"],
            "calibration": calibration, "rows": rows}
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
