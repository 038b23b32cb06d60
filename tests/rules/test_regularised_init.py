"""Theorem 4.7's regularised inverse as the starting feedback weights (issue 12, point 10)."""
from __future__ import annotations

import functools

import pytest
import torch

import tplightning as tp
from tplightning.functional import regularised_inverse


def test_regularised_inverse_is_the_fixed_point_of_the_regularised_feedback_loss():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 6, generator=g, dtype=torch.float64)
    lam, sigma = 0.3, 1.5
    Q = regularised_inverse(W, lam / sigma**2)
    # expected gradient of eq. 4.97 with h ~ N(0, sigma^2 I): sigma^2 (Q W - I) W^T + lam Q
    grad = sigma**2 * (Q @ W - torch.eye(6, dtype=W.dtype)) @ W.T + lam * Q
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-12, rtol=0)
    torch.testing.assert_close(regularised_inverse(W, 0.0), torch.linalg.pinv(W))
    assert torch.linalg.svdvals(regularised_inverse(W, 0.1)).max() <= 1 / (2 * 0.1**0.5) + 1e-12


def test_feedback_init_regularised():
    sgd = functools.partial(torch.optim.SGD, lr=0.01)
    rule = tp.TPAI(sizes=[6, 6, 6], forward_optimizer=sgd, feedback_optimizer=sgd, feedback_weight_decay=0.1, feedback_init="regularised")
    W2 = rule.forward_weights[1]
    torch.testing.assert_close(rule.feedback_weights[0], regularised_inverse(W2, 0.1))
    rule.load_forward_weights([torch.eye(6), 3 * torch.eye(6)])  # replaced weights re-initialise Q
    torch.testing.assert_close(rule.feedback_weights[0], torch.eye(6) * 3 / 9.1)
    plain = tp.TPAI(sizes=[6, 6, 6], forward_optimizer=sgd, feedback_optimizer=sgd)
    torch.testing.assert_close(plain.feedback_weights[0], torch.linalg.pinv(plain.forward_weights[1].double()).float())
    with pytest.raises(ValueError, match=r"feedback_init='regularised' is theorem 4.7's inverse for lambda = feedback_weight_decay > 0"):
        tp.TPAI(sizes=[6, 6, 6], forward_optimizer=sgd, feedback_optimizer=sgd, feedback_init="regularised")
