"""The example plugin under examples/speedq-smolvlm installs with pip and is found by entry point.

The fixture pip-installs it into this interpreter's environment (and uninstalls it afterwards): an
install failure is a test failure, never a skip.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import family_checks as checks
from speedq_core.plugins import LOAD_ENV, get_plugins

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "speedq-smolvlm"

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
    checks.check_tiny_end_to_end(adapter)
    config = adapter.tiny_config()
    model = adapter.build_model(config)
    checks.check_component_split(model, adapter)
    for component in ("vision", "language"):
        assert checks.check_scaling_groups(model, adapter, component) == 2 * len(adapter.scaling_groups(component))
    checks.check_labels(adapter, adapter.tiny_processor(config), ["<end_of_utterance>"])


def test_speedq_list_shows_the_installed_plugin(installed):
    out = subprocess.run([sys.executable, "-c", "from speedq_core.cli import main; main()", "list"],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"})
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if "smolvlm" in line]
    assert any("speedq_smolvlm.py" in row for row in rows)  # the plugins table names its file
    assert any("SmolVLM" in row for row in rows)  # the families table shows the adapter
