"""Model size accounting: bytes, weights and bits per weight per component, packed overhead included.

``component_of`` maps a tensor name (``language_model.model.layers.0.mlp.down_proj.weight``; a
QuantLinear or QuantEmbedding counts as its ``<name>.weight``; a quantized head tied to the
embedding shares its buffers and is counted once, under the first name) to a component such as ``vision``, ``projector``,
``language``, ``embeddings``, ``lm_head`` or ``other``. Sizes are MiB (2^20 bytes), which is what the
paper's "MB" are: InternVL3-1B has 938M parameters, 2 bytes each = 1789 MiB.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from speedq_core.quant.qembedding import QuantEmbedding, storage_id
from speedq_core.quant.qlinear import QuantLinear
from speedq_core.quant.qweight import packed_layout
from speedq_core.quant.scheme import QuantScheme

MIB = 1 << 20


@dataclass(frozen=True)
class ComponentSize:
    """``n_weights`` elements of the float model, ``n_quantized`` of them stored packed, in ``nbytes``."""

    name: str
    n_weights: int
    n_quantized: int
    nbytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.n_weights if self.n_weights else 0.0

    @property
    def mib(self) -> float:
        return self.nbytes / MIB


@dataclass(frozen=True)
class SizeReport:
    components: tuple[ComponentSize, ...]
    export_bytes: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.components)

    @property
    def n_weights(self) -> int:
        return sum(c.n_weights for c in self.components)

    def to_json(self) -> dict:
        """A JSON-ready dict (what ``size.json`` holds)."""
        rows = [{**asdict(c), "mib": c.mib, "bits_per_weight": c.bits_per_weight} for c in self.components]
        return {"components": rows, "nbytes": self.nbytes, "mib": self.nbytes / MIB, "n_weights": self.n_weights,
                "export_bytes": self.export_bytes}

    def to_markdown(self) -> str:
        lines = ["| component | weights | quantized | MiB | bits/weight |", "| --- | ---: | ---: | ---: | ---: |"]
        total = ComponentSize("total", self.n_weights, sum(c.n_quantized for c in self.components), self.nbytes)
        for c in (*self.components, total):
            lines.append(f"| {c.name} | {c.n_weights:,} | {c.n_quantized:,} | {c.mib:.1f} | {c.bits_per_weight:.3f} |")
        if self.export_bytes is not None:
            lines.append(f"\non disk: {self.export_bytes / MIB:.1f} MiB")
        return "\n".join(lines)


def packed_weight_nbytes(shape: tuple[int, int], scheme: QuantScheme) -> int:
    """Bytes of the packed tensors of one ``(out, in)`` weight (codes, zeros, scales), bias excluded."""
    return sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for s, d in packed_layout(scheme, shape).values())


def estimate_bytes(n_weights_by_shape: Mapping[tuple[int, ...], int], scheme: QuantScheme | None,
                   dtype_bytes: int = 2) -> int:
    """Bytes of ``count`` tensors per ``shape``: packed with ``scheme`` (2-D shapes), else ``dtype_bytes`` each.

    Needs only shapes, so a model on the ``meta`` device can be sized without materialising it.
    """
    total = 0
    for shape, count in n_weights_by_shape.items():
        if scheme is None:
            total += count * math.prod(shape) * dtype_bytes
        else:
            total += count * packed_weight_nbytes(tuple(shape), scheme)
    return total


def _stored_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers, each shared tensor once."""
    yield from model.named_parameters()
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buffer


def size_report(model_or_state: nn.Module | Mapping[str, torch.Tensor], component_of: Callable[[str], str],
                export_dir: str | os.PathLike | None = None) -> SizeReport:
    """Sizes per component of a model (QuantLinear / QuantEmbedding packed buffers counted as stored, shared
    buffers once) or of a state dict.

    ``export_dir`` adds the on-disk size of that directory (all files).
    """
    totals: dict[str, list[int]] = {}

    def add(name: str, n_weights: int, n_quantized: int, nbytes: int) -> None:
        row = totals.setdefault(component_of(name), [0, 0, 0])
        row[0] += n_weights
        row[1] += n_quantized
        row[2] += nbytes

    if isinstance(model_or_state, nn.Module):
        quant = {n: m for n, m in model_or_state.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
        counted = set()
        for name, module in quant.items():
            if storage_id(module.codes) in counted:
                continue
            counted.add(storage_id(module.codes))
            shape = (module.out_features, module.in_features) if isinstance(module, QuantLinear) else module.shape
            add(f"{name}.weight", math.prod(shape), math.prod(shape), packed_weight_nbytes(shape, module.scheme))
        tensors = _stored_tensors(model_or_state)
    else:
        quant, tensors = {}, model_or_state.items()
    for name, tensor in tensors:
        owner, _, leaf = name.rpartition(".")
        if owner in quant and leaf != "bias":
            continue
        add(name, tensor.numel(), 0, tensor.numel() * tensor.element_size())
    components = tuple(ComponentSize(name, *row) for name, row in sorted(totals.items()))
    export_bytes = None
    if export_dir is not None:
        export_bytes = sum(p.stat().st_size for p in Path(export_dir).rglob("*") if p.is_file())
    return SizeReport(components, export_bytes)
