"""The ``speedq`` command. Each command parses, resolves names and calls one library function."""
from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from speedq_core.adapter import COMPONENTS, EXTRA_PARTS
from speedq_core.errors import SpeedqError

console = Console()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """speedq: quantize whole vision-language models to 4 and 2 bits (SPEED-Q and baselines)."""


@cli.command("list")
def list_cmd() -> None:
    """Show installed plugins, families, methods, model presets, schemes and benchmark suites."""
    from speedq_core.plugins import get_plugins
    from speedq_core.registry import load_registry

    plugins, registry = get_plugins(), load_registry()
    table = Table(title="plugins")
    for col in ("plugin", "status", "source"):
        table.add_column(col)
    for name, source in sorted(plugins.loaded.items()):
        table.add_row(name, "ok", source)
    for name, error in sorted(plugins.broken.items()):
        table.add_row(name, f"[red]broken[/red]: {error}", "")
    console.print(table)

    table = Table(title="families")
    for col in ("family", "plugin", "description"):
        table.add_column(col)
    for name, p in sorted(plugins.families.items()):
        table.add_row(name, p.plugin, p.obj.description)
    console.print(table)

    table = Table(title="methods")
    for col in ("method", "plugin", "bits: default scheme", "components", "description"):
        table.add_column(col)
    for name, p in sorted(plugins.methods.items()):
        schemes = ", ".join(f"{b}: {s}" for b, s in sorted(p.obj.default_schemes.items()))
        table.add_row(name, p.plugin, schemes, ",".join(p.obj.default_components), p.obj.description)
    console.print(table)

    table = Table(title=f"model presets ({registry.path})")
    for col in ("model", "family", "weights", "description"):
        table.add_column(col)
    for name, m in registry.models.items():
        family = m.family if m.family in plugins.families else f"[red]{m.family} (not installed)[/red]"
        table.add_row(name, family, "built in code" if m.tiny else m.hf_id, m.description)
    console.print(table)

    table = Table(title="schemes")
    for col in ("scheme", "bits", "group", "scale bits", "scale group", "bits/weight"):
        table.add_column(col)
    for name, s in registry.schemes.items():
        table.add_row(name, str(s.bits), str(s.group_size), str(s.scale_bits or "fp16"),
                      str(s.scale_group_size or "-"), f"{s.bits_per_weight():.3f}")
    console.print(table)

    table = Table(title="benchmark suites")
    for col in ("suite", "benchmarks", "description"):
        table.add_column(col)
    for name, s in registry.suites.items():
        table.add_row(name, ", ".join(s.benchmarks), s.description)
    console.print(table)


@cli.command("info")
@click.argument("model")
def info_cmd(model: str) -> None:
    """Parameter counts per component and the linears that would be quantized (no weights needed)."""
    from speedq_core.info import model_info
    from speedq_core.plugins import get_plugins
    from speedq_core.registry import load_registry

    preset = load_registry().model(model)
    info = model_info(preset, get_plugins().family(preset.family))
    table = Table(title=f"{preset.name} ({preset.family}, {preset.hf_id or 'tiny'}, {preset.dtype})")
    for col in ("part", "params", f"{preset.dtype} MiB", "linears", "weights in linears"):
        table.add_column(col, justify="right" if col != "part" else "left")
    for part in (*COMPONENTS, *EXTRA_PARTS, "other"):
        n_linear = sum(info.linears.get(part, {}).values())
        table.add_row(part, f"{info.params[part] / 1e6:.1f}M", f"{info.size_mib(part):.1f}",
                      str(n_linear), f"{info.linear_weights.get(part, 0) / 1e6:.1f}M")
    table.add_row("total", f"{info.params['total'] / 1e6:.1f}M", f"{info.size_mib():.1f}", "", "",
                  style="bold")
    console.print(table)
    for part in (*COMPONENTS, *EXTRA_PARTS):
        patterns = info.linears.get(part, {})
        if patterns:
            listed = ", ".join(f"{p} x{n}" if n > 1 else p for p, n in patterns.items())
            console.print(f"[bold]{part}[/bold] linears: {listed}")


