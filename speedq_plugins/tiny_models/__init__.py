"""The embedded default models: tiny VLMs trained on speedq's synthetic benchmark.

``speedq_plugins/tiny_weights/<preset>/`` holds what :mod:`speedq_plugins.tiny_models.train` writes
(``config.json`` + ``model.safetensors`` + ``train_log.json``); ``registry.toml`` points the tiny
presets at it (``weights = ...``) and :func:`speedq_core.models.load_model` loads it. Re-create with::

    python -m speedq_plugins.tiny_models.train --model tiny-internvl --out speedq_plugins/tiny_weights/tiny-internvl

Helpers here (no training): :func:`adapter_for`, :func:`direct_accuracy`.
"""
from __future__ import annotations

__all__ = ["TRAINED_PRESETS", "TrainSettings", "adapter_for", "direct_accuracy", "train_tiny"]


def __getattr__(name: str):
    # lazy, so `python -m speedq_plugins.tiny_models.train` does not import train.py twice
    if name in __all__:
        from speedq_plugins.tiny_models import train

        return getattr(train, name)
    raise AttributeError(name)
