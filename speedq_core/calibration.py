"""Calibration: the data source, and a block-by-block runner that captures what each block and linear sees.

Data. A :class:`CalibrationSet` is a list of ``(image, prompt, answer)`` samples read from

- a LLaVA-format JSON (``[{"image": "rel/path.jpg", "conversations": [{"from": "human", "value":
  "<image>\\n..."}, {"from": "gpt", "value": "..."}]}, ...]``) plus the image root,
- a folder of images (vision-only: no prompt and no answer), or
- any iterable of ``(PIL image, prompt, answer)`` triples (the synthetic benchmark).

``n`` samples (default 128) are drawn with a fixed seed; fewer usable samples than asked is a warning,
none is a :class:`~speedq_core.errors.SpeedqError`. :meth:`CalibrationSet.model_inputs` turns the
samples into ``ModelInputs`` batches through the family adapter (vision blocks see only the images;
language blocks see the multimodal samples).

Block-by-block runner (the "sequential" scheme of GPTQ / AWQ / llm-compressor). A forward pre-hook
(``with_kwargs=True``) on the first unit of a component stores its ``(args, kwargs)`` — the hidden
states plus the attention mask, position embeddings, ... the unit needs — and raises a private
``_StopForward``, so one forward per batch costs only the layers before that unit. Then each unit is
run on its own (:func:`run_block`) and its outputs become the next unit's inputs
(:meth:`BlockInputs.replace_hidden`), so peak memory is one block's activations plus the model, and a
later block sees whatever the earlier blocks have become (quantized or not — the method decides).

The kwargs of the first block are reused for every block of the component; a model whose layers
take different kwargs (e.g. per-layer sliding-window masks) is not supported by this runner.

Token masks. When a unit's hidden states are ``(B, T, D)`` with the ``(B, T)`` of ``input_ids``, each
sample also carries boolean masks: ``valid`` (``attention_mask``), ``image`` (``input_ids ==
config.image_token_id`` / ``image_token_index``), ``text`` (valid and not image) and ``answer``
(``labels != -100``). Vision-tower units have other shapes and carry no masks (every token counts).
"""
from __future__ import annotations

import ctypes
import functools
import json
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speedq_core.adapter import COMPONENTS, FamilyAdapter, ModelInputs
from speedq_core.errors import SpeedqError

DEFAULT_SAMPLES = 128
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VISION_PROMPT = "Describe the image."  # text needed by build_inputs when only the vision tower is calibrated
IGNORE_INDEX = -100


# ---- data ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationSample:
    """One image (PIL, RGB) with an optional user prompt and reference answer."""

    image: Any
    prompt: str | None = None
    answer: str | None = None


def _open_image(path: Path, where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise SpeedqError(f"{where}: image {path} does not exist: check the image root (--calib-images DIR)")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise SpeedqError(f"{where}: image {path} cannot be decoded ({exc}): replace or remove that file") from None


def _pick(items: list, n: int, seed: int) -> list:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:n]]


def _enough(samples: list[CalibrationSample], n: int, source: str) -> list[CalibrationSample]:
    if not samples:
        raise SpeedqError(f"no usable calibration sample in {source}: point it at data with images")
    if len(samples) < n:
        warnings.warn(f"{source} has {len(samples)} usable calibration samples, {n} were asked: using "
                      f"{len(samples)}", stacklevel=3)
    return samples


