"""registry.toml: model presets, scheme presets and benchmark suites, parsed into frozen dataclasses.

The file lives at the repository root and ships inside the wheel as ``speedq_core/registry.toml``.
``SPEEDQ_REGISTRY`` points at another file (for experiments and tests).
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from speedq_core.errors import RegistryError, SchemeError, UnknownNameError
from speedq_core.quant.scheme import QuantScheme

REGISTRY_ENV = "SPEEDQ_REGISTRY"
_MODEL_KEYS = {"family", "hf_id", "dtype", "description", "tiny", "architecture", "weights", "calibration",
               "benchmarks"}
_DTYPES = {"bfloat16", "float16", "float32"}


@dataclass(frozen=True)
class ModelPreset:
    """A named model: which family adapter, where real weights come from, its architecture."""

    name: str
    family: str
    hf_id: str | None = None
    dtype: str = "bfloat16"
    description: str = ""
    tiny: bool = False
    architecture: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    weights: str | None = None  # package-relative folder of embedded weights (tiny presets)
    calibration: str | None = None  # default calibration/training data (e.g. a generated benchmark)
    benchmarks: tuple[str, ...] = ()  # default benchmarks or suites of `speedq run`


@dataclass(frozen=True)
class Suite:
    """A named list of benchmarks."""

    name: str
    benchmarks: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class Registry:
    path: Path
    models: dict[str, ModelPreset]
    schemes: dict[str, QuantScheme]
    suites: dict[str, Suite]

    def model(self, name: str) -> ModelPreset:
        if name not in self.models:
            raise UnknownNameError("model", name, self.models)
        return self.models[name]

    def scheme(self, name: str) -> QuantScheme:
        """A preset by name, or any well-formed ``w{b}g{G}[g{Gq}]`` spelled out."""
        if name in self.schemes:
            return self.schemes[name]
        try:
            return QuantScheme.parse(name)
        except SchemeError:
            raise UnknownNameError("scheme", name, self.schemes) from None

    def suite(self, name: str) -> Suite:
        if name not in self.suites:
            raise UnknownNameError("benchmark suite", name, self.suites)
        return self.suites[name]


def registry_path() -> Path:
    """The registry file in use: $SPEEDQ_REGISTRY, the packaged copy, or the checkout's."""
    override = os.environ.get(REGISTRY_ENV)
    if override:
        return Path(override)
    packaged = resources.files("speedq_core").joinpath("registry.toml")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "registry.toml"


def load_registry(path: str | Path | None = None) -> Registry:
    """Parse and validate the registry; a malformed entry raises RegistryError naming it."""
    path = Path(path) if path else registry_path()
    if not path.is_file():
        raise RegistryError(f"registry file {path} not found: reinstall speedq or set {REGISTRY_ENV}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{path} is not valid TOML ({exc}): fix the file") from None
    models = {name: _model(path, name, t) for name, t in data.get("models", {}).items()}
    schemes = {name: _scheme(path, name, t) for name, t in data.get("schemes", {}).items()}
    suites = {name: _suite(path, name, t) for name, t in data.get("suites", {}).items()}
    return Registry(path, models, schemes, suites)


def _model(path: Path, name: str, table: Any) -> ModelPreset:
    where = f"{path}: [models.{name}]"
    if not isinstance(table, dict):
        raise RegistryError(f"{where} must be a table")
    unknown = set(table) - _MODEL_KEYS
    if unknown:
        raise RegistryError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(_MODEL_KEYS)}")
    if not isinstance(table.get("family"), str):
        raise RegistryError(f"{where} needs family = \"<adapter name>\" (see `speedq list`)")
    tiny = bool(table.get("tiny", False))
    if not tiny and not table.get("architecture"):
        raise RegistryError(f"{where} needs an [architecture] table (or tiny = true)")
    if not tiny and not table.get("hf_id"):
        raise RegistryError(f"{where} needs hf_id = \"org/repo\" of its real weights")
    dtype = table.get("dtype", "bfloat16")
    if dtype not in _DTYPES:
        raise RegistryError(f"{where} dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return ModelPreset(
        name=name, family=table["family"], hf_id=table.get("hf_id"), dtype=dtype,
        description=table.get("description", ""), tiny=tiny,
        architecture=table.get("architecture", {}), weights=table.get("weights"),
        calibration=table.get("calibration"), benchmarks=tuple(table.get("benchmarks", ())),
    )


def _scheme(path: Path, name: str, table: Any) -> QuantScheme:
    try:
        scheme = QuantScheme(**table)
    except (TypeError, SchemeError) as exc:
        raise RegistryError(f"{path}: [schemes.{name}] is malformed: {exc}") from None
    if scheme.name != name:
        raise RegistryError(f"{path}: [schemes.{name}] describes {scheme.name}: rename it to {scheme.name}")
    return scheme


def _suite(path: Path, name: str, table: Any) -> Suite:
    benchmarks = table.get("benchmarks") if isinstance(table, dict) else None
    if not benchmarks or not all(isinstance(b, str) for b in benchmarks):
        raise RegistryError(f"{path}: [suites.{name}] needs benchmarks = [\"Name\", ...]")
    return Suite(name, tuple(benchmarks), table.get("description", ""))
