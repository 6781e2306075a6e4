"""RTN on the full-size InternVL3-1B architecture (random bf16 weights, CPU): time, peak memory, file sizes.

Run from the repository root (about 10 minutes on 2 cores, ~6 GiB of RAM, ~3 GiB of temporary disk):

    python benchmarks/bench_rtn_internvl3_1b.py            # all cases, table + benchmarks/results/rtn_internvl3_1b.json
    python benchmarks/bench_rtn_internvl3_1b.py --case w4  # one case, prints its JSON (what the parent runs)

Each case runs in its own process, so its peak RSS (``ru_maxrss``) is its own. A case builds the
``internvl3-1b`` preset (registry + adapter, seed 0, bf16), quantizes parts step by step with RTN and,
after each step, exports with ``save_quantized`` to a temporary directory and measures the bytes on
disk (all files: model.safetensors, quant_config.json, manifest.json):

    w4 / w2      SPEED-Q schemes w4g32g128 / w2g16g16
                 (a) vision + language linears (official SPEED-Q: projector, embeddings, lm_head bf16)
                 (b) + embeddings (QuantEmbedding) + lm_head       <- compare with Table 2's 485.0 / 315.0
                 (b+p) + projector                                  (every weight matrix quantized)
    llm4 / llm2  baselines' schemes w4g128 / w2g16
                 (c) language linears only ("Quantize LLM only")   <- Table 2's 941.7 / 853.1
                 (c+e) + embeddings + lm_head                      (what the paper's row must count)

Times: wall seconds and CPU seconds (``process_time``, all threads) of ``RTN.quantize``; the machine is
shared, so wall time can exceed CPU time / threads by a lot; CPU time is the steadier number.
Random weights do not change any size (every tensor's layout is fixed by its shape and scheme) and
barely change the time of RTN (min/max, round, pack). Weights are random, so no accuracy is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PRESET = "internvl3-1b"
MIB = 1 << 20
RESULTS = Path(__file__).parent / "results" / "rtn_internvl3_1b.json"
PAPER = {"bf16": 1789.5, "w4": 485.0, "w2": 315.0, "llm4": 941.7, "llm2": 853.1}
CASES = {
    "w4": ("w4g32g128", [("a", ["vision", "language"]), ("b", ["embeddings", "lm_head"]), ("b+p", ["projector"])]),
    "w2": ("w2g16g16", [("a", ["vision", "language"]), ("b", ["embeddings", "lm_head"]), ("b+p", ["projector"])]),
    "llm4": ("w4g128", [("c", ["language"]), ("c+e", ["embeddings", "lm_head"])]),
    "llm2": ("w2g16", [("c", ["language"]), ("c+e", ["embeddings", "lm_head"])]),
}


def rss_mib() -> float:
    """Current resident set size (from /proc: no psutil needed)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / MIB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def dir_bytes(path: Path) -> dict[str, int]:
    files = {p.name: p.stat().st_size for p in path.rglob("*") if p.is_file()}
    return {"total": sum(files.values()), "model.safetensors": files["model.safetensors"]}


