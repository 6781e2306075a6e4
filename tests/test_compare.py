"""``speedq compare`` end to end on tiny-internvl (RTN and GPTQ at 4 and 2 bits plus the float
reference) on a 16-question generated TSV, offline: resumption after a kill, reports that agree with
every run's results.json and VLMEvalKit's own score files, and one-line errors for bad input."""
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speedq_core.compare import ablation_for, plan_compare, strip_timings
from speedq_core.errors import SchemeError, SpeedqError
from speedq_core.plugins import get_plugins
from speedq_core.registry import load_registry
from speedq_plugins.synthetic import tsv_bytes

BENCH = "TinySynth"  # a custom MCQ TSV: the generated SpeedqSynth_TEST would be rewritten at full size
N_ROWS = 16
CELLS = ["fp32", "rtn-w4", "rtn-w2", "gptq-w4", "gptq-w2"]


@pytest.fixture(scope="module")
def lmu(tmp_path_factory):
    root = tmp_path_factory.mktemp("LMUData")
    (root / f"{BENCH}.tsv").write_bytes(tsv_bytes("test", N_ROWS, 0, 48, 6))
    return root


def compare_args(lmu, out):
    return ["compare", "--model", "tiny-internvl", "--methods", "rtn,gptq", "--bits", "4,2", "--data", BENCH,
            "--lmudata", str(lmu), "--out", str(out), "--calib-samples", "8"]


