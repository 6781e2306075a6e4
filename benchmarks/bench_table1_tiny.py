"""The paper's Table 1 (and Table 5 ablations) in miniature, on the embedded tiny model.

    python benchmarks/bench_table1_tiny.py [--model tiny-internvl] [--work /tmp/speedq-table1]

Runs ``speedq compare`` in-process: the float reference, RTN / GPTQ / AWQ / MBQ at their schemes
(w4g128, w2g16; LLM only, as in the paper) and SPEED-Q (w4g32g128, w2g16g16; ViT + LLM) at 4 and 2
bits, plus SPEED-Q's loss and joint-quantization ablations, each evaluated through VLMEvalKit on the
synthetic test split. The run directories (with their checkpoints) stay in ``--work``; the reports
(compare.json, compare.md, CSVs, figure1.png) are copied to ``benchmarks/results/table1_<model>/``.
Rerunning reuses finished cells. Also writes the wall time per cell.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from speedq_core.compare import plan_compare, run_compare
from speedq_core.plugins import get_plugins
from speedq_core.registry import load_registry

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("rtn", "gptq", "awq", "mbq", "speedq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-internvl")
    parser.add_argument("--work", default="/tmp/speedq-table1")
    parser.add_argument("--bits", default="4,2")
    parser.add_argument("--no-ablations", action="store_true")
    args = parser.parse_args()
    registry, plugins = load_registry(), get_plugins()
    bits = tuple(int(b) for b in args.bits.split(","))
    plan = plan_compare(registry, plugins, args.model, METHODS, bits, ("synthetic",),
                        ablations=not args.no_ablations)
    work = Path(args.work) / args.model
    started = time.perf_counter()
    run_compare(plan, work, registry, plugins, progress=lambda msg: print(msg, flush=True))
    print(f"compare wall time: {time.perf_counter() - started:.0f} s")
    out = RESULTS / f"table1_{args.model}"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("compare.json", "compare.md", "table1.csv", "table2.csv", "table5.csv", "figure1.png"):
        if (work / name).is_file():
            shutil.copy2(work / name, out / name)
    print((out / "compare.md").read_text())


if __name__ == "__main__":
    main()
