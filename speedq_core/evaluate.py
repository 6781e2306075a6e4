"""The VLMEvalKit bridge: score any family's model on VLMEvalKit benchmarks, offline, from Python.

    evaluate(adapter, model, processor, ["MMStar", "SpeedqSynth_TEST"], work_dir, "internvl3-1b-rtn-w4")
      -> {"MMStar": {"Overall": 51.3, "coarse perception": 70.2, ...}, "SpeedqSynth_TEST": {...}}

Flow per benchmark (no ``run.py``, no judge model, no network):
``check_benchmarks`` first (every TSV present and well-formed, before any model work), then in a
fresh ``work_dir/<benchmark>/``: ``build_dataset(name)`` -> ``infer_data_job`` with a
:class:`SpeedqVLM` that answers through ``adapter.generate`` -> ``dataset.evaluate(pred_file,
model="exact_matching")`` -> scores normalised to percent.

VLMEvalKit is imported lazily inside :func:`vlmeval_session`, which undoes the import's process-wide
side effects (autograd switched off, torch RNG reseeded, root logger configured, SSL verification
disabled) so training in the same process is unaffected.

Score normalisation (every number returned is a percentage, 0-100):
  * MCQ: VLMEvalKit returns fractions -> x100. With several splits (MMMU_DEV_VAL: dev, validation)
    the row of ``validation`` (else ``val``, ``test``, ``none``, ``dev``) is reported.
  * Y/N: already percent. HallusionBench reports aAcc, fAcc, qAcc; its ``Overall`` (and each
    category) is their mean, as on the OpenCompass leaderboard; the three are reported too.
  * OCRBench: VLMEvalKit returns counts of correct answers; ``Overall`` = Final Score / number of
    questions x100 (on the full 1000-question set this is its "Final Score Norm"), and each group
    (Text Recognition, Scene Text-centric VQA, ...) is its count / its number of questions x100.
Other benchmark types are scored by a judge model in VLMEvalKit and are refused up front.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import ssl
import string
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speedq_core.errors import suggest
from speedq_core.quant.qlinear import dequantized_cache
from speedq_core.lmudata import (BenchmarkError, atomic_write_bytes, inspect_custom_tsv,
                                 local_benchmarks, resolve_lmudata)

MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
MCQ_SUFFIX_CN = "请直接回答选项字母。"
YN_SUFFIX = "Please answer yes or no."
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
DEFAULT_MAX_NEW_TOKENS = {"MCQ": 16, "Y/N": 16, "VQA": 64}
SPLIT_PREFERENCE = ("validation", "val", "test", "none", "dev")
SCORED_VQA = ("OCRBench",)  # VQA benchmarks scored by rules, not by a judge model
OCRBENCH_GROUPS = {
    "Text Recognition": (
        "Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
        "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition",
    ),
}
HALLUSION_METRICS = ("aAcc", "fAcc", "qAcc")

Generators = Mapping[str, Callable[[Path], Path]]


# -- prompts --------------------------------------------------------------------------------------


def mcq_prompt(question: str, options: Mapping[str, str], hint: str | None = None) -> str:
    """VLMEvalKit's InternVL/LLaVA MCQ prompt: ``[hint\\n]question\\nA. ..\\nB. ..\\n`` + suffix."""
    text = question if hint is None else f"{hint}\n{question}"
    for letter, option in options.items():
        text += f"\n{letter}. {option}"
    cjk = re.search("[\u4e00-\u9fff]", text) is not None
    return f"{text}\n{MCQ_SUFFIX_CN if cjk else MCQ_SUFFIX}"


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def benchmark_prompt(line: Mapping[str, Any], kind: str, dataset: str) -> str:
    """The text prompt for one TSV row, as VLMEvalKit's InternVL wrapper builds it per type."""
    question = str(line["question"])
    if kind == "MCQ":
        options = {c: str(line[c]) for c in string.ascii_uppercase if c in line and _present(line[c])}
        hint = str(line["hint"]) if "hint" in line and _present(line["hint"]) else None
        return mcq_prompt(question, options, hint)
    if kind == "Y/N":
        extra = f" {SHORT_ANSWER_SUFFIX}" if "HallusionBench" in dataset else ""
        return f"{question} {YN_SUFFIX}{extra}"
    return f"{question}\n{SHORT_ANSWER_SUFFIX}"


