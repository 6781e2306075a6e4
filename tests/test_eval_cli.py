"""``speedq eval``: score a finished run's packed export (reloaded into the preset's skeleton) or the
float model, into results.json/report.md, offline on a small generated TSV."""
import json
import shutil
from dataclasses import asdict

import pytest
from test_compare import BENCH, acc_csv_overall, lmu, speedq  # noqa: F401  (lmu is a fixture)

from speedq_core.runner import RunConfig


def prediction_file(run_dir):
    (path,) = (run_dir / "eval" / BENCH).glob(f"*_{BENCH}.tsv")
    return path


@pytest.mark.slow
def test_eval_of_a_run_reloads_its_export_and_reproduces_its_predictions(lmu, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    done = speedq("run", "--method", "rtn", "--bits", "2", "--data", BENCH, "--lmudata", str(lmu), "--out", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    before = json.loads((run_dir / "results.json").read_text())
    predictions = prediction_file(run_dir).read_bytes()
    shutil.rmtree(run_dir / "eval")

    done = speedq("eval", "--run", str(run_dir), "--lmudata", str(lmu))  # benchmarks default to the run's
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads((run_dir / "results.json").read_text())
    assert prediction_file(run_dir).read_bytes() == predictions  # bit-exact reload: same answers
    assert after["scores"] == before["scores"]
    assert after["scores"][BENCH]["Overall"] == acc_csv_overall(run_dir)
    assert after["config"] == before["config"] and after["size"]["components"] == before["size"]["components"]
    assert "eval_s" in after["timings"] and "quantize_s" in after["timings"]
    assert (run_dir / "report.md").read_text().startswith("# tiny-internvl · rtn · 2-bit")


@pytest.mark.slow
def test_eval_of_the_float_model_writes_a_reference_run(lmu, tmp_path):  # noqa: F811
    out = tmp_path / "float"
    done = speedq("eval", "--model", "tiny-internvl", "--data", BENCH, "--lmudata", str(lmu), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == results["config"]["method"] == "none" and results["dtype"] == "float32"
    assert results["scores"][BENCH]["Overall"] == acc_csv_overall(out)
    assert results["size"]["export_bytes"] is None and all(c["n_quantized"] == 0 for c in results["size"]["components"])
    report = speedq("report", str(out), "--out", str(tmp_path / "rep"))
    assert report.returncode == 0, report.stderr
    doc = json.loads((tmp_path / "rep" / "compare.json").read_text())
    assert [(c["name"], c["role"]) for c in doc["cells"]] == [("fp32", "reference")]


def write_run_json(run_dir, **changes):
    config = RunConfig("tiny-internvl", "rtn", 2, {"language": "w2g16"}, (BENCH,))
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({**asdict(config), **changes}))


@pytest.mark.parametrize("args, message", [
    (("--run", "{tmp}/missing"), "has no run.json: pass a directory made by speedq run or speedq compare"),
    (("--run", "{tmp}/run", "--model", "tiny-llava"), "is a run of tiny-internvl, not tiny-llava"),
    (("--run", "{tmp}/run"), "has no finished quantized/ export: finish the run first"),
    ((), "pass --model (evaluate the float model) or --run DIR"),
])
def test_eval_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    write_run_json(tmp_path / "run")
    done = speedq("eval", *(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
