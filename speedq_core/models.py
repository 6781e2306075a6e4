"""Turning a model preset into a model: on the meta device for sizing, or with weights for work.

Real presets load only real weights (``--model-path DIR`` or the Hugging Face cache, offline); when
they are absent the error says what to download. Tiny presets load the weights embedded in the
package when there are any, else they are randomly initialised from a seed, and say so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speedq_core.adapter import COMPONENTS, EXTRA_PARTS, FamilyAdapter
from speedq_core.errors import WeightsNotFoundError
from speedq_core.registry import ModelPreset

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass
class LoadedModel:
    preset: ModelPreset
    adapter: FamilyAdapter
    model: nn.Module
    processor: Any
    source: str  # where the weights came from, for reports


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def preset_config(preset: ModelPreset, adapter: FamilyAdapter) -> Any:
    """The transformers config of a preset (tiny: the adapter's own)."""
    return adapter.tiny_config() if preset.tiny else adapter.config_from_dict(preset.architecture)


def build_on_meta(preset: ModelPreset, adapter: FamilyAdapter) -> nn.Module:
    """The preset's architecture with no storage: for parameter counts and sizes."""
    config = preset_config(preset, adapter)
    with torch.device("meta"):
        return adapter.build_model(config, dtype=torch_dtype(preset.dtype))


def parameter_counts(model: nn.Module, adapter: FamilyAdapter) -> dict[str, int]:
    """Parameters per part (components, embeddings, lm_head, other) and ``total``; tied weights once."""
    counts = {part: 0 for part in (*COMPONENTS, *EXTRA_PARTS, "other")}
    for name, param in model.named_parameters():  # named_parameters() skips tied duplicates
        counts[adapter.part_of(name.rsplit(".", 1)[0])] += param.numel()
    counts["total"] = sum(counts.values())
    return counts


def embedded_weights_dir(preset: ModelPreset) -> Path | None:
    """Folder of a tiny preset's shipped weights inside the installed package, if present."""
    if not preset.weights:
        return None
    package, _, rel = preset.weights.partition("/")
    folder = resources.files(package).joinpath(rel)
    return Path(str(folder)) if folder.is_dir() else None


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / f).exists() for f in WEIGHTS_FILES)


def resolve_weights(preset: ModelPreset, model_path: str | None) -> Path:
    """The local folder with the preset's real weights, or WeightsNotFoundError naming the fix."""
    if model_path:
        folder = Path(model_path).expanduser()
        if not _has_weights(folder):
            raise WeightsNotFoundError(
                f"{folder} has no config.json + model weights: pass --model-path a folder saved by "
                f"save_pretrained (e.g. a download of {preset.hf_id})"
            )
        return folder
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(preset.hf_id, local_files_only=True))
        if _has_weights(folder):
            return folder
    except Exception:  # not in the cache: fall through to the error below
        pass
    raise WeightsNotFoundError(
        f"weights for {preset.name} not found: pass --model-path DIR or download {preset.hf_id} "
        f"(`hf download {preset.hf_id}` on a machine with internet, then copy the cache or folder here)"
    )


def load_model(
    preset: ModelPreset,
    adapter: FamilyAdapter,
    model_path: str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Model + processor of a preset, on CPU, in eval mode."""
    if preset.tiny and not model_path:
        config = adapter.tiny_config()
        folder = embedded_weights_dir(preset)
        if folder is not None and _has_weights(folder):
            model = adapter.model_class().from_pretrained(folder, dtype=dtype or torch.float32)
            source = f"embedded weights {folder}"
        else:
            torch.manual_seed(seed)
            model = adapter.build_model(config, dtype=dtype or torch.float32)
            source = f"random init (seed {seed}; no trained weights shipped for {preset.name})"
        return LoadedModel(preset, adapter, model.eval(), adapter.tiny_processor(config), source)
    folder = resolve_weights(preset, model_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = adapter.model_class().from_pretrained(
        folder, dtype=dtype or torch_dtype(preset.dtype), local_files_only=True
    )
    processor = adapter.tiny_processor(model.config) if preset.tiny else adapter.load_processor(str(folder))
    return LoadedModel(preset, adapter, model.eval(), processor, str(folder))