def _strip_image_tag(text: str) -> str:
    return text.replace("<image>", "").strip()


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration samples, and (optionally) the processor that turns them into model inputs."""

    samples: tuple[CalibrationSample, ...]
    source: str = "samples"
    processor: Any = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def vision_only(self) -> bool:
        return all(s.prompt is None for s in self.samples)

    def with_processor(self, processor: Any) -> CalibrationSet:
        return replace(self, processor=processor)

    @classmethod
    def from_llava_json(cls, json_path: str | Path, image_root: str | Path, n: int = DEFAULT_SAMPLES,
                        seed: int = 42) -> CalibrationSet:
        """``n`` samples of a LLaVA conversation file: the first human turn (``<image>`` removed) is the
        prompt, the first gpt turn the answer. Entries without an image are skipped."""
        json_path, image_root = Path(json_path), Path(image_root)
        try:
            entries = json.loads(json_path.read_text())
        except FileNotFoundError:
            raise SpeedqError(f"calibration file {json_path} does not exist: pass a LLaVA-format JSON") from None
        except json.JSONDecodeError as exc:
            raise SpeedqError(f"calibration file {json_path} is not valid JSON ({exc}): fix or regenerate it") from None
        if not isinstance(entries, list):
            raise SpeedqError(f"calibration file {json_path} must hold a JSON list of samples, got "
                              f"{type(entries).__name__}: use the LLaVA conversation format")
        indexed = [(i, e) for i, e in enumerate(entries) if isinstance(e, dict) and e.get("image")]
        samples = []
        for i, entry in _pick(indexed, n, seed):
            where = f"{json_path.name} entry {i}"
            turns = entry.get("conversations") or []
            human = next((t.get("value", "") for t in turns if t.get("from") == "human"), "")
            answer = next((t.get("value", "") for t in turns if t.get("from") == "gpt"), "")
            if not _strip_image_tag(human) or not answer.strip():
                raise SpeedqError(f"{where} has an empty conversation (needs a human and a gpt turn with text): "
                                  "fix or drop that entry")
            image = _open_image(image_root / entry["image"], where)
            samples.append(CalibrationSample(image, _strip_image_tag(human), answer.strip()))
        return cls(tuple(_enough(samples, n, str(json_path))), str(json_path))

    @classmethod
    def from_image_folder(cls, folder: str | Path, n: int = DEFAULT_SAMPLES, seed: int = 42) -> CalibrationSet:
        """``n`` images of ``folder`` (recursively): vision-only calibration."""
        folder = Path(folder)
        if not folder.is_dir():
            raise SpeedqError(f"calibration image folder {folder} does not exist: pass a directory of images")
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        samples = [CalibrationSample(_open_image(p, str(folder))) for p in _pick(paths, n, seed)]
        return cls(tuple(_enough(samples, n, str(folder))), str(folder))

    @classmethod
    def from_triples(cls, triples: Iterable[tuple[Any, str | None, str | None]], n: int = DEFAULT_SAMPLES,
                     source: str = "samples") -> CalibrationSet:
        """The first ``n`` ``(PIL image, prompt, answer)`` triples of ``triples``."""
        samples = []
        for i, (image, prompt, answer) in enumerate(triples):
            if len(samples) == n:
                break
            if image is None or not hasattr(image, "convert"):
                raise SpeedqError(f"{source} sample {i}: expected a PIL image, got {type(image).__name__}: "
                                  "pass (PIL.Image, prompt, answer) triples")
            if prompt is not None and not prompt.strip():
                raise SpeedqError(f"{source} sample {i} has an empty prompt: give it text or None (vision-only)")
            samples.append(CalibrationSample(image.convert("RGB"), prompt, answer))
        return cls(tuple(_enough(samples, n, source)), source)

    def model_inputs(self, adapter: FamilyAdapter, component: str, processor: Any = None,
                     batch_size: int = 1) -> list[ModelInputs]:
        """Batches for calibrating ``component``: vision is fed the images (with a fixed placeholder
        prompt, which never reaches the vision tower); the rest needs prompts (answers optional)."""
        processor = processor if processor is not None else self.processor
        if processor is None:
            raise SpeedqError("calibration needs the model's processor: call CalibrationSet.with_processor(processor)")
        if component != "vision" and self.vision_only:
            raise SpeedqError(f"{self.source} holds images only, which calibrates the vision tower but not "
                              f"{component!r}: use a LLaVA-format JSON with conversations")
        batches = []
        for start in range(0, len(self.samples), batch_size):
            chunk = self.samples[start:start + batch_size]
            images = [s.image for s in chunk]
            if component == "vision":
                batches.append(adapter.build_inputs(processor, images, [VISION_PROMPT] * len(chunk)))
                continue
            prompts = [s.prompt or VISION_PROMPT for s in chunk]
            answers = [s.answer for s in chunk]
            with_answers = all(a for a in answers)
            batches.append(adapter.build_inputs(processor, images, prompts, answers if with_answers else None))
        return batches


Batch = ModelInputs | dict[str, Any]


def calibration_batches(calibration: Any, adapter: FamilyAdapter, component: str, method: str) -> list[Batch]:
    """``ctx.calibration`` as batches: a CalibrationSet (with its processor), or ready batches
    (``ModelInputs`` or kwargs dicts) used as they are."""
    if calibration is None:
        raise SpeedqError(f"method {method!r} needs calibration data: pass --calib-data FILE.json "
                          "(LLaVA format) with --calib-images DIR")
    if isinstance(calibration, CalibrationSet):
        return calibration.model_inputs(adapter, component)
    batches = list(calibration)
    if not batches:
        raise SpeedqError(f"method {method!r} got an empty calibration set: pass at least one sample")
    return batches


def batch_kwargs(batch: Batch) -> dict[str, Any]:
    """Model kwargs of one batch (labels excluded), with the KV cache off."""
    kwargs = batch.model_kwargs() if isinstance(batch, ModelInputs) else {k: v for k, v in batch.items()
                                                                           if k != "labels"}
    return {**kwargs, "use_cache": False}


def batch_labels(batch: Batch) -> torch.Tensor | None:
    return batch.labels if isinstance(batch, ModelInputs) else batch.get("labels")


# ---- units and inputs -------------------------------------------------------------------------------
# Components in the order the forward pass reaches them: a method calibrating several parts does the
# earlier ones first, so later parts see their already-quantized outputs.
PART_ORDER = ("vision", "projector", "language", "lm_head")


def forward_order(parts: Iterable[str]) -> list[str]:
    """``parts`` sorted by :data:`PART_ORDER` (unknown parts last, in their given order)."""
    return sorted(parts, key=lambda p: PART_ORDER.index(p) if p in PART_ORDER else len(PART_ORDER))


def component_units(model: nn.Module, adapter: FamilyAdapter, part: str) -> list[tuple[str, nn.Module]]:
    """The units a part is calibrated in, in forward order: its blocks; else the component module as one
    unit (a projector); else the lm_head linear."""
    blocks = adapter.blocks(model, part) if part in COMPONENTS else []
    if blocks:
        return blocks
    if part in COMPONENTS:
        path = adapter.component_paths.get(part)
        return [(path, model.get_submodule(path))] if path else []
    if part == "lm_head":
        return [(adapter.lm_head_path, model.get_submodule(adapter.lm_head_path))]
    return []


class _StopForward(Exception):
    """Raised by the capture hook once the first unit's inputs are stored."""


