"""FA and DFA (thesis 3.2.1-3.2.2): FA with B = W^T is backprop; DFA with one hidden layer is FA."""
from __future__ import annotations

import functools

import pytest
import torch

import tplightning as tp
from conftest import OneBatch, quiet_trainer

SGD = functools.partial(torch.optim.SGD, lr=0.05)


def _step(rule, x, y):
    quiet_trainer(max_epochs=1).fit(rule, datamodule=OneBatch(x, y))
    return [W.detach().clone() for W in rule.forward_weights]


@pytest.mark.parametrize("loss, sizes", [("mse", (5, 7, 6, 4)), ("cross_entropy", (5, 6, 6, 3))])
def test_fa_with_transposed_forward_weights_takes_backprops_step(loss, sizes):
    torch.manual_seed(0)
    bp = tp.BP(sizes=list(sizes), activation="tanh", loss=loss, bias=True, forward_optimizer=SGD)
    fa = tp.FA(sizes=list(sizes), activation="tanh", loss=loss, bias=True, forward_optimizer=SGD)
    with torch.no_grad():
        for lf, lb in zip(fa.net.layers, bp.net.layers):
            lf.weight.copy_(lb.weight)
        for m in fa.maps:
            m.B.copy_(m.upper.weight.T)  # B_i = W_{i+1}^T: eq. 3.18 becomes eq. 3.19
    x = torch.randn(8, sizes[0])
    y = torch.randn(8, sizes[-1]) if loss == "mse" else torch.randint(0, sizes[-1], (8,))
    for a, b in zip(_step(fa, x, y), _step(bp, x, y)):  # BP: autograd on the loss
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for lf, lb in zip(fa.net.layers, bp.net.layers):
        torch.testing.assert_close(lf.bias, lb.bias, rtol=1e-5, atol=1e-6)


def test_fa_with_random_feedback_changes_the_hidden_signal_only():
    torch.manual_seed(0)
    fa = tp.FA(sizes=[5, 7, 6, 4], activation="tanh", forward_optimizer=SGD)
    bp = tp.BP(sizes=[5, 7, 6, 4], activation="tanh", forward_optimizer=SGD)
    bp.load_state_dict({k: v for k, v in fa.state_dict().items() if k.startswith("net.")})
    x, y = torch.randn(8, 5), torch.randn(8, 4)
    got, ref = _step(fa, x, y), _step(bp, x, y)
    assert not torch.allclose(got[0], ref[0], atol=1e-4)  # random B: layer 1 gets another signal
    torch.testing.assert_close(got[-1], ref[-1])  # the output layer still sees the true error


def test_dfa_with_one_hidden_layer_is_fa_with_the_same_matrix():
    torch.manual_seed(0)
    fa = tp.FA(sizes=[5, 6, 4], activation="tanh", forward_optimizer=SGD)
    dfa = tp.DFA(sizes=[5, 6, 4], activation="tanh", forward_optimizer=SGD)
    dfa.load_state_dict(fa.state_dict())  # the same W_1, W_2 and B (6 x 4 for both)
    assert fa.feedback_weights[0].shape == dfa.feedback_weights[0].shape == (6, 4)
    x, y = torch.randn(8, 5), torch.randn(8, 4)
    for a, b in zip(_step(dfa, x, y), _step(fa, x, y)):
        torch.testing.assert_close(a, b)


def test_dfa_feeds_every_hidden_layer_from_the_output():
    torch.manual_seed(0)
    dfa = tp.DFA(sizes=[5, 6, 6, 6, 4], activation="tanh", forward_optimizer=SGD)
    assert [tuple(B.shape) for B in dfa.feedback_weights] == [(6, 4)] * 3
    x, y = torch.randn(8, 5), torch.randn(8, 4)
    hs, targets = dfa.compute_targets(x, y)
    e = (targets[-1] - hs[-1])  # linear output: D_L = 1
    for i, B in enumerate(dfa.feedback_weights, start=1):
        torch.testing.assert_close(targets[i - 1], hs[i] + e @ B.T)
