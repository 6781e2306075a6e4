"""Human-readable summaries: of a run (a rich table for the terminal, report.md for the run dir) and of a
head-to-head comparison (the paper's Table 1, 2 and 5 shapes as rich, markdown and CSV).

Machines read results.json and compare.json; these renderers only format them.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any

from rich.markup import escape
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


# -- head-to-head comparisons (``speedq compare`` / ``speedq report``) ------------------------------
#
# Every renderer below reads one compare document (compare.json, built by speedq_core.compare): a
# model, its benchmarks in order and one entry per cell (a run directory's results.json, flattened).


@dataclass(frozen=True)
class Column:
    """A column of a :class:`Grid`: its name and the format spec of its float values (``.1f``)."""

    name: str
    fmt: str = ""


@dataclass(frozen=True)
class Grid:
    """A table as data: rendered to rich, GitHub markdown and CSV. ``None`` cells print as ``-``;
    floats print with their column's format, except in CSV, which keeps full precision."""

    title: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[Any, ...], ...]

    def _text(self, value: Any, column: Column) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return format(value, column.fmt)
        return str(value)

    def cells(self) -> list[list[str]]:
        return [[self._text(v, c) for v, c in zip(row, self.columns)] for row in self.rows]

    def rich(self) -> Table:
        table = Table(title=self.title)
        for column in self.columns:
            table.add_column(column.name, justify="right" if column.fmt else "left")
        for cells in self.cells():
            table.add_row(*(escape(c) for c in cells))
        return table

    def markdown(self) -> str:
        head = "| " + " | ".join(c.name for c in self.columns) + " |"
        rule = "|" + "".join(" ---: |" if c.fmt else " --- |" for c in self.columns)
        return "\n".join([head, rule, *("| " + " | ".join(cells) + " |" for cells in self.cells())]) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([c.name for c in self.columns])
        for row in self.rows:
            writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
        return out.getvalue()


def _scheme_text(schemes: dict[str, str]) -> str:
    names = sorted(set(schemes.values()))
    if not names:
        return "-"
    return names[0] if len(names) == 1 else ", ".join(f"{p}: {s}" for p, s in schemes.items())


def _parts_text(parts: list[str]) -> str:
    return ",".join(parts) if parts else "-"


def _overall(cell: dict[str, Any], benchmarks: list[str]) -> list[float | None]:
    return [cell["scores"][b]["Overall"] if b in cell["scores"] else None for b in benchmarks]


def table1_grid(doc: dict[str, Any]) -> Grid:
    """The paper's Table 1: reference row first, then one row per method x bits; each benchmark's
    Overall and their mean (Avg, ``-`` unless the row has every benchmark), with the row's scheme and
    the components that hold quantized weights."""
    cols = (Column("method"), Column("bits"), Column("scheme"), Column("quantized"),
            *(Column(b, ".1f") for b in doc["benchmarks"]), Column("Avg", ".1f"))
    rows = tuple(
        (c["name"], c["bits"], _scheme_text(c["schemes"]), _parts_text(c["quantized_components"]),
         *_overall(c, doc["benchmarks"]), c["avg"])
        for c in doc["cells"] if c["role"] != "ablation"
    )
    return Grid(f"{doc['model']}: accuracy (%)", cols, rows)


def table2_grid(doc: dict[str, Any]) -> Grid:
    """The paper's Table 2: file size (MiB) per method and bits, bits per weight over the quantized
    components and over the whole model, and the quantized components."""
    cols = (Column("method"), Column("bits"), Column("scheme"), Column("quantized"), Column("file MiB", ".2f"),
            Column("bits/weight (quantized parts)", ".3f"), Column("bits/weight (whole model)", ".3f"),
            Column("compression", ".2f"))
    ref = next((c["size"]["file_mib"] for c in doc["cells"] if c["role"] == "reference"), None)
    rows = tuple(
        (c["name"], c["bits"], _scheme_text(c["schemes"]), _parts_text(c["quantized_components"]),
         c["size"]["file_mib"], c["size"]["bits_per_weight_quantized"], c["size"]["bits_per_weight_total"],
         ref / c["size"]["file_mib"] if ref else None)
        for c in doc["cells"] if c["role"] != "ablation"
    )
    return Grid(f"{doc['model']}: model size", cols, rows)


def table5_grid(doc: dict[str, Any]) -> Grid | None:
    """The paper's Table 5 (ablations): one row per variant of the ablated method and bits, its
    ablated options (defaults filled in), each benchmark's Overall and Avg. None without ablations."""
    ablation = doc.get("ablation")
    if not ablation or not any(c["role"] == "ablation" for c in doc["cells"]):
        return None
    keys = sorted(ablation["defaults"])  # compare.json stores keys sorted
    cells = [c for c in doc["cells"] if c["method"] == ablation["method"]]
    cells.sort(key=lambda c: -c["bits"])  # stable: 4-bit block, then 2-bit, each in run order
    cols = (Column("method"), Column("bits"), *(Column(k) for k in keys),
            *(Column(b, ".1f") for b in doc["benchmarks"]), Column("Avg", ".1f"))
    rows = tuple(
        (c["name"], c["bits"], *(_option_text(c["config"]["options"].get(k, ablation["defaults"][k])) for k in keys),
         *_overall(c, doc["benchmarks"]), c["avg"])
        for c in cells
    )
    return Grid(f"{doc['model']}: {ablation['method']} ablations, accuracy (%)", cols, rows)


def _option_text(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def compare_grids(doc: dict[str, Any]) -> dict[str, Grid]:
    """The tables of a compare document by file stem: table1, table2 and (with ablations) table5."""
    grids = {"table1": table1_grid(doc), "table2": table2_grid(doc)}
    table5 = table5_grid(doc)
    if table5 is not None:
        grids["table5"] = table5
    return grids


def compare_report_md(doc: dict[str, Any], figure: str | None = None) -> str:
    """compare.md: the tables (Table 1, 2 and 5 shapes), the accuracy-vs-size figure (a path relative
    to the report) and where each row's run directory is."""
    grids = compare_grids(doc)
    lines = [f"# {doc['model']}: head-to-head comparison", ""]
    if doc["benchmarks"]:
        lines += [f"Benchmarks: {', '.join(doc['benchmarks'])}. Scores are VLMEvalKit's Overall, in percent.", ""]
    headings = {"table1": "Accuracy (Table 1)", "table2": "Model size (Table 2)", "table5": "Ablations (Table 5)"}
    for stem, grid in grids.items():
        lines += [f"## {headings[stem]}", "", grid.markdown()]
    if figure:
        lines += ["## Accuracy vs model size (Figure 1)", "", f"![average accuracy vs file size]({figure})", ""]
    lines += ["## Runs", "", "| method | bits | run directory |", "| --- | ---: | --- |"]
    lines += [f"| {c['name']} | {c['bits']} | [{c['run_dir']}]({c['run_dir']}/report.md) |" for c in doc["cells"]]
    return "\n".join(lines) + "\n"
