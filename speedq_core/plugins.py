"""Plugin discovery and lookup: every family and method comes from an entry point in group ``speedq``.

Built-in plugins (this distribution's own entry points) always load. Outside plugins load too, unless
``SPEEDQ_LOAD_PLUGINS`` is set: then only the comma-separated entry-point names it lists load (an
empty value loads none), which keeps tests and bug reports reproducible.

A plugin that fails to import, or whose hook raises, is recorded in ``Plugins.broken`` with the error
and the rest still work. Two plugins providing the same name is an error naming both.
"""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from speedq_core import hookspecs
from speedq_core.errors import PluginError, UnknownNameError

ENTRY_POINT_GROUP = "speedq"
LOAD_ENV = "SPEEDQ_LOAD_PLUGINS"
BUILTIN_DIST = "speedq"


@dataclass(frozen=True)
class Provided:
    """One family or method and where it came from."""

    name: str
    obj: Any
    plugin: str  # entry-point name
    source: str  # file the plugin module was loaded from


@dataclass
class Plugins:
    """What discovery found: families and methods by name, and the plugins that failed."""

    families: dict[str, Provided] = field(default_factory=dict)
    methods: dict[str, Provided] = field(default_factory=dict)
    benchmarks: dict[str, Provided] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # plugin name -> one-line error
    loaded: dict[str, str] = field(default_factory=dict)  # plugin name -> source file
    manager: pluggy.PluginManager | None = None

    def family(self, name: str):
        """The adapter registered as ``name``, or an UnknownNameError listing what is registered."""
        if name not in self.families:
            raise UnknownNameError("model family", name, self.families)
        return self.families[name].obj

    def method(self, name: str):
        """The method registered as ``name``, or an UnknownNameError listing what is registered."""
        if name not in self.methods:
            raise UnknownNameError("method", name, self.methods)
        return self.methods[name].obj

    def benchmark_writers(self) -> dict:
        """Generated benchmarks by name -> ``write(lmudata_dir) -> tsv path`` (for evaluate)."""
        return {name: p.obj.write for name, p in self.benchmarks.items()}


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    seen: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in eps:  # an editable + regular install can list the same entry point twice
        seen.setdefault(f"{ep.name}={ep.value}", ep)
    return list(seen.values())


def _is_builtin(ep: importlib.metadata.EntryPoint) -> bool:
    dist = getattr(ep, "dist", None)
    return dist is not None and dist.metadata["Name"] == BUILTIN_DIST


def _allowed(ep: importlib.metadata.EntryPoint) -> bool:
    wanted = os.environ.get(LOAD_ENV)
    if wanted is None or _is_builtin(ep):
        return True
    return ep.name in {w.strip() for w in wanted.split(",") if w.strip()}


def get_plugins(extra: dict[str, Any] | None = None) -> Plugins:
    """Discover plugins afresh (a new manager each call).

    ``extra`` maps a plugin name to an already-imported module or object with hookimpls; tests use it
    to register a plugin through the real manager without installing a package.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    found = Plugins(manager=pm)
    candidates: list[tuple[str, Any]] = []
    for ep in sorted(_entry_points(), key=lambda e: (not _is_builtin(e), e.name)):
        if not _allowed(ep):
            continue
        try:
            candidates.append((ep.name, ep.load()))
        except Exception as exc:  # a broken plugin must not stop discovery of the others
            found.broken[ep.name] = f"import failed: {type(exc).__name__}: {exc}"
    candidates.extend((extra or {}).items())
    for name, plugin in candidates:
        try:
            pm.register(plugin, name=name)
        except Exception as exc:
            found.broken[name] = f"registration failed: {type(exc).__name__}: {exc}"
            continue
        found.loaded[name] = getattr(plugin, "__file__", None) or getattr(plugin, "__name__", repr(plugin))
    while True:  # check_pending reports one plugin with a misspelt hook at a time
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            bad = pm.get_name(exc.plugin) or "?"
            found.broken[bad] = f"unknown hook: {exc}"
            pm.unregister(exc.plugin)
            found.loaded.pop(bad, None)
    _collect(found, "speedq_families", found.families)
    _collect(found, "speedq_methods", found.methods)
    _collect(found, "speedq_benchmarks", found.benchmarks)
    return found


def _collect(found: Plugins, hook_name: str, into: dict[str, Provided]) -> None:
    """Call each plugin's implementation of ``hook_name`` on its own so results carry their origin."""
    assert found.manager is not None
    for impl in getattr(found.manager.hook, hook_name).get_hookimpls():
        plugin = impl.plugin_name
        try:
            items = impl.function()
        except Exception as exc:
            found.broken[plugin] = f"{hook_name}() raised {type(exc).__name__}: {exc}"
            continue
        for obj in items or []:
            name = getattr(obj, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {plugin!r}: {hook_name}() returned {obj!r} without a name")
            if name in into:
                other = into[name].plugin
                raise PluginError(
                    f"{hook_name[7:]} entry {name!r} is provided by both plugin {other!r} and plugin "
                    f"{plugin!r}: uninstall one of them or set {LOAD_ENV} to choose"
                )
            into[name] = Provided(name, obj, plugin, found.loaded.get(plugin, "?"))
