"""``speedq info``: parameter counts per part and the linears a method would quantize, from the
architecture alone (meta device, no weights)."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from speedq_core.adapter import COMPONENTS, EXTRA_PARTS, FamilyAdapter
from speedq_core.models import build_on_meta, parameter_counts
from speedq_core.registry import ModelPreset

MIB = 2**20


@dataclass(frozen=True)
class ModelInfo:
    preset: ModelPreset
    params: dict[str, int]  # part -> count, plus "total"
    linears: dict[str, dict[str, int]]  # part -> {name pattern with '*' for block index: count}
    linear_weights: dict[str, int]  # part -> weights held in its nn.Linear layers
    bytes_per_param: int

    def size_mib(self, part: str = "total") -> float:
        return self.params[part] * self.bytes_per_param / MIB


def model_info(preset: ModelPreset, adapter: FamilyAdapter) -> ModelInfo:
    """Count parameters and linears of ``preset`` per part without allocating weights."""
    model = build_on_meta(preset, adapter)
    params = parameter_counts(model, adapter)
    linears: dict[str, Counter] = {part: Counter() for part in (*COMPONENTS, *EXTRA_PARTS)}
    weights = {part: 0 for part in linears}
    for part in linears:
        for name, linear in adapter.linears(model, part).items():
            linears[part][re.sub(r"\.\d+\.", ".*.", name)] += 1
            weights[part] += linear.weight.numel()
    bytes_per_param = next(model.parameters()).element_size()
    return ModelInfo(preset, params, {k: dict(v) for k, v in linears.items()}, weights, bytes_per_param)
