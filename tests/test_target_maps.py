"""Target maps (tplightning/target_maps.py) against float64 inverses, autograd and finite differences."""
from __future__ import annotations

import pytest
import torch

import tplightning.functional as F
from tplightning.layers import Conv2d, Dense
from tplightning.target_maps import Difference, ExactInverse, GradientTarget, OriginalInverse, Step, TargetMap, ThesisInverse

DT = torch.float64


def dense_pair(n_in=5, n=6, n_out=6, act="leaky_relu", bias=True):
    torch.manual_seed(0)
    lower, upper = Dense(n_in, n, act, bias=bias).double(), Dense(n, n_out, act, bias=bias).double()
    with torch.no_grad():
        if bias:
            upper.bias.normal_()
    return lower, upper


def forward(lower, upper, x):
    a1, h1 = lower.forward_pre(x)
    a2, h2 = upper.forward_pre(h1)
    return Step([x, h1, h2], [a1, a2], 0.1, None)


def test_exact_inverse_inverts_the_layer_and_difference_changes_nothing():
    lower, upper = dense_pair()
    g = ExactInverse().double().bind(1, lower, upper)
    step = forward(lower, upper, torch.randn(7, 5, dtype=DT))
    torch.testing.assert_close(g(step.hs[2]), step.hs[1])  # g(f(h)) = h
    h_hat = step.hs[2] + 0.1 * torch.randn_like(step.hs[2])
    expected = torch.linalg.solve(upper.weight, (F.LeakyReLU(0.35).inverse(h_hat) - upper.bias).T).T
    torch.testing.assert_close(g.target(h_hat, step), expected)
    d = Difference(ExactInverse()).double().bind(1, lower, upper)
    torch.testing.assert_close(d.target(h_hat, step), expected)


def test_exact_inverse_of_a_narrow_layer_fails():
    lower, upper = dense_pair(n_out=4)
    with pytest.raises(ValueError, match="an exact inverse of layer 2 .*is not available"):
        ExactInverse().bind(1, lower, upper)


@pytest.mark.parametrize("cls", [ThesisInverse, OriginalInverse])
def test_dense_feedback_gradient_is_autograd_of_the_documented_loss(cls):
    lower, upper = dense_pair(act="tanh" if cls is OriginalInverse else "leaky_relu")
    g = cls(noise_std=0.5, weight_decay=0.1, init="random").double().bind(1, lower, upper)
    step = forward(lower, upper, torch.randn(9, 5, dtype=DT))
    noise = torch.randn(9, 6, dtype=DT, generator=torch.Generator().manual_seed(1))
    grads = g.feedback_grads(step, lambda shape: noise)
    Q = g.Q.detach().clone().requires_grad_(True)
    if cls is ThesisInverse:  # Alg. A.8: white noise h, g(f(h)) = Q s^-1(s(W h + b)) - ... = Q W h
        h = 0.5 * noise
        loss = 0.5 * ((h @ upper.weight.T) @ Q.T - h).pow(2).sum(1).mean()
    else:  # Alg. A.9 with noise injection: h = h_1 + sigma eps, g(f(h)) = s_1(Q s_2(W h + b))
        h = step.hs[1] + 0.5 * noise
        loss = 0.5 * (torch.tanh(torch.tanh(h @ upper.weight.T + upper.bias) @ Q.T) - h).pow(2).sum(1).mean()
    loss = loss + 0.05 * Q.pow(2).sum()  # lambda/2 ||Q||^2 (eq. 4.97)
    torch.testing.assert_close(grads[g.Q], torch.autograd.grad(loss, Q)[0])


def test_thesis_map_difference_target_is_the_difference_of_two_maps():
    lower, upper = dense_pair()
    g = Difference(ThesisInverse(init="random")).double().bind(1, lower, upper)
    step = forward(lower, upper, torch.randn(4, 5, dtype=DT))
    h_hat = step.hs[2] + 0.2 * torch.randn_like(step.hs[2])
    torch.testing.assert_close(g.target(h_hat, step), step.hs[1] + g(h_hat) - g(step.hs[2]))
    with pytest.raises(ValueError, match="wrap the map once"):
        Difference(g)