@dataclass
class BlockSample:
    """The positional and keyword arguments one calibration batch passes to a unit, and its token masks."""

    args: tuple
    kwargs: dict[str, Any]
    masks: dict[str, torch.Tensor] | None = None

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> BlockSample:
        if self.args:
            return BlockSample((hidden, *self.args[1:]), self.kwargs, self.masks)
        return BlockSample(self.args, {**self.kwargs, "hidden_states": hidden}, self.masks)

    def token_mask(self, key: str, shape: torch.Size) -> torch.Tensor | None:
        """Mask ``key`` when a tensor of ``shape`` ``(B, T, ...)`` is laid out as this sample's tokens."""
        if self.masks is None or tuple(shape[:2]) != tuple(self.masks[key].shape):
            return None
        return self.masks[key]


@dataclass
class BlockInputs:
    """The inputs of one unit, one :class:`BlockSample` per calibration batch."""

    samples: list[BlockSample]

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[BlockSample]:
        return iter(self.samples)

    def replace_hidden(self, outputs: Sequence[torch.Tensor]) -> BlockInputs:
        """The next unit's inputs: same kwargs and masks, hidden states replaced by ``outputs``.

        Every method calls this once per unit, after the unit's temporaries are gone, so it is also
        where freed heap memory goes back to the OS (:func:`release_freed_memory`)."""
        following = BlockInputs([s.with_hidden(o) for s, o in zip(self.samples, outputs)])
        release_freed_memory()
        return following


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None


def release_freed_memory() -> bool:
    """Give freed heap pages back to the OS (glibc ``malloc_trim(0)``); False where there is no glibc.

    glibc keeps freed allocations below its dynamic mmap threshold (up to 32 MiB) in the heap, so
    the per-linear temporaries of a block-by-block pass (Hessians, float weight copies) pile up as
    resident memory: on the full InternVL3-1B LLM, RSS crept by ~70 MiB per block without this.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def image_token_id(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def token_masks(batch: Batch, image_token: int | None) -> dict[str, torch.Tensor] | None:
    """``valid``/``image``/``text``/``answer`` boolean ``(B, T)`` masks of a batch with ``input_ids``."""
    kwargs = batch_kwargs(batch)
    ids = kwargs.get("input_ids")
    if ids is None:
        return None
    attention = kwargs.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if attention is None else attention.bool()
    image = (ids == image_token) & valid if image_token is not None else torch.zeros_like(valid)
    labels = batch_labels(batch)
    answer = (labels != IGNORE_INDEX) & valid if labels is not None else torch.zeros_like(valid)
    return {"valid": valid, "image": image, "text": valid & ~image, "answer": answer}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: FamilyAdapter, part: str, batches: Iterable[Batch],
                         unit: nn.Module | None = None) -> BlockInputs:
    """Inputs of the first unit of ``part`` (or of ``unit``), one model forward per batch, stopped there."""
    if unit is None:
        units = component_units(model, adapter, part)
        if not units:
            raise SpeedqError(f"the {adapter.name} adapter declares no blocks for {part!r}: nothing to calibrate")
        unit = units[0][1]
    stored: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        stored.append((args, kwargs))
        raise _StopForward

    image_token = image_token_id(model)
    samples = []
    handle = unit.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            try:
                model(**batch_kwargs(batch))
            except _StopForward:
                pass
            if len(stored) != i + 1:
                raise SpeedqError(f"calibration batch {i} never reached the first {part} unit: check that the "
                                  "batch holds what the model needs (pixel_values for the vision tower)")
            args, kwargs = stored[-1]
            sample = BlockSample(tuple(args), dict(kwargs))
            masks = token_masks(batch, image_token)
            if masks is not None and tuple(sample.hidden.shape[:2]) == tuple(masks["valid"].shape):
                sample.masks = masks
            samples.append(sample)
    finally:
        handle.remove()
    return BlockInputs(samples)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's output hidden states for every sample (first element when it returns a tuple)."""
    return [_first(block(*s.args, **s.kwargs)) for s in inputs]


