"""The paper's Table 1 (and Table 5 ablations) in miniature, on the embedded tiny model.

    python benchmarks/bench_table1_tiny.py [--model tiny-internvl] [--work /tmp/speedq-table1]

Runs ``speedq compare`` in-process: the float reference, RTN / GPTQ / AWQ / MBQ at their schemes
(w4g128, w2g16; LLM only, as in the paper) and SPEED-Q (w4g32g128, w2g16g16; ViT + LLM) at 4 and 2
bits, plus SPEED-Q's loss and joint-quantization ablations, each evaluated through VLMEvalKit on the
synthetic test split. The run directories (with their checkpoints) stay in ``--work``; the reports
(compare.json, compare.md, CSVs, figure1.png) are copied to ``benchmarks/results/table1_<model>/``.
Rerunning reuses finished cells. Also writes the wall time per cell.

``--seeds 42,1,2`` repeats the main cells (no ablations) at the other seeds (calibration/training
sample choice and training order) in ``--work/<model>/seed-<s>`` and writes ``seeds.json`` / prints
each cell's score per seed with mean, min and max: one 2-bit SPEED-Q cell moves by +-2 points with
the seed or the thread count.
"""
from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--seeds", default="42", help="comma list; the first is the main table's seed")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    registry, plugins = load_registry(), get_plugins()
    bits = tuple(int(b) for b in args.bits.split(","))
    plan = plan_compare(registry, plugins, args.model, METHODS, bits, ("synthetic",),
                        ablations=not args.no_ablations, seed=seeds[0])
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
    if len(seeds) > 1:
        repeat_seeds(registry, plugins, args.model, bits, seeds, work, out)


def repeat_seeds(registry, plugins, model: str, bits: tuple[int, ...], seeds: list[int], work: Path,
                 out: Path) -> None:
    """The main cells at every seed: ``{cell: {"scores": {seed: Avg}, "mean", "min", "max"}}``."""
    per_seed = {seeds[0]: json.loads((work / "compare.json").read_text())}
    for seed in seeds[1:]:
        plan = plan_compare(registry, plugins, model, METHODS, bits, ("synthetic",), seed=seed)
        run_compare(plan, work / f"seed-{seed}", registry, plugins, progress=lambda msg: print(msg, flush=True))
        per_seed[seed] = json.loads((work / f"seed-{seed}" / "compare.json").read_text())
    table: dict[str, dict] = {}
    for seed, doc in per_seed.items():
        for cell in doc["cells"]:
            if cell["role"] != "ablation":
                table.setdefault(f"{cell['name']} {cell['bits']}-bit", {"scores": {}})["scores"][seed] = cell["avg"]
    for row in table.values():
        values = list(row["scores"].values())
        row.update(mean=round(sum(values) / len(values), 2), min=min(values), max=max(values))
    (out / "seeds.json").write_text(json.dumps({"model": model, "seeds": seeds, "cells": table}, indent=2) + "\n")
    print(f"{'cell':<16}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds) + f"{'mean':>8}{'min':>7}{'max':>7}")
    for name, row in table.items():
        print(f"{name:<16}" + "".join(f"{row['scores'].get(s, float('nan')):>9.1f}" for s in seeds)
              + f"{row['mean']:>8.1f}{row['min']:>7.1f}{row['max']:>7.1f}")


if __name__ == "__main__":
    main()
