"""SPEED-Q's data: the training/calibration samples of ``ctx.calibration`` and seeded batches of them.

``ctx.calibration`` may be a :class:`speedq_core.calibration.CalibrationSet` (carrying the processor)
or any iterable of ``(PIL image, prompt, answer)`` triples or of objects with ``image``, ``prompt``
and ``answer`` attributes (e.g. the synthetic benchmark's samples). Without a processor on the set,
the model's own is used: the tiny processor for a tiny config (no ``_name_or_path``), else the
processor saved beside the weights.

Batches are a pure function of the step (``batch_at(step, rank, world)``): sample ``k`` of the
epoch-``e`` order (a permutation seeded by ``seed + e``) is global position ``k``; rank ``r`` of
``world`` at step ``t`` takes positions ``(t * world + r) * B ... + B - 1``. A resumed or re-run
stage therefore sees exactly the batches of an uninterrupted one.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from speedq_core.adapter import FamilyAdapter, ModelInputs
from speedq_core.calibration import CalibrationSample, CalibrationSet
from speedq_core.errors import SpeedqError


def _as_triple(item: Any) -> tuple[Any, str | None, str | None]:
    if isinstance(item, CalibrationSample):
        return item.image, item.prompt, item.answer
    if isinstance(item, (tuple, list)) and len(item) == 3:
        return tuple(item)
    if all(hasattr(item, key) for key in ("image", "prompt", "answer")):
        return item.image, item.prompt, item.answer
    raise SpeedqError(f"calibration sample {item!r:.80} is not an (image, prompt, answer) triple: pass "
                      "triples, objects with image/prompt/answer, or a CalibrationSet")


def resolve_processor(model: nn.Module, adapter: FamilyAdapter, calibration: Any) -> Any:
    """The processor of the calibration set, else the model's own (tiny or saved beside the weights)."""
    processor = getattr(calibration, "processor", None)
    if processor is not None:
        return processor
    source = getattr(model.config, "_name_or_path", "") or ""
    if not source:
        return adapter.tiny_processor(model.config)
    try:
        return adapter.load_processor(source)
    except Exception as exc:
        raise SpeedqError(f"no processor for {source} ({exc}): give the CalibrationSet one with "
                          "CalibrationSet.with_processor(processor)") from None


def training_set(model: nn.Module, adapter: FamilyAdapter, calibration: Any, method: str) -> CalibrationSet:
    """``ctx.calibration`` as a CalibrationSet with a processor (all samples kept, in order)."""
    if calibration is None:
        raise SpeedqError(f"method {method!r} needs training samples: pass a CalibrationSet or "
                          "(image, prompt, answer) triples as the calibration data")
    if isinstance(calibration, CalibrationSet):
        data = calibration
    else:
        triples = [_as_triple(item) for item in calibration]
        if not triples:
            raise SpeedqError(f"method {method!r} got an empty calibration set: pass at least one sample")
        data = CalibrationSet.from_triples(triples, n=len(triples))
    return data.with_processor(resolve_processor(model, adapter, calibration))


class Batches:
    """Seeded, step-addressed training batches of the samples with answers (see module docstring)."""

    def __init__(self, adapter: FamilyAdapter, data: CalibrationSet, batch_size: int, seed: int,
                 device: str | torch.device = "cpu", method: str = "speedq"):
        self.samples = [s for s in data.samples if s.prompt and s.answer]
        if not self.samples:
            raise SpeedqError(f"{data.source} has no sample with a prompt and an answer, which {method!r} "
                              "trains on: use a LLaVA-format JSON or (image, prompt, answer) triples")
        self.adapter, self.processor = adapter, data.processor
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def steps_per_epoch(self, fraction: float = 1.0) -> int:
        """Steps of one pass over ``fraction`` of the samples (at least 1)."""
        return max(1, -(-round(len(self.samples) * fraction) // self.batch_size))

    def _index(self, position: int) -> int:
        epoch, k = divmod(position, len(self.samples))
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._orders[epoch] = torch.randperm(len(self.samples), generator=gen).tolist()
        return self._orders[epoch][k]

    def __call__(self, step: int, rank: int = 0, world: int = 1) -> ModelInputs:
        start = (step * world + rank) * self.batch_size
        chunk = [self.samples[self._index(p)] for p in range(start, start + self.batch_size)]
        inputs = self.adapter.build_inputs(self.processor, [s.image for s in chunk],
                                           [s.prompt for s in chunk], [s.answer for s in chunk])
        return inputs.to(self.device)
