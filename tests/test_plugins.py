"""The plugin manager: discovery through entry points, origins, duplicates, broken plugins."""
import importlib.metadata
import types

import pytest

from speedq_core import plugins as plugins_mod
from speedq_core.errors import PluginError, UnknownNameError
from speedq_core.hookspecs import hookimpl
from speedq_core.method import Method
from speedq_core.plugins import get_plugins

BUILTIN_FAMILIES = {"internvl", "qwen2_vl", "fast_vlm", "llava"}


class _Fake(Method):
    name = "fake"
    default_schemes = {4: "w4g128"}


def _plugin(**hooks):
    """A module-like plugin object whose hookimpls are the given functions."""
    module = types.ModuleType("fake_plugin")
    for name, fn in hooks.items():
        fn.__name__ = name
        setattr(module, name, hookimpl(fn))
    return module


def test_builtins_come_from_entry_points_with_their_origin():
    found = get_plugins()
    eps = {ep.name for ep in importlib.metadata.entry_points(group="speedq")}
    assert BUILTIN_FAMILIES <= set(found.families)
    assert "rtn" in found.methods
    for provided in [*found.families.values(), *found.methods.values()]:
        assert provided.plugin in eps  # registered by an entry point, like any outside package
        assert provided.source.endswith(".py")
    assert found.families["internvl"].source.endswith("internvl.py")


def test_mock_plugin_registers_through_the_real_manager():
    found = get_plugins(extra={"mine": _plugin(speedq_methods=lambda: [_Fake()])})
    assert found.method("fake").name == "fake"
    assert found.methods["fake"].plugin == "mine"


def test_duplicate_name_names_both_plugins():
    class Again(Method):
        name = "rtn"
        default_schemes = {4: "w4g128"}

    with pytest.raises(PluginError, match=r"both plugin 'rtn' and plugin 'dupe'"):
        get_plugins(extra={"dupe": _plugin(speedq_methods=lambda: [Again()])})


def test_hook_that_raises_is_reported_and_others_still_load():
    def speedq_methods():
        raise RuntimeError("boom")

    found = get_plugins(extra={"exploding": _plugin(speedq_methods=speedq_methods)})
    assert "boom" in found.broken["exploding"]
    assert "rtn" in found.methods


def test_misspelt_hook_name_is_reported():
    found = get_plugins(extra={"typo": _plugin(speedq_method=lambda: [])})
    assert "typo" in found.broken and "unknown hook" in found.broken["typo"]
    assert BUILTIN_FAMILIES <= set(found.families)


def test_plugin_failing_at_import_is_named_and_others_still_load(monkeypatch):
    real = plugins_mod._entry_points()
    bad = importlib.metadata.EntryPoint("broken_pkg", "speedq_no_such_module_xyz", "speedq")
    monkeypatch.setattr(plugins_mod, "_entry_points", lambda: [*real, bad])
    found = get_plugins()
    assert "ModuleNotFoundError" in found.broken["broken_pkg"]
    assert BUILTIN_FAMILIES <= set(found.families)


def test_load_env_restricts_outside_plugins_but_keeps_builtins(monkeypatch):
    real = plugins_mod._entry_points()
    bad = importlib.metadata.EntryPoint("outside", "speedq_no_such_module_xyz", "speedq")
    monkeypatch.setattr(plugins_mod, "_entry_points", lambda: [*real, bad])
    monkeypatch.setenv("SPEEDQ_LOAD_PLUGINS", "")
    found = get_plugins()
    assert "outside" not in found.broken  # not even tried
    assert BUILTIN_FAMILIES <= set(found.families)


def test_unknown_method_suggests_close_name():
    with pytest.raises(UnknownNameError, match=r"did you mean 'rtn'"):
        get_plugins().method("rnt")
