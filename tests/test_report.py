"""Comparison reports from results.json files alone: the compare document, the Table 1/2/5 shapes
as markdown and CSV, the accuracy-vs-size figure, and ``speedq report`` (no model, no VLMEvalKit)."""
import csv
import io
import json
import os
import subprocess
import sys

import pytest

from speedq_core.compare import build_document, load_document, strip_timings, write_reports
from speedq_core.errors import SpeedqError
from speedq_core.report import compare_grids, compare_report_md, render_run, run_report_md

BENCHES = ["MMStar", "OCRBench"]


def fake_results(method, bits, scores, model="tiny-internvl", options=None, quantized=True):
    """A results.json as runner.execute (or compare.evaluate_model for method none) writes it."""
    n_lang, n_vis = 1000, 500
    lang_bytes = n_lang * bits // 8 + 64 if quantized else n_lang * 2
    components = [
        {"name": "language", "n_weights": n_lang, "n_quantized": n_lang if quantized else 0, "nbytes": lang_bytes},
        {"name": "vision", "n_weights": n_vis, "n_quantized": 0, "nbytes": n_vis * 2},
    ]
    nbytes = sum(c["nbytes"] for c in components)
    results = {
        "config": {"model": model, "method": method, "bits": bits, "benchmarks": BENCHES, "options": options or {},
                   "schemes": {"language": f"w{bits}g16"} if quantized else {}, "seed": 42},
        "size": {"components": components, "nbytes": nbytes, "n_weights": n_lang + n_vis,
                 "export_bytes": nbytes + 100 if quantized else None},
        "scores": {b: {"Overall": v, "cat": v / 2} for b, v in zip(BENCHES, scores)},
        "timings": {"quantize_s": 1.5},
    }
    if not quantized:
        results["dtype"] = "bfloat16"
    return results


CELLS = [
    ("bf16", "reference", fake_results("none", 16, [60.0, 50.0], quantized=False), "runs/bf16"),
    ("rtn", "main", fake_results("rtn", 4, [55.25, 44.75]), "runs/rtn-w4"),
    ("rtn", "main", fake_results("rtn", 2, [30.0, 20.0]), "runs/rtn-w2"),
    ("speedq", "main", fake_results("speedq", 2, [50.0, 40.0]), "runs/speedq-w2"),
    ("speedq[loss=task]", "ablation", fake_results("speedq", 2, [45.0, 35.0], options={"loss": "task"}),
     "runs/speedq-loss=task-w2"),
]


def doc_with_ablation():
    from speedq_core.compare import ablation_for

    return build_document(CELLS, ablation_for("speedq"))


def rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_table1_has_reference_first_scheme_components_and_avg():
    doc = doc_with_ablation()
    grid = compare_grids(doc)["table1"]
    body = rows(grid.csv())
    assert [(r["method"], r["bits"]) for r in body] == [("bf16", "16"), ("rtn", "4"), ("rtn", "2"), ("speedq", "2")]
    assert body[0]["scheme"] == "-" and body[1]["scheme"] == "w4g16" and body[1]["quantized"] == "language"
    assert float(body[1]["MMStar"]) == 55.25 and float(body[1]["Avg"]) == 50.0
    md = grid.markdown()
    assert "| rtn | 4 | w4g16 | language | 55.2 | 44.8 | 50.0 |" in md  # one decimal, as the paper


def test_table2_sizes_and_bits_per_weight():
    doc = doc_with_ablation()
    body = rows(compare_grids(doc)["table2"].csv())
    ref, rtn4 = body[0], body[1]
    assert float(ref["file MiB"]) == 3000 / 2**20 and ref["bits/weight (quantized parts)"] == ""
    assert float(ref["bits/weight (whole model)"]) == 16.0
    lang = 1000 * 4 // 8 + 64
    assert float(rtn4["file MiB"]) == (lang + 1000 + 100) / 2**20
    assert float(rtn4["bits/weight (quantized parts)"]) == 8 * lang / 1000
    assert float(rtn4["bits/weight (whole model)"]) == 8 * (lang + 1000) / 1500
    assert float(rtn4["compression"]) == pytest.approx(3000 / (lang + 1100))


