"""Human-readable summaries of a run: a rich table for the terminal and report.md for the run dir.

Machines read results.json; these renderers only format it.
"""
from __future__ import annotations

from typing import Any

from rich.table import Table


def _score_columns(scores: dict[str, dict[str, float]]) -> list[tuple[str, float]]:
    cols = [(name, s["Overall"]) for name, s in scores.items()]
    if cols:
        cols.append(("Avg", sum(v for _, v in cols) / len(cols)))
    return cols


def size_summary(size: dict[str, Any]) -> tuple[float, float]:
    """(file MiB on disk, bits per weight over the parts that hold quantized weights) of size.json."""
    parts = [c for c in size["components"] if c["n_quantized"]]
    n = sum(c["n_weights"] for c in parts)
    bits = 8 * sum(c["nbytes"] for c in parts) / n if n else 16.0
    return (size["export_bytes"] or size["nbytes"]) / 2**20, bits


def render_run(results: dict[str, Any]) -> Table:
    """One row: the run's label, scheme per part, file size, bits/weight and benchmark scores."""
    config = results["config"]
    size = results["size"]
    cols = _score_columns(results.get("scores", {}))
    table = Table(title=f"{config['model']} · {config['method']} · {config['bits']}-bit")
    for col in ("schemes", "file MiB", "bits/weight (quantized parts)", *[c for c, _ in cols]):
        table.add_column(col, justify="right")
    schemes = ", ".join(f"{p}: {s}" for p, s in config["schemes"].items())
    mib, bits = size_summary(size)
    table.add_row(schemes, f"{mib:.2f}", f"{bits:.3f}", *[f"{v:.2f}" for _, v in cols])
    return table


def run_report_md(results: dict[str, Any]) -> str:
    """report.md of one run."""
    config, size = results["config"], results["size"]
    lines = [f"# {config['model']} · {config['method']} · {config['bits']}-bit", ""]
    lines += ["| part | scheme |", "| --- | --- |"]
    lines += [f"| {p} | {s} |" for p, s in config["schemes"].items()]
    mib, bits = size_summary(size)
    lines += ["", f"File size: {mib:.2f} MiB; bits per weight over quantized parts: {bits:.3f}.", ""]
    cols = _score_columns(results.get("scores", {}))
    if cols:
        lines += ["| " + " | ".join(c for c, _ in cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(f"{v:.2f}" for _, v in cols) + " |", ""]
    return "\n".join(lines)
