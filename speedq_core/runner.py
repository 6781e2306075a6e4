"""One run: load model -> method.quantize -> export -> size -> evaluate -> report.

A run directory is the unit of resumption. Each step writes its output atomically and is skipped
when that output already exists, so rerunning a killed ``speedq run`` continues where it stopped:

    runs/<model>-<method>-<scheme>/
        run.json        the resolved configuration (a rerun with a different one is refused)
        quantized/      packed low-bit safetensors + quant_config.json
        dequantized/    a float checkpoint plain transformers loads
        quantize_summary.json  the method's own report (per-layer errors, timings)
        size.json       bytes and bits per weight per component
        eval/           VLMEvalKit work dirs; results.json, report.md
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from speedq_core.adapter import COMPONENTS, EXTRA_PARTS
from speedq_core.errors import SpeedqError, UnknownNameError
from speedq_core.calibration import CalibrationSet
from speedq_core.method import QuantContext
from speedq_core.models import LoadedModel, load_model, resolve_weights
from speedq_core.plugins import Plugins, get_plugins
from speedq_core.registry import Registry, load_registry
from speedq_core.report import run_report_md

QUANTIZABLE_PARTS = (*COMPONENTS, *EXTRA_PARTS)  # EXTRA_PARTS: embeddings, lm_head


@dataclass(frozen=True)
class RunConfig:
    """What a run does; written to run.json. ``schemes`` maps each quantized part to its scheme."""

    model: str
    method: str
    bits: int
    schemes: dict[str, str]
    benchmarks: tuple[str, ...] = ()
    seed: int = 42
    model_path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    calib_data: str | None = None  # LLaVA JSON, image folder, or a generated benchmark's name
    calib_images: str | None = None  # image root of a LLaVA JSON
    calib_samples: int = 128  # resolved: the user's --calib-samples or the method's default

    @property
    def label(self) -> str:
        names = sorted(set(self.schemes.values()))
        return f"{self.model}-{self.method}-{'+'.join(names) if names else 'bf16'}"


def resolve_config(
    registry: Registry,
    plugins: Plugins,
    model: str,
    method: str,
    bits: int,
    scheme: str | None = None,
    components: tuple[str, ...] | None = None,
    benchmarks: tuple[str, ...] = (),
    seed: int = 42,
    model_path: str | None = None,
    options: dict[str, Any] | None = None,
    calib_data: str | None = None,
    calib_images: str | None = None,
    calib_samples: int | None = None,
) -> RunConfig:
    """Validate every name up front (model, method, bits, scheme, components) into a RunConfig."""
    preset = registry.model(model)
    plugins.family(preset.family)
    impl = plugins.method(method)
    scheme_name = scheme or impl.scheme_for_bits(bits)
    resolved = registry.scheme(scheme_name)
    if resolved.bits != bits:
        raise SpeedqError(f"scheme {scheme_name} is {resolved.bits}-bit but --bits {bits} was asked: drop one")
    parts = components or impl.default_components
    for part in parts:
        if part not in QUANTIZABLE_PARTS:
            raise UnknownNameError("component", part, QUANTIZABLE_PARTS)
    expanded: list[str] = []
    for bench in benchmarks:
        expanded.extend(registry.suites[bench].benchmarks if bench in registry.suites else [bench])
    if calib_data is None:
        calib_data = preset.calibration  # registry.toml: the tiny presets name the synthetic train split
    return RunConfig(model, method, bits, {p: resolved.name for p in parts}, tuple(expanded), seed,
                     model_path, dict(options or {}), calib_data, calib_images,
                     calib_samples or impl.calibration_samples)


def build_calibration(config: RunConfig, plugins: Plugins, processor: Any) -> CalibrationSet | None:
    """The run's calibration set: a generated benchmark's samples, a LLaVA JSON + image root, or an
    image folder (vision-only); None when no source was given."""
    source = config.calib_data
    if source is None:
        return None
    n = config.calib_samples
    if source in plugins.benchmarks:
        provider = plugins.benchmarks[source].obj
        if provider.samples is None:
            raise SpeedqError(f"benchmark {source} provides no training samples: pick another --calib-data")
        calib = CalibrationSet.from_triples(provider.samples(n, config.seed), n=n)
    elif Path(source).is_dir():
        calib = CalibrationSet.from_image_folder(source, n=n, seed=config.seed)
    elif Path(source).is_file():
        if not config.calib_images:
            raise SpeedqError(f"--calib-data {source} needs --calib-images DIR, the root its image paths are relative to")
        calib = CalibrationSet.from_llava_json(source, config.calib_images, n=n, seed=config.seed)
    else:
        raise SpeedqError(
            f"--calib-data {source} is neither a file, a folder nor a generated benchmark "
            f"({', '.join(sorted(plugins.benchmarks)) or 'none installed'}): fix the path"
        )
    return calib.with_processor(processor)


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to a temp file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside ``path`` and rename it into place."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _without_stages(config: dict[str, Any]) -> dict[str, Any]:
    """A run.json minus ``options.stages``: running a subset of a staged method's stages (SPEED-Q's
    ``--stages``) continues the same run, it does not make a different one."""
    options = {k: v for k, v in config.get("options", {}).items() if k != "stages"}
    return {**config, "options": options}


def prepare_run_dir(config: RunConfig, run_dir: Path) -> None:
    """Create ``run_dir`` with run.json, or check that an existing one was made by the same config."""
    meta = run_dir / "run.json"
    wanted = json.loads(json.dumps(asdict(config)))
    if meta.exists():
        have = json.loads(meta.read_text())
        if _without_stages(have) != _without_stages(wanted):
            diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
            raise SpeedqError(
                f"{run_dir} holds a run with a different {', '.join(diff)}: pass --out another "
                f"folder or delete it"
            )
        return
    write_json_atomic(meta, wanted)


def execute(
    config: RunConfig,
    run_dir: Path,
    registry: Registry | None = None,
    plugins: Plugins | None = None,
    progress: Callable[[str], None] | None = None,
    lmudata: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) every step of ``config`` in ``run_dir``; returns the results dict."""
    from speedq_core.export import load_quantized, save_dequantized, save_quantized
    from speedq_core.size import size_report

    registry = registry or load_registry()
    plugins = plugins or get_plugins()
    log = progress or (lambda msg: None)
    preset = registry.model(config.model)
    adapter = plugins.family(preset.family)
    method = plugins.method(config.method)
    if not preset.tiny or config.model_path:
        resolve_weights(preset, config.model_path)  # fail before creating anything
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_run_dir(config, run_dir)
    timings: dict[str, float] = {}

    torch.manual_seed(config.seed)
    loaded: LoadedModel = load_model(preset, adapter, config.model_path, seed=config.seed)
    log(f"model {preset.name}: {loaded.source}")
    quant_dir = run_dir / "quantized"
    # --stages asks a staged method to (re)run some stages: it reuses its own finished stages, and
    # the export is redone from its result
    rerun = "stages" in config.options
    if (quant_dir / "quant_config.json").exists() and not rerun:
        log(f"reusing {quant_dir}")
        load_quantized(loaded.model, quant_dir)
    else:
        ctx = QuantContext(
            schemes={p: registry.scheme(s) for p, s in config.schemes.items()},
            out_dir=run_dir / "stages", seed=config.seed, options=config.options, progress=log,
            calibration=build_calibration(config, plugins, loaded.processor) if method.needs_calibration else None,
        )
        start = time.perf_counter()
        summary = method.quantize(loaded.model, adapter, ctx)
        timings["quantize_s"] = time.perf_counter() - start
        # the method's report (per-layer errors, seconds) stays out of the export, so that the same
        # weights always give the same bytes on disk
        write_json_atomic(run_dir / "quantize_summary.json", summary)
        save_quantized(loaded.model, quant_dir, {"method": config.method, "model": config.model})
    if rerun or not (run_dir / "dequantized" / "config.json").exists():
        save_dequantized(loaded.model, run_dir / "dequantized")
    size = size_report(loaded.model, adapter.part_of, export_dir=quant_dir)
    write_json_atomic(run_dir / "size.json", size.to_json())
    results: dict[str, Any] = {"config": asdict(config), "timings": timings, "size": size.to_json()}
    if config.benchmarks:
        from speedq_core.evaluate import evaluate

        scores = evaluate(adapter, loaded.model, loaded.processor, list(config.benchmarks),
                          work_dir=run_dir / "eval", model_name=config.label, lmudata=lmudata,
                          generators=plugins.benchmark_writers())
        results["scores"] = scores
    write_json_atomic(run_dir / "results.json", results)
    write_text_atomic(run_dir / "report.md", run_report_md(results))
    return results