def test_table5_lists_the_ablated_method_with_option_defaults():
    doc = doc_with_ablation()
    body = rows(compare_grids(doc)["table5"].csv())
    assert [(r["method"], r["loss"], r["joint"]) for r in body] == [("speedq", "both", "false"),
                                                                   ("speedq[loss=task]", "task", "false")]
    assert "table5" not in compare_grids(build_document(CELLS[:3]))


def test_avg_needs_every_benchmark():
    partial = fake_results("rtn", 4, [55.0, 45.0])
    del partial["scores"]["OCRBench"]
    doc = build_document([CELLS[0], ("rtn", "main", partial, "runs/rtn-w4")])
    assert doc["cells"][1]["avg"] is None
    assert rows(compare_grids(doc)["table1"].csv())[1]["OCRBench"] == ""
    assert "| rtn | 4 | w4g16 | language | 55.0 | - | - |" in compare_grids(doc)["table1"].markdown()


def test_mixing_models_is_refused():
    other = fake_results("rtn", 4, [1.0, 2.0], model="tiny-llava")
    with pytest.raises(SpeedqError, match="runs/x is a run of tiny-llava .* report one model at a time"):
        build_document([CELLS[1], ("rtn", "main", other, "runs/x")][::-1])


def test_strip_timings_removes_only_wall_clock_fields():
    doc = doc_with_ablation()
    stripped = strip_timings(doc)
    assert "timings" not in json.dumps(stripped)
    assert stripped["cells"][1]["scores"] == doc["cells"][1]["scores"]


def test_markdown_report_embeds_the_figure_and_links_runs():
    md = compare_report_md(doc_with_ablation(), "figure1.png")
    assert "![average accuracy vs file size](figure1.png)" in md
    assert "[runs/rtn-w2](runs/rtn-w2/report.md)" in md
    assert "## Ablations (Table 5)" in md


def test_existing_run_renderers_unchanged():
    results = fake_results("rtn", 4, [55.0, 45.0])
    md = run_report_md(results)
    assert "| language | w4g16 |" in md and "| 55.00 | 45.00 | 50.00 |" in md
    assert render_run(results).row_count == 1


def write_fake_compare(root):
    for _, _, results, run_dir in CELLS:
        (root / run_dir).mkdir(parents=True)
        (root / run_dir / "results.json").write_text(json.dumps(results))
    return write_reports(doc_with_ablation(), root)


def test_write_reports_files_and_reload(tmp_path):
    written = write_fake_compare(tmp_path)
    assert {p.name for p in written} == {"compare.json", "table1.csv", "table2.csv", "table5.csv", "figure1.png",
                                         "compare.md"}
    assert (tmp_path / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = load_document([tmp_path], tmp_path)
    assert again == json.loads((tmp_path / "compare.json").read_text())
    # the same runs passed one by one give the same rows (names and roles derived from results.json)
    loose = load_document([tmp_path / c[3] for c in CELLS], tmp_path)
    assert strip_timings(loose) == strip_timings(again)


def speedq(*args, cwd=None):
    cmd = [sys.executable, "-c", "from speedq_core.cli import main; main()", *args]
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=cwd)


def test_report_cli_rerenders_a_compare_dir(tmp_path):
    write_fake_compare(tmp_path)
    before = (tmp_path / "compare.md").read_text()
    (tmp_path / "compare.md").unlink()
    out = speedq("report", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "compare.md").read_text() == before
    assert "speedq[loss=task]" in out.stdout and "55.2" in out.stdout


def test_report_cli_on_run_dirs_writes_to_reports_model(tmp_path):
    write_fake_compare(tmp_path / "c")
    out = speedq("report", "c/runs/bf16", "c/runs/rtn-w4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "reports" / "tiny-internvl" / "compare.json").read_text())
    assert [c["run_dir"] for c in doc["cells"]] == ["../../c/runs/bf16", "../../c/runs/rtn-w4"]


def test_report_cli_refuses_mixed_models_in_one_line(tmp_path):
    for name, model in (("a", "tiny-internvl"), ("b", "tiny-llava")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(fake_results("rtn", 4, [1.0, 2.0], model=model)))
    out = speedq("report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "report one model at a time" in out.stderr
    assert not (tmp_path / "r").exists()


def test_report_cli_refuses_a_dir_without_results(tmp_path):
    out = speedq("report", str(tmp_path))
    assert out.returncode == 2 and "neither compare.json nor results.json" in out.stderr