def run_case(name: str) -> dict:
    """One case in this process: build, quantize step by step, export after each step."""
    from speedq_core.export import save_quantized
    from speedq_core.method import QuantContext
    from speedq_core.models import preset_config
    from speedq_core.plugins import get_plugins
    from speedq_core.quant import QuantScheme
    from speedq_core.registry import load_registry
    from speedq_core.size import size_report

    torch.set_num_threads(2)
    registry, plugins = load_registry(), get_plugins()
    preset = registry.model(PRESET)
    adapter, rtn = plugins.family(preset.family), plugins.method("rtn")
    scheme_name, steps = CASES[name]
    scheme = QuantScheme.parse(scheme_name)
    start = time.perf_counter()
    torch.manual_seed(0)
    model = adapter.build_model(preset_config(preset, adapter), dtype=torch.bfloat16)
    result = {"case": name, "scheme": scheme_name, "build_s": time.perf_counter() - start,
              "rss_after_build_mib": rss_mib(), "steps": []}
    parts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="speedq-bench-") as tmp:
        for label, new_parts in steps:
            parts += new_parts
            start, cpu = time.perf_counter(), time.process_time()
            rtn.quantize(model, adapter, QuantContext({p: scheme for p in new_parts}, Path(tmp)))
            rtn_s, rtn_cpu_s = time.perf_counter() - start, time.process_time() - cpu
            peak = peak_rss_mib()
            start = time.perf_counter()
            out = save_quantized(model, Path(tmp) / label, {"method": "rtn", "model": PRESET})
            export_s = time.perf_counter() - start
            size = size_report(model, adapter.part_of)
            on_disk = dir_bytes(out)
            result["steps"].append({
                "label": label, "parts": list(parts), "rtn_s": rtn_s, "rtn_cpu_s": rtn_cpu_s, "export_s": export_s,
                "peak_rss_mib_after_rtn": peak, "disk_bytes": on_disk["total"],
                "disk_mib": on_disk["total"] / MIB, "safetensors_mib": on_disk["model.safetensors"] / MIB,
                "components": {c.name: {"mib": c.mib, "bits_per_weight": c.bits_per_weight,
                                        "n_quantized": c.n_quantized} for c in size.components},
            })
            for path in out.iterdir():  # keep the disk footprint to one export at a time
                path.unlink()
    result["rtn_total_s"] = sum(s["rtn_s"] for s in result["steps"])
    result["rtn_total_cpu_s"] = sum(s["rtn_cpu_s"] for s in result["steps"])
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def paper_fit(counts: dict[str, int]) -> dict:
    """Arithmetic behind the explanations of Table 2 (sizes in MiB, counts from the meta model)."""
    from speedq_core.quant import QuantScheme

    def mib(n_weights: float, bits: float) -> float:
        return n_weights * bits / 8 / MIB

    bf16 = {part: mib(n, 16) for part, n in counts.items()}
    w4, w2 = QuantScheme.parse("w4g32g128"), QuantScheme.parse("w2g16g16")
    quantized = counts["vision_linear"] + counts["language_linear"] + counts["embeddings"] + counts["lm_head"]
    rest = bf16["total"] - mib(quantized, 16)
    # Convention that reproduces 485.0 / 315.0: zero points stored in 4 bits at both widths and the
    # second-level scale and offset in fp32 (the official code keeps them as float32 tensors).
    def paper_bits(s):
        return s.bits + (s.scale_bits + 4) / s.group_size + 2 * 32 / (s.group_size * s.scale_group_size)
    llm_all = counts["language_linear"] + counts["embeddings"] + counts["lm_head"]
    llm_rest = bf16["total"] - mib(llm_all, 16)
    return {
        "bf16_mib": bf16["total"],
        "speedq_ours_bits": {"w4g32g128": w4.bits_per_weight(), "w2g16g16": w2.bits_per_weight()},
        "speedq_paper_convention_bits": {"w4g32g128": paper_bits(w4), "w2g16g16": paper_bits(w2)},
        "speedq_paper_convention_mib": {"w4": rest + mib(quantized, paper_bits(w4)),
                                        "w2": rest + mib(quantized, paper_bits(w2))},
        "llm_only_decoder_linears_mib": {
            "w4g128": bf16["total"] - mib(counts["language_linear"], 16 - 4.25),
            "w2g16": bf16["total"] - mib(counts["language_linear"], 16 - 3.125)},
        "llm_only_whole_llm_mib": {"w4g128 (4.25 bits)": llm_rest + mib(llm_all, 4.25),
                                   "w2g16 (3.125 bits)": llm_rest + mib(llm_all, 3.125)},
        # Solve S = BF16 - L_bf16 * (1 - b/16) for the bf16 MiB L that the paper's LLM-only rows replace.
        "llm_only_implied_bf16_mib_replaced": {
            "w4g128 at 4.25 bits": (PAPER["bf16"] - PAPER["llm4"]) / (1 - 4.25 / 16),
            "w2g16 at 3.125 bits": (PAPER["bf16"] - PAPER["llm2"]) / (1 - 3.125 / 16),
            "whole LLM (decoder + embeddings + lm_head)": bf16["language_linear"] + bf16["embeddings"]
            + bf16["lm_head"],
            "decoder linears only": bf16["language_linear"]},
    }


def meta_counts() -> dict[str, int]:
    from speedq_core.models import build_on_meta, parameter_counts
    from speedq_core.plugins import get_plugins
    from speedq_core.registry import load_registry

    preset = load_registry().model(PRESET)
    adapter = get_plugins().family(preset.family)
    model = build_on_meta(preset, adapter)
    counts = parameter_counts(model, adapter)
    for part in ("vision", "projector", "language"):
        counts[f"{part}_linear"] = sum(m.weight.numel() for m in adapter.linears(model, part).values())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process and print its JSON")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    cases = {}
    for name in CASES:
        print(f"running {name} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True, check=True)
        cases[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    counts = meta_counts()
    fit = paper_fit(counts)
    rows = [("BF16", "-", "-", fit["bf16_mib"], PAPER["bf16"])]
    for name, step_paper in (("w4", {"b": "w4"}), ("w2", {"b": "w2"}), ("llm4", {"c": "llm4", "c+e": "llm4"}),
                             ("llm2", {"c": "llm2", "c+e": "llm2"})):
        for step in cases[name]["steps"]:
            paper = PAPER.get(step_paper.get(step["label"], ""), None)
            rows.append((cases[name]["scheme"], step["label"], "+".join(step["parts"]), step["disk_mib"], paper))
    print("\nInternVL3-1B, RTN, file size on disk (MiB) vs the paper's Table 2")
    print(f"{'scheme':<10} {'step':<5} {'quantized parts':<52} {'ours':>8} {'paper':>8}")
    for scheme, label, parts, ours, paper in rows:
        print(f"{scheme:<10} {label:<5} {parts:<52} {ours:8.1f} {'' if paper is None else f'{paper:8.1f}'}")
    print(f"\n{'case':<6} {'scheme':<10} {'build s':>8} {'RTN wall s':>11} {'RTN CPU s':>10} {'peak RSS MiB':>13} "
          f"{'RSS after build':>16}")
    for name, case in cases.items():
        print(f"{name:<6} {case['scheme']:<10} {case['build_s']:8.1f} {case['rtn_total_s']:11.1f} "
              f"{case['rtn_total_cpu_s']:10.1f} {case['peak_rss_mib']:13.0f} {case['rss_after_build_mib']:16.0f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "threads": 2, "preset": PRESET, "weights": "random, seed 0, bf16",
            "load_average_1m_at_end": os.getloadavg()[0], "cpus": os.cpu_count()}
    RESULTS.write_text(json.dumps({"info": info, "paper": PAPER, "parameter_counts": counts, "analysis": fit,
                                   "cases": cases}, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
