"""Losses against independent computations on hand-built distributions."""
import math

import pytest
import torch

from speedq_core.training.losses import (
    GammaEstimator,
    answer_ce,
    distillation_loss,
    kl_per_token,
    teacher_answer_confidence,
)


def _logits(probs):
    return torch.tensor(probs).log()


def test_kl_on_known_distributions():
    p, q = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # 0.5 ln2 - 0.25 ln2
    got = kl_per_token(_logits([[p]]), _logits([[q]]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert kl_per_token(_logits([[p]]), _logits([[p]])).item() == pytest.approx(0.0, abs=1e-7)


def test_forward_and_reverse_kl_weighting_by_gamma():
    s = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]).log()
    t = torch.tensor([[[0.5, 0.4, 0.1], [0.3, 0.3, 0.4]]]).log()
    labels = torch.tensor([[-100, 5]])  # only position 1 scored (official, unshifted)

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))

    sp, tp = [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]
    for gamma in (0.0, 0.3, 1.0):
        expected = gamma * kl(sp, tp) + (1 - gamma) * kl(tp, sp)
        got = distillation_loss(s, t, labels, gamma)
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_distillation_normalisation_sum_vs_mean():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 1:4] = 1  # 3 tokens
    labels[1, 2] = 1  # 1 token
    per = 0.4 * kl_per_token(s, t) + 0.6 * kl_per_token(t, s)
    mask = labels != -100
    seq_sum = sum(per[b][mask[b]].sum() for b in range(2)) / 2
    tok_mean = per[mask].mean()
    assert distillation_loss(s, t, labels, 0.4).item() == pytest.approx(seq_sum.item(), rel=1e-5)
    assert distillation_loss(s, t, labels, 0.4, "token_mean").item() == pytest.approx(tok_mean.item(), rel=1e-5)
    shifted = distillation_loss(s, t, labels, 0.4, "token_mean", shifted_mask=True)
    assert shifted.item() == pytest.approx(per[:, :-1][mask[:, 1:]].mean().item(), rel=1e-5)


def test_ce_masks_everything_but_answer_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[-100, -100, 3, 5]])
    logp = torch.log_softmax(logits, -1)
    expected = -(logp[0, 1, 3] + logp[0, 2, 5]) / 2  # logit t predicts label t+1
    assert answer_ce(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    # changing a logit that predicts a prompt token does not change the loss
    logits2 = logits.clone()
    logits2[0, 0] += 10
    assert answer_ce(logits2, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_gamma_on_a_hand_built_batch():
    # sample 0: answer tokens 1 then 2, teacher gives them p=0.9 and 0.5 -> 0.7
    # sample 1: one answer token 0 with p=0.2 -> 0.2 ; gamma = (0.7 + 0.2) / 2
    probs = torch.full((2, 3, 3), 1 / 3)
    probs[0, 0] = torch.tensor([0.05, 0.9, 0.05])
    probs[0, 1] = torch.tensor([0.25, 0.25, 0.5])
    probs[1, 1] = torch.tensor([0.2, 0.4, 0.4])
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 0]])
    conf = teacher_answer_confidence(probs.log(), labels)
    assert conf.tolist() == pytest.approx([0.7, 0.2], rel=1e-6)
    est = GammaEstimator(steps=2)
    est.update(probs.log(), labels)
    est.update(probs.log()[:1], labels[:1])  # second batch: only sample 0 (0.7)
    est.update(probs.log()[1:], labels[1:])  # ignored: estimation window is over
    assert est.done and est.gamma == pytest.approx((0.7 + 0.2 + 0.7) / 3, rel=1e-6)
