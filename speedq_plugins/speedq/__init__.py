"""SPEED-Q (Guo et al. 2025): staged low-bit quantization of a whole VLM, as speedq method plugins.

``speedq`` runs the three stages; ``speedq-vit``, ``speedq-projector`` and ``speedq-qat`` run one
stage each from the previous stage's output in the run's ``stages/`` folder. See
:mod:`speedq_plugins.speedq.method` for the flow and :mod:`speedq_plugins.speedq.options` for every
option and its default.
"""
from __future__ import annotations

from speedq_core.hookspecs import hookimpl
from speedq_plugins.speedq.method import SpeedQ, SpeedQProjector, SpeedQQAT, SpeedQViT

__all__ = ["SpeedQ", "SpeedQProjector", "SpeedQQAT", "SpeedQViT"]


@hookimpl
def speedq_methods():
    return [SpeedQ(), SpeedQViT(), SpeedQProjector(), SpeedQQAT()]