def command(*args):
    return [sys.executable, "-c", "from speedq_core.cli import main; main()", *args]


ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def speedq(*args, cwd=None):
    return subprocess.run(command(*args), capture_output=True, text=True, env=ENV, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def full(lmu, tmp_path_factory):
    """An uninterrupted compare: (compare dir, CompletedProcess, wall seconds)."""
    out = tmp_path_factory.mktemp("full") / "cmp"
    start = time.perf_counter()
    done = speedq(*compare_args(lmu, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done, time.perf_counter() - start


@pytest.mark.slow
def test_compare_runs_every_cell_and_writes_the_reports(full):
    out, done, wall = full
    print(f"tiny compare (5 cells) took {wall:.1f} s")
    doc = json.loads((out / "compare.json").read_text())
    assert [(c["name"], c["bits"], c["role"]) for c in doc["cells"]] == [
        ("fp32", 32, "reference"), ("rtn", 4, "main"), ("rtn", 2, "main"), ("gptq", 4, "main"), ("gptq", 2, "main")]
    assert [c["run_dir"] for c in doc["cells"]] == [f"runs/{name}" for name in CELLS]
    assert doc["benchmarks"] == [BENCH]
    for name in ("compare.md", "table1.csv", "table2.csv", "figure1.png"):
        assert (out / name).is_file(), name
    assert not (out / "table5.csv").exists()
    assert (out / "figure1.png").read_bytes()[:4] == b"\x89PNG"
    assert "![average accuracy vs file size](figure1.png)" in (out / "compare.md").read_text()
    for cell in doc["cells"][1:]:
        assert cell["quantized_components"] == ["language"]
        assert cell["schemes"] == {"language": "w4g128" if cell["bits"] == 4 else "w2g16"}
    assert "accuracy (%)" in done.stdout and "model size" in done.stdout


def acc_csv_overall(run_dir: Path) -> float:
    """VLMEvalKit's own score file of the run: the Overall of its MCQ *_acc.csv, as a percentage."""
    (path,) = (run_dir / "eval" / BENCH).glob("*_acc.csv")
    (row,) = csv.DictReader(path.open())
    return 100 * float(row["Overall"])


@pytest.mark.slow
def test_every_report_agrees_with_results_json_and_vlmevalkit_score_files(full):
    out, done, _ = full
    doc = json.loads((out / "compare.json").read_text())
    table1 = list(csv.DictReader(io.StringIO((out / "table1.csv").read_text())))
    table2 = list(csv.DictReader(io.StringIO((out / "table2.csv").read_text())))
    markdown = (out / "compare.md").read_text()
    for cell, row1, row2 in zip(doc["cells"], table1, table2, strict=True):
        run_dir = out / cell["run_dir"]
        results = json.loads((run_dir / "results.json").read_text())
        size = json.loads((run_dir / "size.json").read_text())
        overall = results["scores"][BENCH]["Overall"]
        assert overall == acc_csv_overall(run_dir)
        assert cell["scores"] == results["scores"] and cell["config"] == results["config"]
        assert float(row1[BENCH]) == overall == cell["avg"] == float(row1["Avg"])
        assert (row1["method"], int(row1["bits"])) == (cell["name"], cell["bits"])
        mib = (size["export_bytes"] or size["nbytes"]) / 2**20
        assert float(row2["file MiB"]) == mib == cell["size"]["file_mib"]
        assert float(row2["bits/weight (whole model)"]) == 8 * size["nbytes"] / size["n_weights"]
        line = next(x for x in markdown.splitlines() if x.startswith(f"| {cell['name']} | {cell['bits']} | ")
                    and x.endswith(f"| {overall:.1f} | {overall:.1f} |"))
        assert line
        assert f"{overall:.1f}" in done.stdout
    reference = doc["cells"][0]
    assert reference["size"]["bits_per_weight_total"] == 32.0  # the tiny preset is float32
    assert reference["size"]["file_mib"] > 2 * max(c["size"]["file_mib"] for c in doc["cells"][1:])


@pytest.mark.slow
def test_killed_compare_resumes_without_redoing_finished_cells(full, lmu, tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.Popen(command(*compare_args(lmu, out)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "runs" / CELLS[0] / "results.json"
    try:
        deadline = time.monotonic() + 300
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.exists(), "the first cell never finished"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # a crash: no cleanup, no atexit
        proc.wait()
    finished = {name: (out / "runs" / name / "results.json").stat().st_mtime_ns
                for name in CELLS if (out / "runs" / name / "results.json").exists()}
    assert CELLS[0] in finished and len(finished) < len(CELLS), finished

    again = speedq(*compare_args(lmu, out))
    assert again.returncode == 0, again.stderr[-3000:]
    for name, mtime in finished.items():
        assert (out / "runs" / name / "results.json").stat().st_mtime_ns == mtime, f"{name} was redone"
    reused = again.stdout.count("finished, reusing")
    assert reused == len(finished), again.stdout
    assert again.stdout.count(": running") == len(CELLS) - len(finished)
    resumed = json.loads((out / "compare.json").read_text())
    uninterrupted = json.loads((full[0] / "compare.json").read_text())
    assert strip_timings(resumed) == strip_timings(uninterrupted)


def test_unsupported_bits_fail_before_any_work(tmp_path):
    out = speedq("compare", "--methods", "rtn,speedq", "--bits", "4,3", "--out", str(tmp_path / "c"))
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: method 'speedq' does not support 3-bit (it supports 2, 4): drop 3 from "
                                  "--bits or speedq from --methods")
    assert not (tmp_path / "c").exists()


def test_unknown_benchmark_fails_before_any_work(lmu, tmp_path):
    out = speedq("compare", "--methods", "rtn", "--bits", "4", "--data", "MMStarr", "--lmudata", str(lmu),
                 "--out", str(tmp_path / "c"))
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: unknown benchmark 'MMStarr' (did you mean 'MMStar'?)")
    assert "\n" not in out.stderr.strip()
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def env():
    return load_registry(), get_plugins()


def test_plan_orders_cells_and_scopes_options(env, lmu):
    registry, plugins = env
    plan = plan_compare(registry, plugins, "tiny-internvl", ("rtn", "speedq"), (2,), (BENCH,), ablations=True,
                        options={"qat_steps": 3, "speedq.qat_steps": 2, "rtn.seed_note": "x"}, lmudata=str(lmu))
    names = [(c.name, c.role, c.dir_name) for c in plan.cells]
    assert names == [
        ("fp32", "reference", "fp32"), ("rtn", "main", "rtn-w2"), ("speedq", "main", "speedq-w2"),
        ("speedq[loss=task]", "ablation", "speedq-loss=task-w2"),
        ("speedq[loss=distill]", "ablation", "speedq-loss=distill-w2"),
        ("speedq[joint=true]", "ablation", "speedq-joint=true-w2"),
        ("speedq[kd_mask_shifted=true]", "ablation", "speedq-kd_mask_shifted=true-w2"),
    ]
    options = {c.dir_name: c.config.options for c in plan.cells}
    assert options["rtn-w2"] == {"qat_steps": 3, "seed_note": "x"}
    assert options["speedq-w2"] == {"qat_steps": 2}
    assert options["speedq-joint=true-w2"] == {"qat_steps": 2, "joint": True}
    assert plan.ablation == ablation_for("speedq") and plan.benchmarks == (BENCH,)
    with pytest.raises(SpeedqError, match="scoped to 'awq', which is not among the compared methods"):
        plan_compare(registry, plugins, "tiny-internvl", ("rtn",), (2,), (BENCH,), options={"awq.x": 1},
                     lmudata=str(lmu))
    with pytest.raises(SchemeError, match="'speedq' does not support 8-bit"):
        plan_compare(registry, plugins, "tiny-internvl", ("rtn",), (8,), (BENCH,), ablations=True, lmudata=str(lmu))


FAST_SPEEDQ = {"vit_samples": 4, "adaround_iters": 4, "adaround_batch": 4, "batch_size": 4, "projector_steps": 2,
               "qat_steps": 2, "gamma_steps": 1, "clip_samples": 4, "clip_grid": 4, "clip_tokens": 64}


@pytest.mark.slow
def test_ablations_fill_table5(lmu, tmp_path):
    out = tmp_path / "abl"
    opts = [arg for k, v in FAST_SPEEDQ.items() for arg in ("-o", f"speedq.{k}={v}")]
    done = speedq("compare", "--methods", "rtn", "--bits", "2", "--ablations", "--data", BENCH, "--lmudata", str(lmu),
                  "--out", str(out), "--calib-samples", "8", *opts)
    assert done.returncode == 0, done.stderr[-3000:]
    table5 = list(csv.DictReader(io.StringIO((out / "table5.csv").read_text())))
    assert [(r["method"], r["joint"], r["loss"], r["kd_mask_shifted"]) for r in table5] == [
        ("speedq", "false", "both", "false"), ("speedq[loss=task]", "false", "task", "false"),
        ("speedq[loss=distill]", "false", "distill", "false"), ("speedq[joint=true]", "true", "both", "false"),
        ("speedq[kd_mask_shifted=true]", "false", "both", "true")]
    table1 = list(csv.DictReader(io.StringIO((out / "table1.csv").read_text())))
    assert [r["method"] for r in table1] == ["fp32", "rtn"]  # speedq was not among --methods
    for row in table5:
        run = json.loads((out / "runs" / f"speedq{row['method'][6:].replace('[', '-').rstrip(']')}-w2"
                          / "results.json").read_text())
        assert float(row[BENCH]) == run["scores"][BENCH]["Overall"]
        assert run["config"]["options"].get("loss", "both") == row["loss"]
    joint = json.loads((out / "runs" / "speedq-joint=true-w2" / "results.json").read_text())
    assert joint["config"]["schemes"] == {"vision": "w2g16g16", "language": "w2g16g16"}