# -- the VLMEvalKit session -----------------------------------------------------------------------


@contextlib.contextmanager
def vlmeval_session(lmudata: Path | None = None) -> Iterator[None]:
    """Import VLMEvalKit (once per process) and run the body with ``$LMUData`` (if given),
    ``PRED_FORMAT=tsv`` and ``EVAL_FORMAT=csv`` set; on exit restore torch grad mode, the RNG states
    of torch (CPU and initialised CUDA), ``random`` and numpy, the root logger, SSL's default
    context, warning filters and those environment variables. The import's ``.env`` ERROR line is
    silenced."""
    env = {"PRED_FORMAT": "tsv", "EVAL_FORMAT": "csv"}
    if lmudata is not None:
        env["LMUData"] = str(lmudata)
    saved_env = {k: os.environ.get(k) for k in env}
    root = logging.getLogger()
    saved_logging = (root.level, list(root.handlers), logging.root.manager.disable)
    saved_grad = torch.is_grad_enabled()
    saved_rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    saved_cuda = torch.cuda.get_rng_state_all() if cuda else None
    saved_ssl = ssl._create_default_https_context
    os.environ.update(env)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.ERROR)
            try:
                _import_vlmeval()
            finally:
                logging.disable(saved_logging[2])
            yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        root.setLevel(saved_logging[0])
        root.handlers[:] = saved_logging[1]
        torch.set_grad_enabled(saved_grad)
        torch.set_rng_state(saved_rng[0])
        random.setstate(saved_rng[1])
        np.random.set_state(saved_rng[2])
        if saved_cuda is not None:
            torch.cuda.set_rng_state_all(saved_cuda)
        ssl._create_default_https_context = saved_ssl


def _import_vlmeval() -> None:
    try:
        import vlmeval.dataset  # noqa: F401
        import vlmeval.inference  # noqa: F401
        import vlmeval.vlm.base  # noqa: F401
    except ImportError as err:
        raise BenchmarkError(
            f"VLMEvalKit is not importable ({err}): run bash scripts/install, or pip install 'speedq[eval]' "
            "then pip install --no-deps ms-vlmeval==0.0.20"
        ) from err


@dataclass(frozen=True)
class OfficialBenchmark:
    """A dataset VLMEvalKit knows by name: where it downloads its TSV from and how it scores it."""

    name: str
    url: str | None
    md5: str | None
    kind: str  # VLMEvalKit's TYPE: MCQ, Y/N, VQA, ...
    modality: str  # IMAGE, VIDEO, ...
    collection: bool  # a set of other datasets (no TSV of its own)


def official_benchmarks(lmudata: str | os.PathLike | None = None) -> dict[str, OfficialBenchmark]:
    """Every dataset name VLMEvalKit's ``build_dataset`` resolves. Imports VLMEvalKit (with
    ``$LMUData`` set to the resolved ``lmudata``, else the import creates ``~/LMUData``)."""
    with vlmeval_session(resolve_lmudata(lmudata)):
        return _catalog()


@lru_cache(maxsize=1)
def _catalog() -> dict[str, OfficialBenchmark]:
    from vlmeval import dataset as vd
    from vlmeval.dataset.video_dataset_config import supported_video_datasets

    found: dict[str, OfficialBenchmark] = {}
    for cls in vd.DATASET_CLASSES:
        collection = cls in vd.DATASET_COLLECTION
        for name in cls.supported_datasets():
            found.setdefault(name, OfficialBenchmark(
                name, getattr(cls, "DATASET_URL", {}).get(name), getattr(cls, "DATASET_MD5", {}).get(name),
                getattr(cls, "TYPE", "unknown"), getattr(cls, "MODALITY", "IMAGE"), collection,
            ))
    for name in supported_video_datasets:
        found.setdefault(name, OfficialBenchmark(name, None, None, "video", "VIDEO", False))
    return found