@pytest.mark.parametrize("cls", [ThesisInverse, OriginalInverse])
def test_conv_feedback_gradient_matches_finite_differences(cls):
    torch.manual_seed(0)
    lower = Conv2d([1, 6, 6], 2, kernel_size=3, padding=1, activation="tanh").double()
    upper = Conv2d([2, 6, 6], 3, kernel_size=3, stride=2, padding=1, pool=1, activation="leaky_relu").double()
    g = cls(noise_std=0.3).double().bind(1, lower, upper)
    step = forward(lower, upper, torch.randn(4, 36, dtype=DT))
    noise = torch.randn(4, 2, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(2))
    grad = g.feedback_grads(step, lambda shape: noise)[g.Q]
    assert grad.shape == g.Q.shape == (3, 2, 3, 3)

    def loss(Q):  # the documented loss, evaluated by the map itself at weights Q
        with torch.no_grad():
            old = g.Q.detach().clone()
            g.Q.copy_(Q)
            if cls is ThesisInverse:
                h = 0.3 * noise
                out = 0.5 * (g(upper(h)) - h).pow(2).sum() / 4
            else:
                h = step.hs[1] + 0.3 * noise
                out = 0.5 * (g(upper(h)) - h).pow(2).sum() / 4
            g.Q.copy_(old)
        return out

    direction = torch.randn_like(g.Q)
    eps = 1e-6
    numeric = (loss(g.Q + eps * direction) - loss(g.Q - eps * direction)) / (2 * eps)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("upper_kind", ["dense", "conv"])
def test_gradient_target_is_a_gradient_step_on_the_loss(upper_kind):
    torch.manual_seed(0)
    if upper_kind == "dense":
        lower, upper = Dense(5, 6, "tanh").double(), Dense(6, 3, "linear", bias=True).double()
        x = torch.randn(4, 5, dtype=DT)
    else:
        lower = Conv2d([1, 4, 4], 2, kernel_size=3, padding=1).double()
        upper = Conv2d([2, 4, 4], 3, kernel_size=4, activation="linear").double()
        x = torch.randn(4, 16, dtype=DT)
    y = torch.randint(0, 3, (4,))
    a1, h1 = lower.forward_pre(x)
    a2, h2 = upper.forward_pre(h1)
    step = Step([x, h1, h2], [a1, a2], 0.3, lambda: F.output_error(h2.flatten(1), y, "cross_entropy").reshape(h2.shape))
    target = GradientTarget().bind(1, lower, upper).target(None, step)
    h = h1.detach().clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(upper(h).flatten(1), y, reduction="sum")
    torch.testing.assert_close(target, h1 - 0.3 * torch.autograd.grad(loss, h)[0])


class _UserMap(TargetMap):
    """A map written by a user: ``g(h) = tanh(a h) W_{i+1}`` (a learned scalar and the layer's weight)."""

    def check_layers(self, lower, upper):
        self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=upper.weight.dtype))

    def forward(self, h_next):
        return torch.tanh(self.a * h_next) @ self.upper.weight


@pytest.mark.parametrize("cls", [OriginalInverse, _UserMap])
def test_difference_target_follows_weight_updates_within_one_step(cls):
    """``g_i(h_{i+1})`` is computed once per step, but an in-place update of the map's or the layer's weights (an optimizer
    step, as in a loop of feedback iterations on one batch) must not leave a stale value behind."""
    lower, upper = dense_pair()
    g = Difference(cls()).double().bind(1, lower, upper)
    step = forward(lower, upper, torch.randn(4, 5, dtype=DT))
    h_hat = step.hs[2] + 0.2 * torch.randn_like(step.hs[2])
    before = g.target(h_hat, step)
    with torch.no_grad():
        for w in (*g.parameters(), upper.weight):
            w.mul_(1.5)
            torch.testing.assert_close(g.target(h_hat, step), step.hs[1] + g(h_hat) - g(step.hs[2]))
    assert (g.target(h_hat, step) - before).abs().max() > 1e-3
