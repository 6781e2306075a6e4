"""Tiny InternVL model and a learnable toy task (colour of a disc) for the SPEED-Q tests."""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from speedq_core.method import QuantContext
from speedq_core.quant import QuantScheme
from speedq_plugins.families.internvl import InternVLAdapter

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
SCHEME = QuantScheme.parse("w2g16g16")
# Small enough for tests that take well under 3 s on one CPU thread.
# lr 1e-3: these models are untrained, and the tiny default (TINY_LR, for trained models) barely moves them
FAST = {"lr": 1e-3, "vit_samples": 4, "adaround_iters": 10, "adaround_batch": 4, "batch_size": 4, "projector_steps": 4,
        "qat_steps": 4, "gamma_steps": 2, "clip_samples": 4, "clip_grid": 4, "clip_tokens": 64}


def disc(color: str, shift: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), (28, 28, 28))
    x, y = 12 + 7 * (shift % 5), 12 + 5 * (shift % 7)
    ImageDraw.Draw(image).ellipse((x, y, x + 22, y + 22), fill=COLORS[color])
    return image


def samples(n: int = 16, offset: int = 0) -> list[tuple[Image.Image, str, str]]:
    names = list(COLORS)
    return [(disc(names[i % 4], i), "what color is the circle", names[i % 4]) for i in range(offset, offset + n)]


@lru_cache(maxsize=1)
def _model_and_processor():
    adapter = InternVLAdapter()
    config = adapter.tiny_config()
    torch.manual_seed(0)
    return adapter.build_model(config), adapter.tiny_processor(config)


def tiny():
    """(adapter, fresh float model, processor): the same weights at every call."""
    model, processor = _model_and_processor()
    return InternVLAdapter(), copy.deepcopy(model), processor


def context(out: Path, calibration=None, scheme: QuantScheme = SCHEME, **options) -> QuantContext:
    return QuantContext(schemes={"vision": scheme, "language": scheme}, out_dir=Path(out), seed=42,
                        calibration=samples() if calibration is None else calibration,
                        options={**FAST, **options})