# -- checks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """A benchmark that passed :func:`check_benchmarks`: its TSV and how it is scored."""

    name: str
    tsv: Path
    kind: str  # MCQ, Y/N or VQA (OCRBench)
    official: bool


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_official(info: OfficialBenchmark, root: Path) -> Benchmark:
    name, tsv = info.name, root / f"{info.name}.tsv"
    if info.collection or info.modality != "IMAGE":
        raise BenchmarkError(
            f"benchmark {name} is a VLMEvalKit {'collection' if info.collection else info.modality.lower()} "
            "benchmark, which speedq does not evaluate: use single-image benchmarks such as MMStar"
        )
    if info.kind not in ("MCQ", "Y/N") and name not in SCORED_VQA:
        raise BenchmarkError(
            f"benchmark {name} ({info.kind}) is scored by a judge model in VLMEvalKit, which speedq does "
            "not run offline: evaluate it with VLMEvalKit's run.py and --judge, or pick MCQ, Y/N or OCRBench"
        )
    if not tsv.is_file():
        if info.url:
            how = (f"download it from {info.url} (python -c \"import urllib.request as u; "
                   f"u.urlretrieve('{info.url}', '{tsv}')\")")
        else:
            how = "get it as VLMEvalKit's documentation for this dataset describes"
        raise BenchmarkError(f"benchmark {name} needs {tsv}: {how} or copy it there")
    if info.md5 and _md5(tsv) != info.md5:
        raise BenchmarkError(
            f"benchmark {name}: {tsv} is not VLMEvalKit's file (md5 differs), and VLMEvalKit would try "
            f"to download it again: replace it with {info.url or 'the official TSV'}, or rename your "
            "edited copy (it is then evaluated as a custom benchmark)"
        )
    return Benchmark(name, tsv, "VQA" if name in SCORED_VQA else info.kind, official=True)


def _generate(name: str, generator: Callable[[Path], Path], root: Path) -> Path:
    try:
        return Path(generator(root))
    except OSError as err:
        raise BenchmarkError(
            f"cannot write benchmark {name} into LMUData folder {root} ({err}): pass a writable folder as LMUData"
        ) from err


def check_benchmarks(
    names: Sequence[str], lmudata: str | os.PathLike | None = None, generators: Generators | None = None
) -> list[Benchmark]:
    """Check, before any model work, that every benchmark can be evaluated offline.

    For each name, in order: a benchmark in ``generators`` (name -> ``fn(lmudata) -> tsv``, e.g.
    ``speedq_plugins.synthetic.benchmark_generators()``) is written on demand (LMUData must be
    writable if the file is missing or stale); an official VLMEvalKit name needs its TSV in LMUData with VLMEvalKit's md5 and a
    type scored without a judge; any other name needs ``$LMUData/<name>.tsv`` with the columns of a
    custom MCQ or Y/N benchmark and decodable images. Raises :class:`BenchmarkError` naming the fix
    (never touches the network). Returns the checked benchmarks in order.
    """
    root = resolve_lmudata(lmudata)
    generators = generators or {}
    official = official_benchmarks(root)
    checked = []
    for name in names:
        if name in generators:
            tsv = _generate(name, generators[name], root)
            checked.append(Benchmark(name, tsv, inspect_custom_tsv(tsv), official=False))
        elif name in official:
            checked.append(_check_official(official[name], root))
        elif (root / f"{name}.tsv").is_file():
            tsv = root / f"{name}.tsv"
            checked.append(Benchmark(name, tsv, inspect_custom_tsv(tsv), official=False))
        else:
            known = set(official) | set(local_benchmarks(root)) | set(generators)
            raise BenchmarkError(
                f"unknown benchmark {name!r}{suggest(name, known)}: use a VLMEvalKit dataset name or put "
                f"a custom MCQ TSV at {root / (name + '.tsv')}"
            )
    return checked


# -- the model wrapper ----------------------------------------------------------------------------


