"""SPEED-Q's training objective (paper eq. 5-7, with the official code's choices).

    L = λ · [γ · KL(P_s ‖ P_t) + (1 − γ) · KL(P_t ‖ P_s)] + ζ · CE_smoothed(Y, P_s)

``loss="both"`` uses both terms, ``"task"`` only CE, ``"distill"`` only the KD term (Table 5).
Teacher = the frozen float model. γ (eq. 6) is fixed before training: the teacher's mean answer-token
probability over the first ``gamma_steps`` batches of the training order (``batch_at(t, 0, 1)``, the
same on every rank, so data-parallel ranks agree without communication). The official code estimates
it over the first 100 training steps and then keeps it fixed; here that estimate is a separate
teacher-only pass over those same batches before the first optimizer step, so no step trains with a
provisional γ.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from speedq_core.adapter import ModelInputs
from speedq_core.training.losses import GammaEstimator, answer_ce, distillation_loss

def logits(model: nn.Module, batch: ModelInputs) -> torch.Tensor:
    return model(**batch.model_kwargs(), use_cache=False).logits


@torch.no_grad()
def estimate_gamma(teacher: nn.Module, batch_at: Callable[[int, int, int], ModelInputs], steps: int) -> float:
    """Eq. (6) over batches ``0 .. steps-1`` of the training order."""
    estimator = GammaEstimator(steps)
    for step in range(steps):
        batch = batch_at(step, 0, 1)
        estimator.update(logits(teacher, batch), batch.labels)
    return estimator.gamma


@dataclass(frozen=True)
class Objective:
    """The loss of one training stage; ``teacher`` is needed unless ``loss == "task"``."""

    loss: str = "both"
    gamma: float | None = None
    kd_weight: float = 1.0  # λ
    ce_weight: float = 1.0  # ζ
    label_smoothing: float = 0.1
    kd_normalize: str = "sequence_sum"
    kd_mask_shifted: bool = False

    @property
    def uses_teacher(self) -> bool:
        return self.loss != "task"

    def loss_fn(self, teacher: nn.Module | None) -> Callable[[nn.Module, ModelInputs], torch.Tensor]:
        def loss_fn(model: nn.Module, batch: ModelInputs) -> torch.Tensor:
            student = logits(model, batch)
            total = student.new_zeros((), dtype=torch.float32)
            if self.loss != "distill":
                total = total + self.ce_weight * answer_ce(student, batch.labels, self.label_smoothing)
            if self.uses_teacher:
                with torch.no_grad():
                    teacher_logits = logits(teacher, batch)
                total = total + self.kd_weight * distillation_loss(
                    student, teacher_logits, batch.labels, self.gamma, self.kd_normalize, self.kd_mask_shifted
                )
            return total

        return loss_fn
