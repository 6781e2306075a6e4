"""The paper's Figure 1: average accuracy against model file size, one point per (method, bits).

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), so it
works headless and leaves any interactive matplotlib session alone.
"""
from __future__ import annotations

import io
from typing import Any

MARKERS = "os^Dvp<>h*"


def accuracy_vs_size_png(doc: dict[str, Any]) -> bytes | None:
    """A PNG of Avg accuracy (%) vs file size (MiB) for the cells of a compare document: the
    reference as a black star, each method's bit widths joined by a line (ablation variants
    excluded). None when no cell has an Avg (nothing to draw)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = [c for c in doc["cells"] if c["role"] != "ablation" and c["avg"] is not None]
    if not cells:
        return None
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    methods: list[str] = []
    for cell in cells:
        if cell["role"] != "reference" and cell["name"] not in methods:
            methods.append(cell["name"])
    for i, name in enumerate(methods):
        points = sorted((c["size"]["file_mib"], c["avg"], c["bits"]) for c in cells if c["name"] == name)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], linestyle="-", linewidth=1, label=name)
        for x, y, bits in points:
            ax.annotate(f"{bits}-bit", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for ref in (c for c in cells if c["role"] == "reference"):
        ax.scatter([ref["size"]["file_mib"]], [ref["avg"]], marker="*", s=160, color="black", zorder=3,
                   label=ref["name"].upper())
    sizes = [c["size"]["file_mib"] for c in cells]
    if max(sizes) / min(sizes) > 8:
        ax.set_xscale("log")
    ax.set_xlabel("model file size (MiB)")
    ax.set_ylabel(f"average accuracy (%), {len(doc['benchmarks'])} benchmark(s)")
    ax.set_title(f"{doc['model']}: accuracy vs size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()
