"""Head-to-head comparison: one run per (method, bits) cell plus the float reference, then reports.

    speedq compare --model internvl3-1b --methods rtn,gptq,awq,mbq,speedq --bits 4,2

Every name, bit width and benchmark is checked before any work (:func:`plan_compare`). Each cell is
an ordinary run directory (:func:`speedq_core.runner.execute`; the reference is the unquantized model
evaluated by :func:`evaluate_model`) under the compare directory, and a cell is finished when its
``results.json`` exists, so a crash or Ctrl-C loses at most the cell in progress and rerunning the
same command continues::

    <compare dir>/
        compare.json        the source of every report: one entry per cell (rewritten after each cell)
        compare.md          Table 1, 2 (and 5) shapes + the figure; table1.csv, table2.csv, table5.csv
        figure1.png         average accuracy vs file size (the paper's Figure 1)
        runs/<cell>/        run.json, quantized/, dequantized/, size.json, eval/, results.json, report.md

Cells are named after their method, plus the ablated options of an ablation variant:
``rtn``, ``speedq``, ``speedq[loss=task]``, ``speedq[joint=true]``; the reference is named after
the preset's dtype (``bf16``; ``fp32`` for the tiny presets) and uses method ``none``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from speedq_core.errors import SchemeError, SpeedqError
from speedq_core.plugins import Plugins, get_plugins
from speedq_core.registry import Registry
from speedq_core.report import compare_grids, compare_report_md, run_report_md, size_summary
from speedq_core.runner import (QUANTIZABLE_PARTS, RunConfig, execute, prepare_run_dir, resolve_config,
                                write_json_atomic, write_text_atomic)

COMPARE_FILE = "compare.json"
FIGURE_FILE = "figure1.png"
FORMAT = "speedq-compare"
VERSION = 1
NO_METHOD = "none"  # RunConfig.method of an unquantized (reference) evaluation
DTYPE_NAMES = {"bfloat16": ("bf16", 16), "float16": ("fp16", 16), "float32": ("fp32", 32)}


@dataclass(frozen=True)
class Ablation:
    """The paper's Table 5 for one method: its ablated options with their defaults, and the variants
    run besides the default (each overrides some of those options)."""

    method: str
    defaults: dict[str, Any]
    variants: tuple[dict[str, Any], ...]


def ablation_for(method: str, plugins: Plugins | None = None) -> Ablation | None:
    """The ablation a method declares (``Method.ablation_defaults`` / ``ablation_variants``), or None."""
    provided = (plugins or get_plugins()).methods.get(method)
    if provided is None or not provided.obj.ablation_variants:
        return None
    impl = provided.obj
    return Ablation(method, dict(impl.ablation_defaults), tuple(dict(v) for v in impl.ablation_variants))


@dataclass(frozen=True)
class Cell:
    """One row of the comparison: a run configuration and its role (reference, main or ablation)."""

    name: str
    role: str
    config: RunConfig

    @property
    def dir_name(self) -> str:
        if self.role == "reference":
            return self.name
        slug = self.name.replace("[", "-").replace("]", "").replace(",", "-")
        return f"{slug}-w{self.config.bits}"


@dataclass(frozen=True)
class ComparePlan:
    """Every cell of a comparison, checked: the reference first, then methods x bits, then ablations."""

    model: str
    benchmarks: tuple[str, ...]
    cells: tuple[Cell, ...]
    ablation: Ablation | None = None


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def cell_name(method: str, options: dict[str, Any]) -> str:
    """``method``, plus ``[key=value,...]`` for the options of ``options`` that ``method`` ablates."""
    ablation = ablation_for(method)
    variant = {k: options[k] for k in ablation.defaults if k in options} if ablation else {}
    if not variant:
        return method
    return f"{method}[{','.join(f'{k}={_value_text(v)}' for k, v in variant.items())}]"


def reference_config(registry: Registry, model: str, benchmarks: tuple[str, ...], seed: int = 42,
                     model_path: str | None = None) -> RunConfig:
    """The RunConfig of the unquantized model (method ``none``, bits of the preset's dtype)."""
    preset = registry.model(model)
    _, bits = DTYPE_NAMES[preset.dtype]
    return RunConfig(model, NO_METHOD, bits, {}, expand_benchmarks(registry, benchmarks), seed, model_path)


def reference_name(results: dict[str, Any]) -> str:
    """``bf16``, ``fp16`` or ``fp32``: the name of a reference cell, from its results.json."""
    return DTYPE_NAMES[results["dtype"]][0]


def expand_benchmarks(registry: Registry, names: tuple[str, ...]) -> tuple[str, ...]:
    """Suites (``paper``, ``synthetic``, ...) replaced by their benchmarks, duplicates dropped."""
    expanded: list[str] = []
    for name in names:
        for bench in registry.suites[name].benchmarks if name in registry.suites else [name]:
            if bench not in expanded:
                expanded.append(bench)
    return tuple(expanded)


def split_options(options: dict[str, Any], methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``-o`` options per method: ``KEY`` applies to every method, ``METHOD.KEY`` to that one only
    (and wins over the unscoped key)."""
    scoped: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in options.items():
        if "." not in key:
            for method in methods:
                scoped[method].setdefault(key, value)
    for key, value in options.items():
        method, dot, name = key.partition(".")
        if not dot:
            continue
        if method not in scoped or not name:
            raise SpeedqError(f"option {key!r} is scoped to {method!r}, which is not among the compared methods "
                              f"({', '.join(methods)}): write METHOD.KEY=VALUE with one of them, or KEY=VALUE for all")
        scoped[method][name] = value
    return scoped


def plan_compare(
    registry: Registry,
    plugins: Plugins,
    model: str,
    methods: tuple[str, ...],
    bits: tuple[int, ...],
    benchmarks: tuple[str, ...],
    ablations: bool = False,
    options: dict[str, Any] | None = None,
    seed: int = 42,
    model_path: str | None = None,
    calib_data: str | None = None,
    calib_images: str | None = None,
    calib_samples: int | None = None,
    lmudata: str | None = None,
) -> ComparePlan:
    """Check everything a comparison needs before any work: model, methods, every (method, bits) pair,
    options scopes, and that every benchmark can be evaluated offline (the evaluate bridge's
    ``check_benchmarks``: this imports VLMEvalKit and writes generated benchmarks)."""
    from speedq_core.evaluate import check_benchmarks

    if not methods or not bits:
        raise SpeedqError("nothing to compare: pass --methods (e.g. rtn,gptq) and --bits (e.g. 4,2)")
    registry.model(model)
    ablation = None
    if ablations:
        # the first listed method that declares ablations, else the first installed one that does
        candidates = (*methods, *sorted(plugins.methods))
        ablation = next(filter(None, (ablation_for(m, plugins) for m in candidates)), None)
        if ablation is None:
            raise SpeedqError("--ablations: no installed method declares ablations: drop --ablations")
    all_methods = tuple(dict.fromkeys((*methods, *([ablation.method] if ablation else []))))
    for method in all_methods:
        impl = plugins.method(method)
        for b in bits:
            if b not in impl.supported_bits:
                raise SchemeError(
                    f"method {method!r} does not support {b}-bit (it supports {', '.join(map(str, impl.supported_bits))}): "
                    f"drop {b} from --bits or {method} from --methods"
                )
    scoped = split_options(dict(options or {}), all_methods)
    expanded = expand_benchmarks(registry, benchmarks)
    check_benchmarks(expanded, lmudata, plugins.benchmark_writers())

    def config(method: str, b: int, extra: dict[str, Any]) -> RunConfig:
        return resolve_config(registry, plugins, model, method, b, benchmarks=expanded, seed=seed,
                              model_path=model_path, options={**scoped[method], **extra}, calib_data=calib_data,
                              calib_images=calib_images, calib_samples=calib_samples)

    ref = reference_config(registry, model, expanded, seed, model_path)
    cells = [Cell(DTYPE_NAMES[registry.model(model).dtype][0], "reference", ref)]
    wanted = [(m, b, {}, "main") for m in methods for b in bits]
    if ablation:
        wanted += [(ablation.method, b, {}, "ablation") for b in bits]
        wanted += [(ablation.method, b, v, "ablation") for b in bits for v in ablation.variants]
    seen: set[str] = set()
    for method, b, extra, role in wanted:
        cfg = config(method, b, extra)
        cell = Cell(cell_name(method, cfg.options), role, cfg)
        if cell.dir_name not in seen:
            seen.add(cell.dir_name)
            cells.append(cell)
    return ComparePlan(model, expanded, tuple(cells), ablation)


# -- evaluating without quantizing ----------------------------------------------------------------


def evaluate_model(
    config: RunConfig,
    run_dir: Path,
    registry: Registry,
    plugins: Plugins,
    progress: Callable[[str], None] | None = None,
    lmudata: str | None = None,
    benchmarks: tuple[str, ...] | None = None,
    model_path: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run directory's model on ``benchmarks`` (default ``config.benchmarks``): the
    preset's float model for method ``none``, else the run's packed ``quantized/`` export reloaded
    into the preset's skeleton. Writes size.json, results.json (scores of other benchmarks already
    there are kept; ``config`` stays the run's) and report.md. ``model_path`` overrides where the
    weights (or, for a quantized run, the skeleton's non-quantized weights) come from."""
    from speedq_core.evaluate import evaluate
    from speedq_core.export import load_quantized
    from speedq_core.models import load_model
    from speedq_core.size import size_report

    log = progress or (lambda msg: None)
    preset = registry.model(config.model)
    adapter = plugins.family(preset.family)
    quantized = None if config.method == NO_METHOD else run_dir / "quantized"
    if quantized is not None and not (quantized / "quant_config.json").is_file():
        raise SpeedqError(f"{run_dir} has no finished quantized/ export: finish the run first (rerun speedq run "
                          f"with the same options)")
    torch.manual_seed(config.seed)
    loaded = load_model(preset, adapter, model_path or config.model_path, seed=config.seed)
    log(f"model {preset.name}: {loaded.source}")
    if quantized is not None:
        load_quantized(loaded.model, quantized)
        log(f"loaded {quantized}")
    size = size_report(loaded.model, adapter.part_of, export_dir=quantized)
    write_json_atomic(run_dir / "size.json", size.to_json())
    name = config.label if quantized is not None else f"{config.model}-{DTYPE_NAMES[preset.dtype][0]}"
    start = time.perf_counter()
    scores = evaluate(adapter, loaded.model, loaded.processor, list(benchmarks or config.benchmarks),
                      work_dir=run_dir / "eval", model_name=name, lmudata=lmudata,
                      generators=plugins.benchmark_writers())
    old_file = run_dir / "results.json"
    old = json.loads(old_file.read_text()) if old_file.is_file() else {}
    results = {"config": json.loads(json.dumps(asdict(config))),
               "timings": {**old.get("timings", {}), "eval_s": time.perf_counter() - start},
               "size": size.to_json(), "scores": {**old.get("scores", {}), **scores}}
    if quantized is None:
        results["dtype"] = preset.dtype
    write_json_atomic(old_file, results)
    write_text_atomic(run_dir / "report.md", run_report_md(results))
    return results


def read_run_config(run_dir: Path) -> RunConfig:
    """The RunConfig a run directory's run.json holds."""
    meta = run_dir / "run.json"
    if not meta.is_file():
        raise SpeedqError(f"{run_dir} has no run.json: pass a directory made by speedq run or speedq compare")
    data = json.loads(meta.read_text())
    data["benchmarks"] = tuple(data.get("benchmarks", ()))
    return RunConfig(**data)


# -- running --------------------------------------------------------------------------------------


def run_compare(
    plan: ComparePlan,
    out_dir: Path,
    registry: Registry,
    plugins: Plugins,
    progress: Callable[[str], None] | None = None,
    lmudata: str | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every cell of ``plan`` under ``out_dir/runs/``, rewriting compare.json after
    each; then write the reports. Returns the compare document."""
    log = progress or (lambda msg: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    done: list[tuple[Cell, dict[str, Any]]] = []
    for i, cell in enumerate(plan.cells, 1):
        run_dir = out_dir / "runs" / cell.dir_name
        where = f"[{i}/{len(plan.cells)}] {cell.name} {cell.config.bits}-bit ({run_dir})"
        prepare_run_dir(cell.config, run_dir)
        if (run_dir / "results.json").is_file():
            log(f"{where}: finished, reusing")
            results = json.loads((run_dir / "results.json").read_text())
        else:
            log(f"{where}: running")
            if cell.role == "reference":
                results = evaluate_model(cell.config, run_dir, registry, plugins, log, lmudata)
            else:
                results = execute(cell.config, run_dir, registry, plugins, log, lmudata)
        done.append((cell, results))
        doc = build_document([(c.name, c.role, r, f"runs/{c.dir_name}") for c, r in done], plan.ablation)
        write_json_atomic(out_dir / COMPARE_FILE, doc)
    write_reports(doc, out_dir)
    return doc


# -- the compare document -------------------------------------------------------------------------


def _cell_entry(name: str, role: str, results: dict[str, Any], run_dir: str) -> dict[str, Any]:
    config, size = results["config"], results["size"]
    quantized = [c["name"] for c in size["components"] if c["n_quantized"]]
    mib, bits_quantized = size_summary(size)
    return {
        "name": name, "role": role, "method": config["method"], "bits": config["bits"], "run_dir": run_dir,
        "schemes": config["schemes"], "config": config,
        "quantized_components": sorted(quantized, key=lambda p: (QUANTIZABLE_PARTS + (p,)).index(p)),
        "scores": results.get("scores", {}),
        "size": {"file_mib": mib, "bits_per_weight_quantized": bits_quantized if quantized else None,
                 "bits_per_weight_total": 8 * size["nbytes"] / size["n_weights"], "n_weights": size["n_weights"],
                 "export_bytes": size["export_bytes"], "nbytes": size["nbytes"]},
        "timings": results.get("timings", {}),
    }


def build_document(cells: list[tuple[str, str, dict[str, Any], str]], ablation: Ablation | None = None) -> dict[str, Any]:
    """compare.json from ``(name, role, results.json dict, run dir relative to the report)`` per cell.

    ``file_mib`` is the packed export on disk (the tensors' bytes for the reference);
    ``bits_per_weight_quantized`` is over the components holding quantized weights (None for the
    reference), ``bits_per_weight_total`` over every weight. ``avg`` is the mean Overall over the
    document's benchmarks, None unless the cell has all of them."""
    models = {}
    for _, _, results, run_dir in cells:
        models.setdefault(results["config"]["model"], run_dir)
    if len(models) > 1:
        (m1, d1), (m2, d2) = list(models.items())[:2]
        raise SpeedqError(f"{d1} is a run of {m1} but {d2} is a run of {m2}: report one model at a time")
    entries = [_cell_entry(*cell) for cell in cells]
    benchmarks: list[str] = []
    for entry in entries:
        benchmarks += [b for b in entry["config"]["benchmarks"] if b not in benchmarks]
        benchmarks += [b for b in entry["scores"] if b not in benchmarks]
    for entry in entries:
        values = [entry["scores"][b]["Overall"] for b in benchmarks if b in entry["scores"]]
        entry["avg"] = sum(values) / len(values) if values and len(values) == len(benchmarks) else None
    return {"format": FORMAT, "version": VERSION, "model": next(iter(models), None), "benchmarks": benchmarks,
            "ablation": json.loads(json.dumps(asdict(ablation))) if ablation else None, "cells": entries}


def strip_timings(doc: Any) -> Any:
    """``doc`` without its ``timings`` entries (wall-clock numbers, the only part of compare.json that
    differs between two runs of the same comparison)."""
    if isinstance(doc, dict):
        return {k: strip_timings(v) for k, v in doc.items() if k != "timings"}
    if isinstance(doc, list):
        return [strip_timings(v) for v in doc]
    return doc


def write_reports(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """compare.json, compare.md, one CSV per table and figure1.png (when any row has an Avg) in
    ``out_dir``; returns the paths written."""
    from speedq_core.lmudata import atomic_write_bytes
    from speedq_core.plot import accuracy_vs_size_png

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / COMPARE_FILE]
    write_json_atomic(written[0], doc)
    for stem, grid in compare_grids(doc).items():
        write_text_atomic(out_dir / f"{stem}.csv", grid.csv())
        written.append(out_dir / f"{stem}.csv")
    png = accuracy_vs_size_png(doc)
    if png is not None:
        atomic_write_bytes(out_dir / FIGURE_FILE, png)
        written.append(out_dir / FIGURE_FILE)
    else:
        (out_dir / FIGURE_FILE).unlink(missing_ok=True)
    write_text_atomic(out_dir / "compare.md", compare_report_md(doc, FIGURE_FILE if png is not None else None))
    written.append(out_dir / "compare.md")
    return written


def load_document(paths: list[Path], out_dir: Path) -> dict[str, Any]:
    """A compare document re-read from existing results.json files, nothing recomputed.

    Each path is a compare directory (its compare.json names the cells, their roles and run dirs)
    or a run directory (a cell named after its method and ablated options; method ``none`` is a
    reference). Run directories are recorded relative to ``out_dir``, where the reports go."""
    import os

    cells: list[tuple[str, str, dict[str, Any], str]] = []
    ablation = None
    for path in paths:
        if (path / COMPARE_FILE).is_file():
            doc = json.loads((path / COMPARE_FILE).read_text())
            if doc.get("format") != FORMAT:
                raise SpeedqError(f"{path / COMPARE_FILE} is not a speedq compare document: pass its run directories")
            if doc.get("ablation"):
                ablation = Ablation(**{**doc["ablation"], "variants": tuple(doc["ablation"]["variants"])})
            members = [(c["name"], c["role"], path / c["run_dir"]) for c in doc["cells"]]
        elif (path / "results.json").is_file():
            results = json.loads((path / "results.json").read_text())
            method, options = results["config"]["method"], results["config"]["options"]
            name = reference_name(results) if method == NO_METHOD else cell_name(method, options)
            role = "reference" if method == NO_METHOD else "main" if name == method else "ablation"
            if role == "ablation":
                ablation = ablation or ablation_for(method)
            members = [(name, role, path)]
        else:
            raise SpeedqError(f"{path} holds neither compare.json nor results.json: pass a finished run or compare directory")
        for name, role, run_dir in members:
            results_file = run_dir / "results.json"
            if not results_file.is_file():
                raise SpeedqError(f"{results_file} is missing: finish that run (rerun speedq compare) or leave it out")
            results = json.loads(results_file.read_text())
            cells.append((name, role, results, Path(os.path.relpath(run_dir, out_dir)).as_posix()))
    if not cells:
        raise SpeedqError("nothing to report: pass run or compare directories")
    return build_document(cells, ablation)
