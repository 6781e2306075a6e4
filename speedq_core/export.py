"""Save and reload quantized models (packed, bit-exact) and write dequantized copies for plain loaders.

A packed export directory holds::

    model.safetensors   the model's state_dict: every non-quantized tensor in its own dtype, and for
                        each QuantLinear ``<name>`` its packed buffers ``<name>.codes``,
                        ``<name>.zeros`` and ``<name>.scales`` (single level) or ``<name>.scale_codes``,
                        ``<name>.scale2``, ``<name>.min2`` (bilevel), plus ``<name>.bias``; each
                        QuantEmbedding ``<name>`` the same packed buffers (no bias)
    quant_config.json   {"format": "speedq-packed", "version": 1,
                         "modules": {name: {"scheme", "shape", "bias"}},
                         "embeddings": {name: {"scheme", "shape", "padding_idx", "dtype"}},
                         "tied": {alias: kept}, ...extra}
    manifest.json       {"files": {file: {"bytes", "sha256"}}} for every other file

``embeddings`` was added within version 1 and is optional when read (absent: none quantized), so
every earlier export still loads; an older speedq reading an export with quantized embeddings stops
at "tensor ... is not in the model". Tensors shared between several names (tied embeddings, and a
tied quantized lm_head, whose packed buffers are the embedding's) are written once; ``tied`` maps the
other names to the one written. Every directory is written into a temporary sibling and renamed into
place, so an interrupted export leaves nothing under ``out_dir``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file, save_model
from torch import nn

from speedq_core.errors import CheckpointError, SpeedqError
from speedq_core.quant.fake_quant import FakeQuantLinear
from speedq_core.quant.qembedding import QuantEmbedding
from speedq_core.quant.qlinear import QuantLinear
from speedq_core.quant.qweight import packed_layout
from speedq_core.quant.scheme import QuantScheme
from speedq_core.quant.swap import (
    find_embeddings,
    find_linears,
    swap_embeddings,
    swap_linears,
    to_plain_embeddings,
    to_plain_linears,
)

FORMAT = "speedq-packed"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quant_config.json"
MANIFEST_FILE = "manifest.json"
_RESERVED = ("format", "version", "modules", "embeddings", "tied")
_CHUNK = 1 << 22


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike) -> None:
    """Write ``manifest.json``: size and sha256 of every other file under ``directory``."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory) != Path(MANIFEST_FILE))
    entries = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files
    }
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": entries}, indent=2) + "\n")


