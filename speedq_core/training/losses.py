"""Losses over answer tokens.

Shapes: logits (B, T, V), labels (B, T) with -100 outside the answer. Causal LM convention: the
logit at position t predicts token t+1, so CE compares logits[:, :-1] with labels[:, 1:].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def answer_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of the shifted answer tokens: -1/N Σ_{t: y_t≠-100} log p(y_t | x, y_<t)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, label_smoothing=label_smoothing)


def kl_per_token(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) = Σ_v P_v (log P_v − log Q_v) per position, P = softmax(p_logits); (B, T, V) -> (B, T)."""
    log_p = F.log_softmax(p_logits.float(), dim=-1)
    log_q = F.log_softmax(q_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def answer_mask(labels: torch.Tensor, shifted: bool) -> torch.Tensor:
    """(B, T) bool mask of logit positions scored by distillation.

    ``shifted=False`` is the official SPEED-Q code: positions t where labels[t] ≠ -100 (the logits
    that *follow* each answer token). ``shifted=True`` scores the logits that *predict* answer
    tokens, t where labels[t+1] ≠ -100 (the causal-LM alignment CE uses).
    """
    valid = labels != IGNORE
    if not shifted:
        return valid
    mask = torch.zeros_like(valid)
    mask[:, :-1] = valid[:, 1:]
    return mask


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float,
    normalize: str = "sequence_sum",
    shifted_mask: bool = False,
) -> torch.Tensor:
    """Paper eq. (5): γ·KL(P_s‖P_t) + (1−γ)·KL(P_t‖P_s) per scored token (reverse + forward KL).

    ``normalize="sequence_sum"`` (official): sum over each sequence's scored tokens, mean over the
    batch. ``"token_mean"``: mean over all scored tokens of the batch.
    """
    teacher_logits = teacher_logits.detach()
    per_token = gamma * kl_per_token(student_logits, teacher_logits) + (1 - gamma) * kl_per_token(
        teacher_logits, student_logits
    )
    mask = answer_mask(labels, shifted_mask).to(per_token.dtype)
    if normalize == "sequence_sum":
        return (per_token * mask).sum(-1).mean()
    if normalize == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    raise ValueError(f"normalize must be 'sequence_sum' or 'token_mean', not {normalize!r}")


def teacher_answer_confidence(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Paper eq. (6) for one batch: per sample (1/|y|) Σ_i P_t(y_i | x, y_<i); returns (B,).

    Uses the causal alignment: the logit at t−1 predicts label t. Samples without answer tokens give NaN.
    """
    probs = F.softmax(teacher_logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    valid = targets != IGNORE
    picked = probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(-1) / valid.sum(-1)


class GammaEstimator:
    """γ = mean over samples of the teacher's mean answer-token probability (eq. 6), accumulated
    over the first ``steps`` batches and then frozen."""

    def __init__(self, steps: int = 100):
        self.steps, self.seen, self.total, self.count = steps, 0, 0.0, 0

    @property
    def done(self) -> bool:
        return self.seen >= self.steps

    def update(self, teacher_logits: torch.Tensor, labels: torch.Tensor) -> None:
        if self.done:
            return
        conf = teacher_answer_confidence(teacher_logits, labels)
        conf = conf[~torch.isnan(conf)]
        self.total += conf.sum().item()
        self.count += conf.numel()
        self.seen += 1

    @property
    def gamma(self) -> float:
        if self.count == 0:
            raise ValueError("γ is undefined before any batch with answer tokens was seen")
        return self.total / self.count
