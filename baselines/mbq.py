"""MBQ (Li et al., "MBQ: Modality-Balanced Quantization for Large Vision-Language Models", CVPR 2025),
following thu-nics/MBQ (``qmllm/methods/mbq/quantize/pre_quant.py`` ``run_mbq`` and ``auto_scale.py``).

MBQ is AWQ's scale search (baselines/awq.py) with a reconstruction loss that weighs the tokens of each
modality by how sensitive the task loss is to them::

    loss(alpha) = sum_{t in text} ||dO_t||^2 + r * sum_{t in image} ||dO_t||^2

Sensitivities, computed once per part with one backward pass per calibration batch (the captioning
cross-entropy on the answer tokens, model frozen): for every block ``i`` and every distinct ``inspect``
module of the adapter's scaling groups, ``g = mean_d |dL/dO_{t,d}|`` of that module's output ``O``;
per sample its mean over the image tokens and over the text tokens, averaged over samples, give
``g_img`` and ``g_txt``; ``r_i = g_img / g_txt``, floored at the median of ``r`` over the blocks
(``max(r_i, median)``, as the reference). For a Llama block the inspect modules are the attention
(whose output is ``o_proj``'s) and the MLP (``down_proj``'s), exactly the reference's ``o_proj`` /
``down_proj`` hooks, and the q/k/v and v->o groups share the attention ratio, gate/up and up->down the
MLP ratio, as in the reference.

Choices: "text" tokens are the answer tokens (the reference's caption mask; ``text_tokens="text"``
takes every non-image token); the loss is the squared error of the paper (the reference code's
default ``loss_mode`` is the absolute error); no clipping search by default (``run_mbq`` only scales;
``clip`` accepts AWQ's modes); ``modality_weights={"image": a, "text": b}`` sets the weights by hand
and skips the backward pass. MBQ has no GPTQ variant (the reference pairs it with AWQ-style scaling
only). Units whose tokens are not laid out as ``input_ids`` (the vision tower) have no modality
split, so there MBQ is AWQ. With ``modality_weights={"image": 1, "text": 1}`` and
``text_tokens="text"`` the token weights equal AWQ's exactly, and so do the scales and weights.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
import torch
from torch import nn

from baselines.awq import AWQ, TokenWeights, valid_tokens
from speedq_core.adapter import FamilyAdapter, ScalingGroup
from speedq_core.calibration import BlockSample, image_token_id, batch_kwargs, batch_labels, token_masks
from speedq_core.errors import SpeedqError
from speedq_core.hookspecs import hookimpl
from speedq_core.method import Method, QuantContext

TEXT_TOKENS = ("answer", "text")


def modality_token_weights(image_weight: float, text_weight: float, text_key: str) -> TokenWeights:
    """``w_t = text_weight * [t in text_key] + image_weight * [t in image]`` (AWQ's weights without masks)."""
    def weights(sample: BlockSample, output: torch.Tensor) -> torch.Tensor | None:
        image = sample.token_mask("image", output.shape)
        if image is None:
            return valid_tokens(sample, output)
        return sample.token_mask(text_key, output.shape).float() * text_weight + image.float() * image_weight
    return weights


def modality_gradients(model: nn.Module, blocks: list[tuple[str, nn.Module]], inspects: list[str], batches: list,
                       text_key: str = "answer") -> dict[tuple[int, str], tuple[float, float]]:
    """``(block index, inspect) -> (g_img, g_txt)``, the mean ``|dL/dO|`` on image and text tokens (module doc)."""
    image_token = image_token_id(model)
    sums: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        for i, batch in enumerate(batches):
            labels = batch_labels(batch)
            masks = token_masks(batch, image_token)
            if labels is None or masks is None or not masks[text_key].any():
                raise SpeedqError(f"MBQ calibration batch {i} has no answer tokens to take the task-loss gradient "
                                  "from: calibrate with samples that have answers (LLaVA JSON with gpt turns)")

            def record(grad: torch.Tensor, key: tuple[int, str]) -> None:
                if tuple(grad.shape[:2]) != tuple(masks["image"].shape):
                    return
                per_token = grad.detach().abs().float().mean(dim=-1)
                for col, name in ((0, "image"), (1, text_key)):
                    mask = masks[name].float()
                    sums[key][col] += float(((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).sum())
                sums[key][2] += grad.shape[0]

            def hook(module, args, output, key):
                out = output[0] if isinstance(output, (tuple, list)) else output
                if not out.requires_grad:
                    out.requires_grad_(True)
                out.register_hook(lambda g: record(g, key))

            handles = [block.get_submodule(rel).register_forward_hook(lambda m, a, o, key=(b, rel): hook(m, a, o, key))
                       for b, (_, block) in enumerate(blocks) for rel in inspects]
            try:
                with torch.enable_grad():
                    loss = model(**batch_kwargs(batch), labels=labels).loss
                    loss.backward()
            finally:
                for handle in handles:
                    handle.remove()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return {key: (img / n, txt / n) for key, (img, txt, n) in sums.items() if n}


def balance_ratios(grads: dict[tuple[int, str], tuple[float, float]]) -> dict[tuple[int, str], float]:
    """``r = g_img / g_txt`` floored at the median (``np.median``: mean of the middle two) over blocks of the
    same inspect module (reference)."""
    raw = {}
    for key, (img, txt) in grads.items():
        if txt <= 0:
            raise SpeedqError(f"MBQ: the text-token gradient at block {key[0]} {key[1]} is zero, so the modality "
                              "ratio is undefined: check that the calibration answers are labelled")
        raw[key] = img / txt
    medians = {}
    for inspect in {k[1] for k in raw}:
        medians[inspect] = statistics.median(r for k, r in raw.items() if k[1] == inspect)
    return {key: max(r, medians[key[1]]) for key, r in raw.items()}


class MBQ(AWQ):
    name = "mbq"
    description = "MBQ (CVPR'25): AWQ scaling with a modality-balanced (gradient-weighted) reconstruction loss"
    config_defaults = {"clip": "none"}

    def prepare(self, model: nn.Module, adapter: FamilyAdapter, part: str, batches: list, ctx: QuantContext) -> dict:
        text_key = ctx.options.get("text_tokens", "answer")
        if text_key not in TEXT_TOKENS:
            raise SpeedqError(f"text_tokens={text_key!r} is not known: use one of {', '.join(TEXT_TOKENS)}")
        fixed = ctx.options.get("modality_weights")
        if fixed is not None:
            return {"text_key": text_key, "fixed": (float(fixed["image"]), float(fixed["text"]))}
        blocks = adapter.blocks(model, part)
        if not blocks:
            return {"text_key": text_key}
        inspects = list(dict.fromkeys(g.inspect for g in adapter.scaling_groups(part)))
        grads = modality_gradients(model, blocks, inspects, batches, text_key)
        if not grads:
            ctx.log(f"mbq: {part} has no image/text token layout: plain AWQ loss")
            return {"text_key": text_key}
        ratios = balance_ratios(grads)
        ctx.log(f"mbq: {part}: image/text sensitivity ratios " +
                ", ".join(f"{b}.{rel}={r:.3g}" for (b, rel), r in sorted(ratios.items())))
        summary = {"modality_ratios": {f"{b}.{rel}": r for (b, rel), r in sorted(ratios.items())}}
        return {"text_key": text_key, "ratios": ratios, "summary": summary}

    def token_weights(self, state: dict, unit_index: int, group: ScalingGroup) -> TokenWeights:
        if "fixed" in state:
            image, text = state["fixed"]
            return modality_token_weights(image, text, state["text_key"])
        ratio = state.get("ratios", {}).get((unit_index, group.inspect))
        if ratio is None:
            return valid_tokens
        return modality_token_weights(ratio, 1.0, state["text_key"])


@hookimpl
def speedq_methods() -> list[Method]:
    return [MBQ()]