def select_tokens(x: torch.Tensor, sample: BlockSample, key: str = "valid") -> torch.Tensor:
    """``x`` ``(..., C)`` flattened to ``(tokens, C)``, keeping only the ``key`` tokens when ``x`` is laid
    out as the sample's ``(B, T)``."""
    mask = sample.token_mask(key, x.shape)
    return x[mask] if mask is not None else x.reshape(-1, x.shape[-1])


@contextmanager
def linear_input_hooks(root: nn.Module, names: Iterable[str],
                       fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, ``fn(name, x)`` receives the input ``x`` of every forward of ``root.get_submodule(name)``."""
    handles = []
    try:
        for name in names:
            def hook(module, args, name=name):
                fn(name, args[0])
            handles.append(root.get_submodule(name).register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def stream_linear_inputs(block: nn.Module, inputs: BlockInputs, names: Iterable[str],
                         fn: Callable[[str, torch.Tensor], None], key: str = "valid") -> list[torch.Tensor]:
    """Run ``block`` on every sample, calling ``fn(name, tokens (n, in))`` with each named linear's input
    (only the ``key`` tokens); returns the block outputs."""
    outputs = []
    for sample in inputs:
        with linear_input_hooks(block, names, lambda name, x: fn(name, select_tokens(x, sample, key))):
            outputs.append(_first(block(*sample.args, **sample.kwargs)))
    return outputs


def capture_linear_inputs(block: nn.Module, inputs: BlockInputs, names: Iterable[str],
                          key: str = "valid") -> dict[str, torch.Tensor]:
    """Each named linear's inputs over all samples, ``(n_tokens, in)`` (``key`` tokens only)."""
    names = list(names)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    stream_linear_inputs(block, inputs, names, lambda name, x: parts[name].append(x.detach()), key)
    return {name: torch.cat(xs) for name, xs in parts.items() if xs}


@torch.no_grad()
def linear_stages(block: nn.Module, sample: BlockSample, names: Sequence[str]) -> list[list[str]]:
    """``names`` grouped into "true-sequential" stages: linears reading the very same input tensor form one
    stage (q/k/v, gate/up), stages in the order the forward first calls them; linears never called come last."""
    calls: list[tuple[str, torch.Tensor]] = []
    with linear_input_hooks(block, names, lambda name, x: calls.append((name, x))):
        block(*sample.args, **sample.kwargs)
    stages: list[tuple[torch.Tensor, list[str]]] = []
    seen: set[str] = set()
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        for tensor, members in stages:
            if tensor is x:
                members.append(name)
                break
        else:
            stages.append((x, [name]))
    result = [members for _, members in stages]
    never = [name for name in names if name not in seen]
    return result + ([never] if never else [])


def relative_name(unit_path: str, name: str) -> str | None:
    """``name`` relative to ``unit_path`` (``""`` for the unit itself), or None when outside it."""
    if name == unit_path:
        return ""
    prefix = unit_path + "."
    return name[len(prefix):] if name.startswith(prefix) else None


def full_name(unit_path: str, rel: str) -> str:
    return f"{unit_path}.{rel}" if rel else unit_path


@torch.no_grad()
def model_linear_inputs(model: nn.Module, batches: Iterable[Batch], names: Iterable[str],
                        fn: Callable[[str, torch.Tensor], None]) -> None:
    """Full forwards of ``model`` calling ``fn(name, tokens (n, in))`` with each named linear's inputs
    (valid tokens when the input is laid out as the batch's tokens). For linears outside any block."""
    image_token = image_token_id(model)
    for batch in batches:
        masks = token_masks(batch, image_token)
        sample = BlockSample((), {}, masks)
        with linear_input_hooks(model, names, lambda name, x: fn(name, select_tokens(x, sample))):
            model(**batch_kwargs(batch))
