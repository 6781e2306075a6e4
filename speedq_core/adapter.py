"""Family adapters: what speedq needs to know about one VLM architecture, mostly as data.

A VLM is three components plus the token embedding and the output head:

    vision     the image encoder (ViT), a list of repeated blocks
    projector  maps vision features into the language model's embedding space
    language   the LLM decoder, a list of repeated blocks

An adapter names where each lives (dotted module paths), which ``nn.Linear`` of a block share an input
(``ScalingGroup``, the unit AWQ scales), and how to turn images + text into model inputs. Loading,
quantizing and exporting are generic code in ``speedq_core`` that reads these declarations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

COMPONENTS = ("vision", "projector", "language")
IGNORE_INDEX = -100  # label of tokens that are not scored (prompt, image, padding)
# Parts that are not components but are reported separately in parameter and size tables.
EXTRA_PARTS = ("embeddings", "lm_head")


@dataclass(frozen=True)
class ScalingGroup:
    """Linears of one block that read the same input, and the module whose output that input is.

    AWQ multiplies the input channels of every linear in ``linears`` by s and divides the output
    channels of ``prev`` by s (``prev`` is a norm or a linear), which leaves the float function
    unchanged. ``inspect`` is the submodule whose output measures the group's effect (e.g. the
    attention module for q/k/v); paths are relative to the block.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str


@dataclass
class ModelInputs:
    """A batch ready for ``model(**inputs.model_kwargs())``.

    ``labels`` holds ``-100`` everywhere except the answer tokens (CE and distillation use only those).
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def to(self, device: torch.device | str) -> ModelInputs:
        moved = {k: v.to(device) for k, v in self.tensors.items()}
        return ModelInputs(moved, None if self.labels is None else self.labels.to(device))


def config_from_arch(config_class: type, arch: dict[str, Any]) -> Any:
    """``config_class(**arch)`` from a registry architecture table (a config.json as nested dicts:
    ``text_config`` / ``vision_config`` become sub-configs). ``model_type`` is checked, not passed."""
    arch = dict(arch)
    model_type = arch.pop("model_type", config_class.model_type)
    if model_type != config_class.model_type:
        raise ValueError(
            f"architecture has model_type {model_type!r} but {config_class.__name__} builds "
            f"{config_class.model_type!r}: fix model_type in the registry preset or pick another family"
        )
    return config_class(**arch)


class FamilyAdapter:
    """Base class of a family adapter. Subclasses fill the class attributes and the few methods.

    Module paths are dotted paths from the top-level ``*ForConditionalGeneration`` model.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # transformers ``config.model_type`` values handled
    component_paths: ClassVar[dict[str, str]]  # component -> module path
    block_paths: ClassVar[dict[str, str]]  # component -> path of its nn.ModuleList of blocks
    embeddings_path: ClassVar[str]
    lm_head_path: ClassVar[str]
    # The chat format: one user turn with the image placeholder and ``{prompt}``; the answer turn.
    template: ClassVar[str] = ""
    answer_template: ClassVar[str] = ""

    # -- architecture -----------------------------------------------------------------------
    def model_class(self) -> type[nn.Module]:
        """The transformers class of the full VLM (e.g. ``InternVLForConditionalGeneration``)."""
        raise NotImplementedError

    def config_from_dict(self, arch: dict[str, Any]) -> Any:
        """A transformers config from the architecture table of a registry preset."""
        raise NotImplementedError

    def tiny_config(self) -> Any:
        """A small config (well under 10M parameters) for tests and the embedded default."""
        raise NotImplementedError

    def build_model(self, config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A randomly initialised model (call under ``torch.device('meta')`` for sizing only)."""
        model = self.model_class()._from_config(config, dtype=dtype)
        return model.eval()

    # -- structure ------------------------------------------------------------------------
    def scaling_groups(self, component: str) -> list[ScalingGroup]:
        """The ScalingGroups of one block of ``component`` (paths relative to the block)."""
        raise NotImplementedError

    def blocks(self, model: nn.Module, component: str) -> list[tuple[str, nn.Module]]:
        """Ordered ``(path, block)`` pairs of the repeated blocks of ``component``."""
        path = self.block_paths.get(component)
        if path is None:
            return []
        blocks = model.get_submodule(path)
        return [(f"{path}.{i}", block) for i, block in enumerate(blocks)]

    def part_of(self, module_name: str) -> str:
        """Which part a module or parameter path belongs to: a component, ``embeddings``,
        ``lm_head`` or ``other``. Longest matching prefix wins."""
        prefixes = [(p, c) for c, p in self.component_paths.items()]
        prefixes += [(self.embeddings_path, "embeddings"), (self.lm_head_path, "lm_head")]
        best, part = -1, "other"
        for prefix, owner in prefixes:
            if (module_name == prefix or module_name.startswith(prefix + ".")) and len(prefix) > best:
                best, part = len(prefix), owner
        return part

    def linears(self, model: nn.Module, component: str) -> dict[str, nn.Linear]:
        """Every ``nn.Linear`` of ``component`` (or of ``embeddings``/``lm_head``), by path."""
        return {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and self.part_of(name) == component
        }

    # -- inputs and generation ----------------------------------------------------------------
    def load_processor(self, source: str) -> Any:
        """The processor (tokenizer + image processor) of real weights in directory ``source``."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, local_files_only=True)

    def tiny_processor(self, config: Any) -> Any:
        """A processor for ``tiny_config()`` models, built in code (no download)."""
        raise NotImplementedError

    def build_inputs(
        self,
        processor: Any,
        images: list[Any],
        prompts: list[str],
        answers: list[str] | None = None,
    ) -> ModelInputs:
        """Batch of one image + one user prompt per sample, in the family's chat format.

        With ``answers`` the answer (plus end-of-turn) is appended and ``labels`` mark only its
        tokens; without, the prompt ends where the assistant's reply starts (for ``generate``).
        The default fills ``template`` / ``answer_template`` (see ``speedq_core.chat_inputs``).
        """
        from speedq_core.chat_inputs import chat_inputs

        return chat_inputs(processor, images, prompts, answers, self.template, self.answer_template)

    @torch.no_grad()
    def generate(
        self, model: nn.Module, processor: Any, image: Any, prompt: str, max_new_tokens: int = 16
    ) -> str:
        """Greedy answer of ``model`` to one image + prompt, decoded without special tokens."""
        inputs = self.build_inputs(processor, [image], [prompt]).to(next(model.parameters()).device)
        kwargs = inputs.model_kwargs()
        out = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = out[0, kwargs["input_ids"].shape[1]:]
        tokenizer = getattr(processor, "tokenizer", processor)
        return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