@contextmanager
def _atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out_dir``; on success add a manifest and rename it to ``out_dir``."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        write_manifest(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_manifest(directory: str | os.PathLike) -> None:
    """Raise CheckpointError when a file listed in ``manifest.json`` is missing, truncated or altered."""
    directory = Path(directory)
    manifest = directory / MANIFEST_FILE
    if not manifest.is_file():
        raise CheckpointError(f"{manifest} is missing: {directory} is not a complete export, export it again")
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{manifest} is unreadable ({exc}): export the model again") from None
    for name, entry in entries.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: export the model again")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{path} has {size} bytes but the manifest records {entry['bytes']} (truncated or replaced): "
                "export the model again"
            )
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path} fails its sha256 check (the file was altered): export the model again")


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop names whose tensor is the same storage view as an earlier name; returns (unique state, {alias: kept})."""
    seen: dict[tuple, str] = {}
    unique, tied = {}, {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.dtype)
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().contiguous()
    return unique, tied


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, extra_config: dict | None = None) -> Path:
    """Write ``model`` (its QuantLinear and QuantEmbedding modules packed) to ``out_dir``, atomically;
    returns the directory."""
    fake = [name for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if fake:
        raise CheckpointError(
            f"{fake[0]} is still a FakeQuantLinear: call speedq_core.quant.to_quant_linears(model) before exporting"
        )
    extra_config = dict(extra_config or {})
    clash = [key for key in _RESERVED if key in extra_config]
    if clash:
        raise CheckpointError(f"extra_config may not set {clash[0]!r}: rename that key")
    modules = {
        name: {"scheme": m.scheme.name, "shape": [m.out_features, m.in_features], "bias": m.bias is not None}
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    embeddings = {
        name: {"scheme": m.scheme.name, "shape": list(m.shape), "padding_idx": m.padding_idx,
               "dtype": str(m.dtype).removeprefix("torch.")}
        for name, m in model.named_modules()
        if isinstance(m, QuantEmbedding)
    }
    state, tied = _dedupe(model.state_dict())
    config = {"format": FORMAT, "version": VERSION, "modules": modules, "embeddings": embeddings, "tied": tied,
              **extra_config}
    out_dir = Path(out_dir)
    with _atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def read_quant_config(in_dir: str | os.PathLike) -> dict:
    """``quant_config.json`` of a packed export, checked for format and version."""
    path = Path(in_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}): export the model again") from None
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is format {config.get('format')!r} version {config.get('version')!r}, expected {FORMAT!r} "
            f"version {VERSION}: export the model again with this speedq"
        )
    return config


def _quant_modules(entries: dict, config_path: Path, skeleton: dict[str, nn.Module],
                   kind: str) -> dict[str, QuantScheme]:
    """Check each configured module against the skeleton's ``kind`` ("linear" or "embedding") modules;
    returns {name: scheme}."""
    schemes = {}
    for name, entry in entries.items():
        try:
            schemes[name] = QuantScheme.parse(entry["scheme"])
        except SpeedqError as exc:
            raise CheckpointError(f"{config_path}: module {name!r} has an unknown scheme ({exc})") from None
        if name not in skeleton:
            raise CheckpointError(
                f"{config_path}: module {name!r} is not an nn.{kind.title()} of the model skeleton: "
                "build the skeleton of the model that was exported"
            )
        want = list(skeleton[name].weight.shape)
        if list(entry["shape"]) != want:
            raise CheckpointError(
                f"{config_path}: module {name!r} has shape {entry['shape']} but the skeleton's {kind} is {want}: "
                "build the skeleton from the exported model's config"
            )
    return schemes


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def load_quantized(model_skeleton: nn.Module, in_dir: str | os.PathLike) -> nn.Module:
    """Load a :func:`save_quantized` export into ``model_skeleton`` (same architecture, plain modules).

    The named linears and embeddings become QuantLinear and QuantEmbedding modules (a tied quantized
    head shares its embedding's buffers again) and every tensor takes the saved dtype, so outputs
    are bit-identical to the model that was saved. Returns the model.
    """
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise CheckpointError(f"{in_dir} does not exist: pass the directory save_quantized wrote")
    verify_manifest(in_dir)
    config = read_quant_config(in_dir)
    weights_path = in_dir / WEIGHTS_FILE
    config_path = in_dir / CONFIG_FILE
    schemes = _quant_modules(config["modules"], config_path, find_linears(model_skeleton), "linear")
    entries = config.get("embeddings", {})
    embedding_schemes = _quant_modules(entries, config_path, find_embeddings(model_skeleton), "embedding")
    tied = config.get("tied", {})
    with safe_open(str(weights_path), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}

    def packed_tensors(name: str, keys: list[str]) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` of ``<name>.<key>``, through ``tied`` for a head that shares an embedding's buffers."""
        full = {key: tied.get(f"{name}.{key}", f"{name}.{key}") for key in keys}
        missing = [f"{name}.{key}" for key, stored in full.items() if stored not in state]
        if missing:
            raise CheckpointError(f"{weights_path}: tensor {missing[0]!r} is missing: export the model again")
        return {key: state[stored] for key, stored in full.items()}

    def make(name: str, linear: nn.Linear) -> QuantLinear:
        scheme, shape = schemes[name], tuple(linear.weight.shape)
        keys = [*packed_layout(scheme, shape), *(["bias"] if config["modules"][name]["bias"] else [])]
        packed = packed_tensors(name, keys)
        try:
            return QuantLinear.from_packed(packed, scheme, shape, packed.pop("bias", None))
        except CheckpointError as exc:
            raise CheckpointError(f"{weights_path}: module {name!r}: {exc}") from None

    def make_embedding(name: str, embedding: nn.Embedding) -> QuantEmbedding:
        scheme, shape, entry = embedding_schemes[name], tuple(embedding.weight.shape), entries[name]
        packed = packed_tensors(name, list(packed_layout(scheme, shape)))
        dtype = getattr(torch, entry["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{config_path}: embedding {name!r} has an unknown dtype {entry['dtype']!r}: "
                                  "export the model again")
        try:
            return QuantEmbedding.from_packed(packed, scheme, shape, entry["padding_idx"], dtype)
        except CheckpointError as exc:
            raise CheckpointError(f"{weights_path}: module {name!r}: {exc}") from None

    swap_linears(model_skeleton, schemes, make)  # first: a tied head becomes a QuantLinear over the shared buffers
    swap_embeddings(model_skeleton, embedding_schemes, make_embedding)
    expected = model_skeleton.state_dict()
    missing = [key for key in expected if key not in state and key not in tied]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        what = f"tensor {missing[0]!r} is missing" if missing else f"tensor {unexpected[0]!r} is not in the model"
        raise CheckpointError(f"{weights_path}: {what}: build the skeleton of the model that was exported")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{weights_path}: tensor {key!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(expected[key].shape)}: build the skeleton from the exported model's config"
            )
    model_skeleton.load_state_dict(state, strict=False, assign=True)
    for alias, kept in tied.items():
        parent, _, attr = alias.rpartition(".")
        setattr(model_skeleton.get_submodule(parent), attr, _get_tensor(model_skeleton, kept))
    return model_skeleton


def save_dequantized(model: nn.Module, out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a copy of ``model`` with every quantized linear and embedding turned into ``nn.Linear(w_hat)`` /
    ``nn.Embedding(w_hat)`` (a tied head tied again), all in ``dtype``.

    Uses the copy's ``save_pretrained`` when it has one (so ``from_pretrained`` loads it), else writes
    ``model.safetensors``. Atomic like :func:`save_quantized`; returns the directory.
    """
    plain = copy.deepcopy(model)
    to_plain_embeddings(plain, dtype)
    to_plain_linears(plain, dtype)
    plain.to(dtype)
    out_dir = Path(out_dir)
    with _atomic_dir(out_dir) as tmp:
        if hasattr(plain, "save_pretrained"):
            plain.save_pretrained(tmp)
        else:
            save_model(plain, str(tmp / WEIGHTS_FILE))
    return out_dir