@lru_cache(maxsize=1)
def speedq_vlm_class() -> type:
    """``SpeedqVLM``, a ``vlmeval.vlm.base.BaseModel`` subclass (built on first use, as VLMEvalKit is
    imported lazily). Call inside :func:`vlmeval_session`."""
    from vlmeval.vlm.base import BaseModel

    class SpeedqVLM(BaseModel):
        """Answers VLMEvalKit's messages with ``adapter.generate(model, processor, image, prompt)``.

        Prompts are built here (``use_custom_prompt`` is always true) with the InternVL wrapper's
        wording for MCQ, Y/N and short-answer questions. Several images are pasted side by side,
        since adapters take one image.
        """

        INTERLEAVE = False

        def __init__(self, adapter, model, processor, kind: str, max_new_tokens: int | None = None):
            super().__init__()
            self.adapter, self.model, self.processor, self.kind = adapter, model, processor, kind
            self.max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[kind]

        def use_custom_prompt(self, dataset):
            return True

        def build_prompt(self, line, dataset=None):
            paths = self.dump_image(line, dataset)
            paths = [paths] if isinstance(paths, str) else list(paths)
            message = [dict(type="image", value=p) for p in paths]
            message.append(dict(type="text", value=benchmark_prompt(line, self.kind, dataset or "")))
            return message

        def generate_inner(self, message, dataset=None):
            from PIL import Image

            images = [Image.open(m["value"]).convert("RGB") for m in message if m["type"] == "image"]
            prompt = "\n".join(m["value"] for m in message if m["type"] == "text")
            image = _side_by_side(images) if images else None
            return self.adapter.generate(self.model, self.processor, image, prompt, self.max_new_tokens)

    return SpeedqVLM


def _side_by_side(images: list[Any]) -> Any:
    if len(images) == 1:
        return images[0]
    from PIL import Image

    height = max(im.height for im in images)
    canvas = Image.new("RGB", (sum(im.width for im in images), height), (255, 255, 255))
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


# -- scores ---------------------------------------------------------------------------------------


def _pick_split(frame) -> Any:
    if "split" not in frame or len(frame) == 1:
        return frame.iloc[0]
    splits = [str(s) for s in frame["split"]]
    for wanted in SPLIT_PREFERENCE:
        if wanted in splits:
            return frame.iloc[splits.index(wanted)]
    return frame.iloc[0]


def normalise_scores(raw: Any, benchmark: Benchmark, predictions: Any) -> dict[str, float]:
    """VLMEvalKit's result for one benchmark -> ``{"Overall": pct, "<category>": pct, ...}``
    (rules in the module docstring). ``predictions`` is the prediction table (for OCRBench counts)."""
    if isinstance(raw, dict):
        return _ocrbench_scores(raw, predictions)
    if benchmark.kind == "Y/N" and set(HALLUSION_METRICS) <= set(raw.columns):
        scores = {}
        for _, row in raw.iterrows():
            scores[str(row["split"])] = float(np.mean([row[m] for m in HALLUSION_METRICS]))
            if str(row["split"]) == "Overall":
                scores.update({m: float(row[m]) for m in HALLUSION_METRICS})
        return _overall_first(scores)
    row = _pick_split(raw)
    scale = 100.0 if benchmark.kind == "MCQ" else 1.0
    scores = {str(k): float(v) * scale for k, v in row.items() if k != "split" and _present(v)}
    return _overall_first(scores)


def _overall_first(scores: dict[str, float]) -> dict[str, float]:
    return {"Overall": scores.pop("Overall"), **scores}


def _ocrbench_scores(raw: dict, predictions: Any) -> dict[str, float]:
    if "Final Score" not in raw:
        raise BenchmarkError(f"unexpected VLMEvalKit result {sorted(raw)}: update speedq's OCRBench scoring")
    counts = predictions["category"].value_counts().to_dict()
    scores = {"Overall": 100.0 * raw["Final Score"] / max(1, len(predictions))}
    for key, value in raw.items():
        if key.startswith("Final Score"):
            continue
        total = sum(counts.get(c, 0) for c in OCRBENCH_GROUPS.get(key, (key,)))
        if total:
            scores[key] = 100.0 * value / total
    return scores


# -- evaluation -----------------------------------------------------------------------------------


def _safe_name(model_name: str) -> str:
    safe = re.sub(r"[^\w.+-]+", "_", model_name).strip("_")
    if not safe:
        raise BenchmarkError(f"model name {model_name!r} has no usable characters: pass a name like 'internvl3-1b-w4'")
    return safe


