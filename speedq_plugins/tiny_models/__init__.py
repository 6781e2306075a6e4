"""The embedded default models: tiny VLMs trained on speedq's synthetic benchmark.

``speedq_plugins/tiny_weights/<preset>/`` holds what :mod:`speedq_plugins.tiny_models.train` writes
(``config.json`` + ``model.safetensors`` + ``train_log.json``); ``registry.toml`` points the tiny
presets at it (``weights = ...``) and :func:`speedq_core.models.load_model` loads it. Re-create with::

    python -m speedq_plugins.tiny_models.train --model tiny-internvl --out speedq_plugins/tiny_weights/tiny-internvl

Helpers here (no training): :func:`adapter_for`, :func:`direct_accuracy`.
"""
from __future__ import annotations

from speedq_plugins.tiny_models.train import (
    TRAINED_PRESETS,
    TrainSettings,
    adapter_for,
    direct_accuracy,
    train_tiny,
)

__all__ = ["TRAINED_PRESETS", "TrainSettings", "adapter_for", "direct_accuracy", "train_tiny"]
