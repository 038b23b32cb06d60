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


# ------------------------------------------------------------------------------- BDFA (thesis 3.2.4)
def _decoder_loss(rule, x, y, Bs):
    """``L^b = mean_b ||x - x^||^2`` with ``x^ = B_0 h^b_1``, ``h^b_i = s_i(B_i h^b_{i+1})``, ``h^b_L = y`` (eq. 3.25)."""
    h = y
    for i in range(len(Bs) - 1, 0, -1):
        h = torch.tanh(h @ Bs[i].T)
    return (x - h @ Bs[0].T).pow(2).sum(1).mean()


def test_bdfa_feedback_update_is_the_decoders_gradient_when_w_is_b_transposed():
    """Eq. 3.26 carries the reconstruction error forward through ``W_i`` in place of ``B_{i-1}^T``: with
    ``W_i = B_{i-1}^T`` it is backprop through the decoder, so eq. 3.27 is autograd on ``L^b``."""
    torch.manual_seed(0)
    rule = tp.BDFA(sizes=[5, 6, 4, 3], activation="tanh", forward_optimizer=SGD, feedback_optimizer=SGD).double()
    with torch.no_grad():
        for layer, B in zip(rule.net.layers, rule.feedback_parameters()):
            layer.weight.copy_(B.T)  # W_i = B_{i-1}^T
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    got = rule.feedback_grads(x, y)
    Bs = [B.detach().clone().requires_grad_(True) for B in rule.feedback_parameters()]
    expected = torch.autograd.grad(_decoder_loss(rule, x, y, Bs), Bs)
    assert [tuple(B.shape) for B in Bs] == [(5, 6), (6, 4), (4, 3)]
    for B, e in zip(rule.feedback_parameters(), expected):
        torch.testing.assert_close(got[B], e, rtol=1e-10, atol=1e-12)


def test_bdfa_step_updates_w_by_fa_and_b_by_eqs_3_25_to_3_27():
    """One step: the forward weights take FA's step (same B), then each ``B_i`` moves by ``-lr mean_b delta^b_i h^b_{i+1}^T``,
    computed here sample by sample from the updated ``W_i`` with one-hot labels (cross-entropy)."""
    torch.manual_seed(0)
    lr_b = 0.1
    bdfa = tp.BDFA(sizes=[5, 6, 4, 3], activation="tanh", loss="cross_entropy", forward_optimizer=SGD,
                   feedback_optimizer=functools.partial(torch.optim.SGD, lr=lr_b))
    fa = tp.FA(sizes=[5, 6, 4, 3], activation="tanh", loss="cross_entropy", forward_optimizer=SGD)
    fa.load_state_dict({k: v for k, v in bdfa.state_dict().items() if k != "input_feedback"})
    Bs = [B.detach().clone() for B in bdfa.feedback_parameters()]
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    W_fa = _step(fa, x, y)
    W_new = _step(bdfa, x, y)
    for a, b in zip(W_new, W_fa):
        torch.testing.assert_close(a, b)
    grads = [torch.zeros_like(B) for B in Bs]
    for b in range(8):  # eqs. 3.25-3.27 for one sample
        hb = {3: torch.nn.functional.one_hot(y[b], 3).float()}
        ab = {}
        for i in (2, 1, 0):
            ab[i] = Bs[i] @ hb[i + 1]
            hb[i] = torch.tanh(ab[i]) if i else ab[i]
        delta = 2 * (hb[0] - x[b])
        grads[0] += torch.outer(delta, hb[1]) / 8
        for i in (1, 2):
            delta = (1 - torch.tanh(ab[i]) ** 2) * (W_new[i - 1] @ delta)
            grads[i] += torch.outer(delta, hb[i + 1]) / 8
    for B_new, B, g in zip(bdfa.feedback_parameters(), Bs, grads):
        torch.testing.assert_close(B_new.detach(), B - lr_b * g, rtol=1e-5, atol=1e-6)


def test_bdfa_needs_a_dense_first_layer():
    from tplightning.layers import Conv2d, Dense

    net = [Conv2d([1, 6, 6], 2, kernel_size=3, padding=1, pool=2, activation="tanh"), Dense(18, 4, "linear")]
    with pytest.raises(ValueError, match="BDFA reconstructs the input through a dense first layer, got Conv2d"):
        tp.BDFA(network=net, forward_optimizer=SGD, feedback_optimizer=SGD)
