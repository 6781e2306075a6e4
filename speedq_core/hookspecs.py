"""The plugin API: hooks a speedq plugin may implement (entry-point group ``speedq``).

A plugin is a module exposing functions marked with ``hookimpl``; it is registered by an entry point
in the ``speedq`` group of its package's metadata. speedq's own families and methods are registered
the same way, from ``pyproject.toml``.

    from speedq_core.hookspecs import hookimpl

    @hookimpl
    def speedq_families():
        return [MyFamilyAdapter()]
"""
from __future__ import annotations

import pluggy

PROJECT = "speedq"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def speedq_families() -> list:
    """Return the model-family adapters (``speedq_core.adapter.FamilyAdapter``) this plugin provides.

    Each adapter's ``name`` must be unique across all plugins.
    """


@hookspec
def speedq_methods() -> list:
    """Return the quantization methods (``speedq_core.method.Method``) this plugin provides.

    Each method's ``name`` must be unique across all plugins.
    """


@hookspec
def speedq_benchmarks() -> list:
    """Return benchmarks this plugin writes on demand (``speedq_core.lmudata.GeneratedBenchmark``).

    Each has a ``name`` (the VLMEvalKit dataset name it is evaluated under) and
    ``write(lmudata_dir) -> Path``, which writes ``<lmudata_dir>/<name>.tsv`` in VLMEvalKit's format.
    """
