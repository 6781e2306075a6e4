"""Batches of one image + one user turn per sample, in any family's chat format, with answer labels.

A family declares two templates (``FamilyAdapter.template`` with ``{prompt}``, and
``answer_template`` with ``{answer}``); its processor expands the image placeholder in the template
into the image's feature tokens exactly as for the real model.
"""
from __future__ import annotations

from typing import Any

import torch

from speedq_core.adapter import IGNORE_INDEX, ModelInputs


def chat_inputs(
    processor: Any,
    images: list[Any],
    prompts: list[str],
    answers: list[str] | None,
    template: str,
    answer_template: str,
) -> ModelInputs:
    """Left-padded batch of ``template.format(prompt=p)`` [+ ``answer_template.format(answer=a)``].

    Each sample goes through ``processor`` on its own; with answers, the prompt alone is processed too
    and must be a token prefix of prompt + answer: that prefix gets label -100, the rest (the answer
    and its end-of-turn token) keeps its ids. Padding comes first (``attention_mask`` 0, labels -100),
    the layout batched generation needs, used for training and calibration too.
    """
    if len(images) != len(prompts) or (answers is not None and len(answers) != len(prompts)):
        raise ValueError(
            f"got {len(images)} images, {len(prompts)} prompts and "
            f"{'no' if answers is None else len(answers)} answers: pass one of each per sample"
        )
    tokenizer = getattr(processor, "tokenizer", processor)
    rows: list[dict[str, torch.Tensor]] = []
    labels: list[torch.Tensor] = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        text = template.format(prompt=prompt)
        prompt_row = dict(processor(images=[image], text=[text], return_tensors="pt"))
        if answers is None:
            rows.append(prompt_row)
            continue
        full = dict(processor(images=[image], text=[text + answer_template.format(answer=answers[i])],
                              return_tensors="pt"))
        prompt_ids, ids = prompt_row["input_ids"][0], full["input_ids"][0]
        n = prompt_ids.numel()
        if ids.numel() <= n or not torch.equal(ids[:n], prompt_ids):
            raise ValueError(
                f"sample {i}: the tokenized prompt is not a prefix of prompt + answer, so the answer "
                f"tokens cannot be told apart; check the answer text {answers[i]!r} and the tokenizer"
            )
        label = ids.clone()
        label[:n] = IGNORE_INDEX
        rows.append(full)
        labels.append(label)
    width = max(r["input_ids"].shape[1] for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def left_pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t.new_full((width - t.shape[-1],), value), t])

    tensors = {
        "input_ids": torch.stack([left_pad(r["input_ids"][0], pad_id) for r in rows]),
        "attention_mask": torch.stack([left_pad(r["attention_mask"][0], 0) for r in rows]),
    }
    for key in rows[0]:
        if key in tensors or not isinstance(rows[0][key], torch.Tensor):
            continue
        if all(r[key].dim() == 2 and r[key].shape == r["input_ids"].shape for r in rows):
            tensors[key] = torch.stack([left_pad(r[key][0], 0) for r in rows])  # per-token, e.g. token types
        else:
            tensors[key] = torch.cat([r[key] for r in rows])  # per-image: pixel values, grids
    batch_labels = torch.stack([left_pad(lab, IGNORE_INDEX) for lab in labels]) if labels else None
    return ModelInputs(tensors, batch_labels)
