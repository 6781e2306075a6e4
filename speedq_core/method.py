"""The Method plugin contract: a quantization algorithm that turns a float model into a quantized one.

A method quantizes the ``nn.Linear`` layers of the components it is asked to, in place, replacing
each by a ``QuantLinear`` (packed integers + scales) so that export is generic. Multi-stage methods
(SPEED-Q) expose their stages; each stage can run alone from the previous stage's output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from torch import nn

from speedq_core.adapter import FamilyAdapter
from speedq_core.errors import SchemeError
from speedq_core.quant.scheme import QuantScheme


@dataclass(frozen=True)
class QuantContext:
    """Everything a method may use besides the model.

    ``schemes`` maps each component to quantize (vision/projector/language, and optionally
    embeddings/lm_head) to its scheme; components absent from it stay in float.
    """

    schemes: dict[str, QuantScheme]
    out_dir: Path
    seed: int = 42
    device: str = "cpu"
    calibration: Any = None  # speedq_core.calibration data source, when the method needs one
    options: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[str], None] | None = None

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


class Method:
    """Base class of a quantization method plugin."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    default_schemes: ClassVar[dict[int, str]]  # bits -> scheme preset name
    default_components: ClassVar[tuple[str, ...]] = ("language",)
    needs_calibration: ClassVar[bool] = False
    # samples drawn from the calibration source when the user does not say (--calib-samples);
    # training methods want more than the 128 of post-training calibration
    calibration_samples: ClassVar[int] = 128
    # The paper-style ablation table of this method (``speedq compare --ablations``): its ablated
    # options with their defaults, and the variants to run besides the default.
    ablation_defaults: ClassVar[dict[str, Any]] = {}
    ablation_variants: ClassVar[tuple[dict[str, Any], ...]] = ()

    @property
    def supported_bits(self) -> tuple[int, ...]:
        return tuple(sorted(self.default_schemes))

    def scheme_for_bits(self, bits: int) -> str:
        """The default scheme name for ``bits``, or a SchemeError listing the supported widths."""
        if bits not in self.default_schemes:
            supported = ", ".join(str(b) for b in self.supported_bits)
            raise SchemeError(
                f"method {self.name!r} does not support {bits}-bit: use --bits {supported} "
                f"or pass an explicit --scheme"
            )
        return self.default_schemes[bits]

    def quantize(self, model: nn.Module, adapter: FamilyAdapter, ctx: QuantContext) -> dict[str, Any]:
        """Quantize ``model`` in place; return a JSON-able summary (per-layer errors, timings...)."""
        raise NotImplementedError
