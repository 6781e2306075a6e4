"""The example plugin under examples/speedq-smolvlm installs with pip and is found by entry point.

The fixture pip-installs it into this interpreter's environment (and uninstalls it afterwards): an
install failure is a test failure, never a skip.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from speedq_core.plugins import LOAD_ENV, get_plugins

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "speedq-smolvlm"

pytestmark = pytest.mark.slow  # a pip install: several seconds


def _family_checks():
    """The shared adapter checks of tests/families/test_llava.py."""
    spec = importlib.util.spec_from_file_location("_family_checks", ROOT / "tests" / "families" / "test_llava.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def installed():
    result = _pip("install", "--no-deps", "--no-build-isolation", str(EXAMPLE))
    assert result.returncode == 0, f"pip install {EXAMPLE} failed:\n{result.stdout}\n{result.stderr}"
    importlib.invalidate_caches()
    yield
    sys.modules.pop("speedq_smolvlm", None)
    result = _pip("uninstall", "-y", "speedq-smolvlm")
    importlib.invalidate_caches()
    assert result.returncode == 0, result.stderr


@pytest.fixture
def adapter(installed, monkeypatch):
    monkeypatch.setenv(LOAD_ENV, "smolvlm")  # outside plugins: only this one
    plugins = get_plugins()
    assert "smolvlm" not in plugins.broken, plugins.broken.get("smolvlm")
    return plugins.family("smolvlm")


def test_entry_point_is_registered(installed):
    (ep,) = [ep for ep in importlib.metadata.entry_points(group="speedq") if ep.name == "smolvlm"]
    assert ep.value == "speedq_smolvlm" and ep.dist.metadata["Name"] == "speedq-smolvlm"


def test_plugin_manager_finds_the_family(adapter):
    assert type(adapter).__name__ == "SmolVLMAdapter" and adapter.name == "smolvlm"
    provided = get_plugins().families["smolvlm"]
    assert provided.plugin == "smolvlm" and provided.source.endswith("speedq_smolvlm.py")


def test_tiny_smolvlm_forward_generate_and_split(adapter):
    checks = _family_checks()
    checks.check_tiny_end_to_end(adapter)
    config = adapter.tiny_config()
    model = adapter.build_model(config)
    checks.check_component_split(model, adapter)
    for component in ("vision", "language"):
        assert checks.check_scaling_groups(model, adapter, component) == 2 * len(adapter.scaling_groups(component))
    checks.check_labels(adapter, adapter.tiny_processor(config), ["<end_of_utterance>"])
