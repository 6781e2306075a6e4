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
@click.option("--components", default=None, help="comma list of vision,projector,language,lm_head")
@click.option("--data", default=None, help="benchmarks or suites, comma separated (tiny presets: synthetic)")
@click.option("--no-eval", is_flag=True, help="quantize and export only")
@click.option("--model-path", default=None, help="folder with the real weights (save_pretrained layout)")
@click.option("--out", default=None, help="run directory (default runs/<model>-<method>-<scheme>)")
@click.option("--lmudata", default=None, help="VLMEvalKit data folder (default $LMUData or ~/LMUData)")
@click.option("--calib-data", default=None,
              help="calibration data: LLaVA JSON, image folder, or a generated benchmark (tiny presets: SpeedqSynth_TRAIN)")
@click.option("--calib-images", default=None, help="image root of a --calib-data JSON")
@click.option("--calib-samples", default=128, show_default=True, type=int)
@click.option("--option", "-o", "options", multiple=True, help="method option KEY=VALUE (repeatable)")
@click.option("--seed", default=42, show_default=True, type=int)
def run_cmd(method, model, bits, scheme, components, data, no_eval, model_path, out, lmudata, calib_data,
            calib_images, calib_samples, options, seed) -> None:
    """Quantize MODEL with METHOD, export it, size it and evaluate it, in one resumable run directory."""
    from pathlib import Path

    from speedq_core.plugins import get_plugins
    from speedq_core.registry import load_registry
    from speedq_core.runner import execute, resolve_config

    registry, plugins = load_registry(), get_plugins()
    preset = registry.model(model)
    benchmarks = () if no_eval else (_split(data) or (("synthetic",) if preset.tiny else ()))
    config = resolve_config(registry, plugins, model, method, bits, scheme, _split(components) or None,
                            benchmarks, seed, model_path, _parse_options(options), calib_data, calib_images,
                            calib_samples)
    run_dir = Path(out) if out else Path("runs") / config.label
    console.print(f"[bold]speedq run[/bold] {config.label} -> {run_dir}")
    results = execute(config, run_dir, registry, plugins, progress=console.log, lmudata=lmudata)
    from speedq_core.report import render_run

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