def _parse_options(pairs: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` pairs; values parse as JSON where they can (numbers, true/false), else stay strings."""
    import json

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


@cli.command("run")
@click.option("--method", default="rtn", show_default=True, help="quantization method (see `speedq list`)")
@click.option("--model", default="tiny-internvl", show_default=True, help="model preset")
@click.option("--bits", default=4, show_default=True, type=int, help="weight bits")
@click.option("--scheme", default=None, help="override the method's default scheme, e.g. w4g32g128")
@click.option("--components", default=None,
              help="comma list of vision,projector,language,embeddings,lm_head (default: the method's)")
@click.option("--data", default=None, help="benchmarks or suites, comma separated (tiny presets: synthetic)")
@click.option("--no-eval", is_flag=True, help="quantize and export only")
@click.option("--model-path", default=None, help="folder with the real weights (save_pretrained layout)")
@click.option("--out", default=None, help="run directory (default runs/<model>-<method>-<scheme>)")
@click.option("--lmudata", default=None, help="VLMEvalKit data folder (default $LMUData or ~/LMUData)")
@click.option("--calib-data", default=None,
              help="calibration data: LLaVA JSON, image folder, or a generated benchmark (tiny presets: SpeedqSynth_TRAIN)")
@click.option("--calib-images", default=None, help="image root of a --calib-data JSON")
@click.option("--calib-samples", default=None, type=int,
              help="calibration/training samples (default: the method's; 128 for post-training methods)")
@click.option("--option", "-o", "options", multiple=True, help="method option KEY=VALUE (repeatable)")
@click.option("--stages", default=None, help="staged methods (speedq): run only these stages, e.g. 2,3, "
              "in an existing run directory; finished stages are reused")
@click.option("--seed", default=42, show_default=True, type=int)
def run_cmd(method, model, bits, scheme, components, data, no_eval, model_path, out, lmudata, calib_data,
            calib_images, calib_samples, options, stages, seed) -> None:
    """Quantize MODEL with METHOD, export it, size it and evaluate it, in one resumable run directory."""
    from pathlib import Path

    from speedq_core.plugins import get_plugins
    from speedq_core.registry import load_registry
    from speedq_core.runner import execute, resolve_config

    registry, plugins = load_registry(), get_plugins()
    preset = registry.model(model)
    benchmarks = () if no_eval else (_split(data) or preset.benchmarks)
    method_options = _parse_options(options)
    if stages:
        method_options["stages"] = stages
    config = resolve_config(registry, plugins, model, method, bits, scheme, _split(components) or None,
                            benchmarks, seed, model_path, method_options, calib_data, calib_images,
                            calib_samples)
    run_dir = Path(out) if out else Path("runs") / config.label
    console.print(f"[bold]speedq run[/bold] {config.label} -> {run_dir}")
    results = execute(config, run_dir, registry, plugins, progress=console.log, lmudata=lmudata)
    from speedq_core.report import render_run

    console.print(render_run(results))
    console.print(f"results: {run_dir / 'results.json'}")


def _default_benchmarks(preset, data: str | None) -> tuple[str, ...]:
    """--data, else the synthetic suite for a tiny preset and the paper's suite for a real one."""
    return _split(data) or preset.benchmarks or ("paper",)


def _print_compare(doc: dict, out_dir) -> None:
    from speedq_core.report import compare_grids

    for grid in compare_grids(doc).values():
        console.print(grid.rich())
    console.print(f"reports: {out_dir / 'compare.md'} (tables also as CSV, source {out_dir / 'compare.json'})",
                  markup=False)


@cli.command("compare")
@click.option("--model", default="tiny-internvl", show_default=True, help="model preset")
@click.option("--methods", default="rtn,gptq,awq,mbq,speedq", show_default=True, help="comma list of methods")
@click.option("--bits", default="4,2", show_default=True, help="comma list of weight bits")
@click.option("--data", default=None, help="benchmarks or suites, comma separated (default: synthetic for tiny "
              "presets, else paper)")
@click.option("--out", default=None, help="compare directory (default runs/<model>-compare)")
@click.option("--ablations", is_flag=True, help="also run SPEED-Q's Table 5 variants (loss=task/distill, joint=true)")
@click.option("--model-path", default=None, help="folder with the real weights (save_pretrained layout)")
@click.option("--lmudata", default=None, help="VLMEvalKit data folder (default $LMUData or ~/LMUData)")
@click.option("--calib-data", default=None, help="calibration data (see speedq run)")
@click.option("--calib-images", default=None, help="image root of a --calib-data JSON")
@click.option("--calib-samples", default=None, type=int,
              help="calibration/training samples (default: the method's; 128 for post-training methods)")
@click.option("--option", "-o", "options", multiple=True,
              help="KEY=VALUE for every method, METHOD.KEY=VALUE for one (repeatable)")
@click.option("--seed", default=42, show_default=True, type=int)
def compare_cmd(model, methods, bits, data, out, ablations, model_path, lmudata, calib_data, calib_images,
                calib_samples, options, seed) -> None:
    """Run every method at every bit width plus the float reference, then report them side by side.

    Each cell is a resumable run directory under OUT/runs/; rerunning continues where it stopped."""
    from functools import partial
    from pathlib import Path

    from rich.markup import escape

    from speedq_core.compare import plan_compare, run_compare
    from speedq_core.plugins import get_plugins
    from speedq_core.registry import load_registry

    registry, plugins = load_registry(), get_plugins()
    try:
        widths = tuple(int(b) for b in _split(bits))
    except ValueError:
        raise click.BadParameter(f"{bits!r} is not a comma list of integers", param_hint="--bits") from None
    plan = plan_compare(registry, plugins, model, _split(methods), widths,
                        _default_benchmarks(registry.model(model), data), ablations, _parse_options(options), seed,
                        model_path, calib_data, calib_images, calib_samples, lmudata)
    out_dir = Path(out) if out else Path("runs") / f"{model}-compare"
    console.print(f"[bold]speedq compare[/bold] {model}: {len(plan.cells)} cells -> {escape(str(out_dir))}")
    doc = run_compare(plan, out_dir, registry, plugins, progress=partial(console.log, markup=False), lmudata=lmudata)
    _print_compare(doc, out_dir)


@cli.command("report")
@click.argument("paths", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", default=None, help="where to write the reports (default: the compare directory, if one "
              "was given alone, else reports/<model>)")
def report_cmd(paths, out) -> None:
    """Re-render the comparison reports of compare or run directories from their results.json files."""
    from pathlib import Path

    from speedq_core.compare import COMPARE_FILE, load_document, write_reports

    dirs = [Path(p) for p in paths]
    alone = len(dirs) == 1 and (dirs[0] / COMPARE_FILE).is_file()
    out_dir = Path(out) if out else dirs[0] if alone else None
    doc = load_document(dirs, out_dir or Path("reports"))
    if out_dir is None:
        out_dir = Path("reports") / doc["model"]
        doc = load_document(dirs, out_dir)
    write_reports(doc, out_dir)
    _print_compare(doc, out_dir)


@cli.command("eval")
@click.option("--model", default=None, help="model preset (default: the --run's)")
@click.option("--run", "run", default=None, type=click.Path(file_okay=False),
              help="a finished run directory: evaluate its quantized/ export")
@click.option("--data", default=None, help="benchmarks or suites, comma separated (default: the run's, else "
              "synthetic for tiny presets, paper otherwise)")
@click.option("--model-path", default=None, help="folder with the real weights (save_pretrained layout)")
@click.option("--out", default=None, help="directory of a float evaluation (default runs/<model>-<dtype>)")
@click.option("--lmudata", default=None, help="VLMEvalKit data folder (default $LMUData or ~/LMUData)")
@click.option("--seed", default=42, show_default=True, type=int)
def eval_cmd(model, run, data, model_path, out, lmudata, seed) -> None:
    """Evaluate the float model, or a finished run's quantized export, and write results.json/report.md."""
    from pathlib import Path

    from speedq_core.compare import (DTYPE_NAMES, evaluate_model, expand_benchmarks, read_run_config,
                                     reference_config)
    from speedq_core.plugins import get_plugins
    from speedq_core.registry import load_registry
    from speedq_core.report import render_run
    from speedq_core.runner import prepare_run_dir

    registry, plugins = load_registry(), get_plugins()
    if run and out:
        raise SpeedqError("pass --run (evaluate that run) or --out (a float evaluation), not both")
    if not run and not model:
        raise SpeedqError("pass --model (evaluate the float model) or --run DIR (evaluate a finished run)")
    run_dir = Path(run) if run else None
    if run_dir is None:
        preset = registry.model(model)
        run_dir = Path(out) if out else Path("runs") / f"{model}-{DTYPE_NAMES[preset.dtype][0]}"
    if run or (run_dir / "run.json").is_file():
        config = read_run_config(run_dir)
        if model and model != config.model:
            raise SpeedqError(f"{run_dir} is a run of {config.model}, not {model}: drop --model or pick another dir")
        benchmarks = expand_benchmarks(registry, _split(data)) or config.benchmarks
    else:
        config = reference_config(registry, model, _default_benchmarks(preset, data), seed, model_path)
        benchmarks = config.benchmarks
        prepare_run_dir(config, run_dir)
    if not benchmarks:
        raise SpeedqError(f"{run_dir} was run without benchmarks: pass --data")
    console.print(f"[bold]speedq eval[/bold] {config.model} ({config.method}) on {', '.join(benchmarks)} -> {run_dir}")
    results = evaluate_model(config, run_dir, registry, plugins, console.log, lmudata, tuple(benchmarks), model_path)
    console.print(render_run(results))
    console.print(f"results: {run_dir / 'results.json'}")


def main() -> None:
    """Entry point: expected errors become one line on stderr and exit status 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        console.print("aborted", style="red")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SpeedqError as exc:
        Console(stderr=True).print(f"error: {exc}", style="red", soft_wrap=True, markup=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