def _write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def evaluate(
    adapter: Any,
    model: torch.nn.Module,
    processor: Any,
    benchmarks: Sequence[str],
    work_dir: str | os.PathLike,
    model_name: str,
    lmudata: str | os.PathLike | None = None,
    generators: Generators | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, dict[str, float]]:
    """Score ``model`` on each benchmark through VLMEvalKit; returns ``{benchmark: {"Overall": pct,
    category: pct, ...}}``.

    Each benchmark runs in a fresh ``work_dir/<benchmark>/`` (removed first: VLMEvalKit would reuse
    old predictions), with images decoded there rather than into LMUData's never-refreshed cache.
    Scores are written to ``work_dir/<benchmark>/scores.json`` and merged into
    ``work_dir/results.json``. ``max_new_tokens`` defaults to 16 for MCQ and Y/N, 64 otherwise.
    The model is put in eval mode and its previous mode restored.
    """
    root = resolve_lmudata(lmudata)
    checked = check_benchmarks(benchmarks, root, generators)
    work_dir = Path(work_dir).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    name = _safe_name(model_name)
    results: dict[str, dict[str, float]] = {}
    was_training = model.training
    model.eval()
    try:
        with vlmeval_session(root), dequantized_cache(model):
            for bench in checked:
                results[bench.name] = _evaluate_one(adapter, model, processor, bench, work_dir, name, max_new_tokens)
                _write_json(work_dir / bench.name / "scores.json", results[bench.name])
    finally:
        model.train(was_training)
    results_file = work_dir / "results.json"
    merged = json.loads(results_file.read_text()) if results_file.is_file() else {}
    merged.update(results)
    _write_json(results_file, merged)
    return results


def _build_dataset(bench: Benchmark) -> Any:
    from vlmeval.dataset import ImageYORNDataset, build_dataset

    if bench.kind == "Y/N" and not bench.official:  # build_dataset would make it a VQA set
        return ImageYORNDataset(dataset=bench.name)
    dataset = build_dataset(bench.name)
    if dataset is None:
        raise BenchmarkError(f"VLMEvalKit could not build benchmark {bench.name} from {bench.tsv}: check the file")
    return dataset


def _evaluate_one(adapter, model, processor, bench: Benchmark, work_dir: Path, model_name: str,
                  max_new_tokens: int | None) -> dict[str, float]:
    from vlmeval.inference import infer_data_job
    from vlmeval.smp import get_pred_file_path, load

    bench_dir = work_dir / bench.name
    shutil.rmtree(bench_dir, ignore_errors=True)
    bench_dir.mkdir(parents=True)
    dataset = _build_dataset(bench)
    if not dataset.meta_only:
        dataset.img_root = str(bench_dir / "images")
    vlm = speedq_vlm_class()(adapter, model, processor, bench.kind, max_new_tokens)
    infer_data_job(model=vlm, work_dir=str(bench_dir), model_name=model_name, dataset=dataset,
                   verbose=False, api_nproc=1)
    pred_file = get_pred_file_path(str(bench_dir), model_name, bench.name, use_env_format=True)
    raw = dataset.evaluate(pred_file, model="exact_matching", nproc=1)
    return normalise_scores(raw, bench, load(pred_file))


# -- reporting ------------------------------------------------------------------------------------


def _table_cells(rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the paper's Table 1 layout: one row per model/method, one column per
    benchmark (its Overall), then Avg (mean of the row's Overall values; "-" if the row lacks one)."""
    benchmarks: list[str] = []
    for scores in rows.values():
        benchmarks += [b for b in scores if b not in benchmarks]
    body = []
    for label, scores in rows.items():
        values = [scores[b]["Overall"] if b in scores else None for b in benchmarks]
        cells = [f"{v:.1f}" if v is not None else "-" for v in values]
        complete = values and all(v is not None for v in values)
        cells.append(f"{sum(values) / len(values):.1f}" if complete else "-")
        body.append([label, *cells])
    return ["Model", *benchmarks, "Avg"], body


def results_table(rows: Mapping[str, Mapping[str, Mapping[str, float]]], title: str | None = None):
    """A rich ``Table`` of ``{row label: evaluate(...) result}`` shaped like the paper's Table 1."""
    from rich.table import Table

    header, body = _table_cells(rows)
    table = Table(title=title)
    table.add_column(header[0], justify="left")
    for column in header[1:]:
        table.add_column(column, justify="right")
    for cells in body:
        table.add_row(*cells)
    return table


def results_markdown(rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The same table as :func:`results_table`, as GitHub markdown."""
    header, body = _table_cells(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"
