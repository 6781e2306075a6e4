"""The VLMEvalKit bridge, end to end on fake answerers (no transformers model).

VLMEvalKit's import costs ~7 s: the module-scoped ``catalog`` fixture pays it once for the module.
"""
import base64
import io
import logging
import os
import random
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from speedq_core import evaluate as ev
from speedq_core.lmudata import BenchmarkError, ensure_writable, resolve_lmudata
from speedq_plugins import synthetic

REPO = Path(__file__).resolve().parents[1]
SYNTH = "SpeedqSynth_TEST"
N_ROWS = 40
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (235, 220, 30)}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Imports VLMEvalKit once (with LMUData pointing at a temp folder, so no ~/LMUData)."""
    return ev.official_benchmarks(tmp_path_factory.mktemp("lmu-import"))


@pytest.fixture
def lmu(tmp_path, catalog):
    root = tmp_path / "LMUData"
    root.mkdir()
    return root


@pytest.fixture
def synth(lmu):
    synthetic.write_benchmark(SYNTH, lmu, n=N_ROWS)
    return list(synthetic.iter_samples("test", N_ROWS))


class Answerer:
    """A fake family adapter: ``generate`` answers with ``rule(image, prompt)`` and records calls."""

    def __init__(self, rule):
        self.rule, self.calls = rule, 0

    def generate(self, model, processor, image, prompt, max_new_tokens=16):
        self.calls += 1
        return self.rule(image, prompt)


def _acc_csv(work: Path, bench: str, model_name: str) -> dict[str, float]:
    frame = pd.read_csv(work / bench / f"{model_name}_{bench}_acc.csv")
    row = frame.iloc[0]
    return {k: float(v) * 100 for k, v in row.items() if k != "split"}


def _run(answerer, lmu, work, benchmarks=(SYNTH,), name="fake"):
    return ev.evaluate(answerer, torch.nn.Linear(2, 2), None, list(benchmarks), work, name, lmudata=lmu)


def test_oracle_scores_100_and_matches_vlmevalkit_files(synth, lmu, tmp_path):
    table = {s.prompt: s.answer for s in synth}
    oracle = Answerer(lambda image, prompt: table[prompt])
    result = _run(oracle, lmu, tmp_path / "work")
    assert oracle.calls == N_ROWS
    assert result[SYNTH] == _acc_csv(tmp_path / "work", SYNTH, "fake")
    assert set(result[SYNTH].values()) == {100.0}
    assert set(result[SYNTH]) == {"Overall", *synthetic.CATEGORIES}
    assert list(result[SYNTH])[0] == "Overall"
    saved = (tmp_path / "work" / SYNTH / "scores.json").read_text()
    assert '"Overall": 100.0' in saved and (tmp_path / "work" / "results.json").is_file()


def test_constant_answer_scores_the_share_of_that_letter(synth, lmu, tmp_path):
    result = _run(Answerer(lambda image, prompt: "A"), lmu, tmp_path / "work")[SYNTH]
    assert result["Overall"] == pytest.approx(100 * sum(s.answer == "A" for s in synth) / N_ROWS)
    for category in synthetic.CATEGORIES:
        rows = [s for s in synth if s.category == category]
        assert result[category] == pytest.approx(100 * sum(s.answer == "A" for s in rows) / len(rows))
    assert result == _acc_csv(tmp_path / "work", SYNTH, "fake")


def test_rerun_in_same_work_dir_does_not_reuse_predictions(synth, lmu, tmp_path):
    work = tmp_path / "work"
    assert _run(Answerer(lambda image, prompt: "A"), lmu, work)[SYNTH]["Overall"] < 50
    table = {s.prompt: s.answer for s in synth}
    again = Answerer(lambda image, prompt: table[prompt])
    assert _run(again, lmu, work)[SYNTH]["Overall"] == 100.0 and again.calls == N_ROWS


def _b64_png(rgb) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _custom_mcq(root: Path, name: str, colors: list[str]) -> None:
    """A hand-written MCQ TSV: one flat-coloured image per row, 'What color is the square?'."""
    names = list(COLORS)
    rows = []
    for i, color in enumerate(colors):
        options = names[i % 4:] + names[:i % 4]
        rows.append({"index": i, "image": _b64_png(COLORS[color]), "question": "What color is the square?",
                     **dict(zip("ABCD", options)), "answer": "ABCD"[options.index(color)],
                     "category": "light" if color in ("yellow", "green") else "dark"})
    pd.DataFrame(rows).to_csv(root / f"{name}.tsv", sep="\t", index=False)


def _color_reader(image, prompt):
    """Answers from the image: the option whose colour is nearest the centre pixel."""
    pixel = np.asarray(image)[image.height // 2, image.width // 2]
    options = dict(re.findall(r"^([A-D])\. (\w+)$", prompt, flags=re.M))
    return min(options, key=lambda k: np.abs(pixel - COLORS[options[k]]).sum())


def test_hand_written_custom_mcq_by_name_and_fresh_images_after_rewrite(lmu, tmp_path):
    _custom_mcq(lmu, "MyColors", ["red", "green", "blue", "yellow", "red"])
    first = _run(Answerer(_color_reader), lmu, tmp_path / "w1", ["MyColors"])["MyColors"]
    assert first == {"Overall": 100.0, "dark": 100.0, "light": 100.0}
    # Same name, new images and answers: VLMEvalKit's LMUData image cache would be stale.
    _custom_mcq(lmu, "MyColors", ["blue", "yellow", "red", "green", "green"])
    assert _run(Answerer(_color_reader), lmu, tmp_path / "w2", ["MyColors"])["MyColors"]["Overall"] == 100.0


def test_custom_yes_no_benchmark(lmu, tmp_path):
    answers = ["Yes", "No", "Yes", "Yes"]
    pd.DataFrame({"index": range(4), "image": [_b64_png(COLORS["red"])] * 4,
                  "question": ["Is the square red?"] * 4, "answer": answers,
                  "category": ["a", "a", "b", "b"]}).to_csv(lmu / "MyYN.tsv", sep="\t", index=False)
    prompts = []
    answerer = Answerer(lambda image, prompt: prompts.append(prompt) or "Yes")
    result = _run(answerer, lmu, tmp_path / "work", ["MyYN"])["MyYN"]
    assert result == {"Overall": 75.0, "a": 50.0, "b": 100.0}
    assert prompts[0] == "Is the square red? Please answer yes or no."


def test_grad_mode_and_rng_states_are_restored(synth, lmu, tmp_path):
    model = torch.nn.Linear(2, 2).train()
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert torch.is_grad_enabled()
    ev.evaluate(Answerer(lambda image, prompt: "B"), model, None, [SYNTH], tmp_path / "w", "fake", lmudata=lmu)
    assert torch.is_grad_enabled() and model.training
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])


def test_session_restores_what_the_body_changes(lmu):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    state = (torch.get_rng_state(), random.getstate())
    with ev.vlmeval_session(lmu):
        assert os.environ["LMUData"] == str(lmu) and os.environ["PRED_FORMAT"] == "tsv"
        torch.set_grad_enabled(False)
        torch.manual_seed(1234)
        random.seed(1234)
        logging.basicConfig(force=True)
    assert torch.is_grad_enabled() and torch.equal(torch.get_rng_state(), state[0])
    assert random.getstate() == state[1]
    assert root.handlers == handlers and root.level == level
    assert "PRED_FORMAT" not in os.environ


FRESH_PROCESS = """
import random, torch
torch.manual_seed(3); random.seed(3)
state = (torch.get_rng_state(), random.getstate())
from speedq_core.evaluate import official_benchmarks
assert "MMStar" in official_benchmarks()
assert torch.is_grad_enabled(), "grad mode left off"
assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1], "RNG reseeded"
print("clean")
"""


@pytest.mark.slow
def test_first_import_in_a_fresh_process_leaves_no_trace(tmp_path):
    """Grad mode, RNG, no .env ERROR line, and no ~/LMUData when LMUData is set (subprocess: the
    import's side effects only happen once per process)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "LMUData": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"
    assert ".env" not in done.stderr and "ERROR" not in done.stderr
    assert not (home / "LMUData").exists()


def test_missing_official_tsv_fails_fast_with_the_fix(lmu):
    start = time.perf_counter()
    with pytest.raises(BenchmarkError) as err:
        ev.check_benchmarks(["MMStar"], lmu)
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert str(lmu / "MMStar.tsv") in message and "MMStar.tsv" in message and "https://" in message


def test_official_tsv_with_wrong_md5_is_refused(lmu):
    (lmu / "AI2D_TEST.tsv").write_text("index\tquestion\n1\tq\n")
    with pytest.raises(BenchmarkError, match="md5"):
        ev.check_benchmarks(["AI2D_TEST"], lmu)


def test_judge_scored_benchmark_is_refused_up_front(lmu):
    with pytest.raises(BenchmarkError, match="judge"):
        ev.check_benchmarks(["MMVet"], lmu)


def test_paper_suite_names_are_official(catalog):
    suite = tomllib.loads((REPO / "registry.toml").read_text())["suites"]["paper"]["benchmarks"]
    assert len(suite) == 8
    for name in suite:
        assert name in catalog and catalog[name].modality == "IMAGE"
        assert catalog[name].kind in ("MCQ", "Y/N") or name in ev.SCORED_VQA


def test_typo_gets_did_you_mean(lmu):
    with pytest.raises(BenchmarkError, match="did you mean 'MMStar'"):
        ev.check_benchmarks(["MMStra"], lmu)
    _custom_mcq(lmu, "MyColors", ["red"])
    with pytest.raises(BenchmarkError, match="did you mean 'MyColors'"):
        ev.check_benchmarks(["MyColours"], lmu)


def test_tsv_missing_columns_is_named(lmu):
    pd.DataFrame({"index": [0], "image": [_b64_png(COLORS["red"])], "question": ["q"], "A": ["x"],
                  "B": ["y"]}).to_csv(lmu / "NoAnswer.tsv", sep="\t", index=False)
    with pytest.raises(BenchmarkError, match=r"lacks column\(s\) answer"):
        ev.check_benchmarks(["NoAnswer"], lmu)


def test_undecodable_image_is_reported(lmu):
    pd.DataFrame({"index": [0], "image": ["x" * 100], "question": ["q"], "A": ["x"], "B": ["y"],
                  "answer": ["A"]}).to_csv(lmu / "BadImage.tsv", sep="\t", index=False)
    with pytest.raises(BenchmarkError, match="does not decode"):
        ev.check_benchmarks(["BadImage"], lmu)


def test_lmudata_that_cannot_be_created_is_reported(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(BenchmarkError, match="cannot create the LMUData folder"):
        resolve_lmudata(blocker / "LMUData")
    with pytest.raises(BenchmarkError, match="is a file"):
        resolve_lmudata(blocker)


def test_unwritable_lmudata_is_reported_before_generating(tmp_path, monkeypatch):
    root = tmp_path / "ro"
    root.mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refuse)  # root ignores permission bits, so simulate
    with pytest.raises(BenchmarkError, match="not writable"):
        ensure_writable(root)


def test_generated_benchmark_needs_writable_lmudata_only_to_write(lmu, monkeypatch):
    generators = synthetic.benchmark_generators()
    with monkeypatch.context() as patch:
        patch.setattr("tempfile.mkstemp", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
        with pytest.raises(BenchmarkError, match="not writable"):
            ev.check_benchmarks([SYNTH], lmu, generators)
    checked = ev.check_benchmarks([SYNTH], lmu, generators)
    assert checked[0].kind == "MCQ" and checked[0].tsv == lmu / f"{SYNTH}.tsv"
    with monkeypatch.context() as patch:  # up to date: nothing to write, so a read-only folder is fine
        patch.setattr("tempfile.mkstemp", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
        assert ev.check_benchmarks([SYNTH], lmu, generators) == checked


def test_generator_os_error_becomes_a_sentence(lmu):
    def broken(root):
        raise OSError(28, "No space left on device")

    with pytest.raises(BenchmarkError, match="cannot write benchmark Gen"):
        ev.check_benchmarks(["Gen"], lmu, {"Gen": broken})


def test_score_normalisation_of_ocrbench_and_hallusionbench():
    preds = pd.DataFrame({"category": ["Regular Text Recognition"] * 3 + ["Doc-oriented VQA"]})
    raw = {"Text Recognition": 2, "Doc-oriented VQA": 1, "Scene Text-centric VQA": 0,
           "Final Score": 3, "Final Score Norm": 0.3}
    bench = ev.Benchmark("OCRBench", Path("x"), "VQA", True)
    assert ev.normalise_scores(raw, bench, preds) == {
        "Overall": 75.0, "Text Recognition": pytest.approx(200 / 3), "Doc-oriented VQA": 100.0}
    frame = pd.DataFrame({"split": ["Overall", "VD"], "aAcc": [60.0, 50.0], "fAcc": [30.0, 20.0],
                          "qAcc": [30.0, 20.0]})
    bench = ev.Benchmark("HallusionBench", Path("x"), "Y/N", True)
    assert ev.normalise_scores(frame, bench, None) == {
        "Overall": 40.0, "aAcc": 60.0, "fAcc": 30.0, "qAcc": 30.0, "VD": 30.0}
    mmmu = pd.DataFrame({"split": ["dev", "validation"], "Overall": [0.2, 0.5], "Art": [0.1, 0.25]})
    bench = ev.Benchmark("MMMU_DEV_VAL", Path("x"), "MCQ", True)
    assert ev.normalise_scores(mmmu, bench, None) == {"Overall": 50.0, "Art": 25.0}


def test_results_table_and_markdown_follow_table_1_layout():
    rows = {"float": {"MMStar": {"Overall": 50.0}, "OCRBench": {"Overall": 70.0}},
            "rtn-w2": {"MMStar": {"Overall": 30.04}}}
    table = ev.results_table(rows, title="InternVL3-1B")
    assert [c.header for c in table.columns] == ["Model", "MMStar", "OCRBench", "Avg"]
    assert ev.results_markdown(rows).splitlines() == [
        "| Model | MMStar | OCRBench | Avg |", "|---|---:|---:|---:|",
        "| float | 50.0 | 70.0 | 60.0 |", "| rtn-w2 | 30.0 | - | - |"]


def test_mcq_prompt_matches_internvl_wrapper(catalog):
    from vlmeval.vlm.internvl.utils import build_multi_choice_prompt

    line = pd.Series({"question": "Which one?", "hint": "Look.", "A": "x", "B": "y", "C": float("nan")})
    assert ev.benchmark_prompt(line, "MCQ", "MMStar") == build_multi_choice_prompt(line, "MMStar")
