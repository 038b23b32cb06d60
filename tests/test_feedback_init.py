"""The laws of random feedback weights (``feedback_init``: Gaussian ``1/sqrt(fan-in)``, Xavier normal, Xavier uniform) and
the feedback biases of the original-form learned maps (``feedback_bias``: ``g_i(h) = s_i(Q_i h + d_i)``, Meulemans et
al. 2020's code). Expected scales are literal numbers from Glorot & Bengio (2010)'s formulas or torch.nn.init's public
initialisers; the bias gradients are autograd on the losses written here in plain torch, not from the library's code."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import tplightning as tp
from tplightning.errors import ConfigError
from tplightning.layers import Dense, random_feedback
from tplightning.target_maps import OriginalInverse, Step

SGD = functools.partial(torch.optim.SGD, lr=0.01)


# ------------------------------------------------------------------------------------ the draw itself
def test_random_law_is_the_gaussian_over_root_fan_in_of_one_randn_call():
    torch.manual_seed(3)
    got = random_feedback((7, 4), 4)
    torch.manual_seed(3)
    assert torch.equal(got, torch.randn(7, 4) / 2.0)


@pytest.mark.parametrize("shape", [(300, 10), (6, 16, 5, 5)])
def test_xavier_normal_is_torch_xavier_normal_of_the_same_shape(shape):
    """Same generator state, same numbers as ``torch.nn.init.xavier_normal_`` (its fans: channels x kernel area)."""
    torch.manual_seed(1)
    got = random_feedback(shape, 999, "xavier_normal")
    torch.manual_seed(1)
    expected = nn.init.xavier_normal_(torch.empty(shape))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_xavier_uniform_bound_and_spread():
    B = random_feedback((6, 16, 5, 5), 1, "xavier_uniform")  # fans (6 + 16) * 25 = 550: a = sqrt(6/550)
    a = 0.10444659357341871
    assert float(B.abs().max()) <= a and float(B.abs().max()) > 0.98 * a
    assert abs(float(B.std()) - a / math.sqrt(3)) < 0.03 * a  # U(-a, a) has std a/sqrt(3)
    assert abs(float(B.mean())) < 0.02 * a


def test_unknown_law_names_the_option():
    with pytest.raises(ConfigError, match="feedback_init must be one of 'random', 'xavier_normal', 'xavier_uniform'"):
        random_feedback((2, 2), 2, "orthogonal")


# ------------------------------------------------------------------------------------ the rules' options
def _std(t: torch.Tensor) -> float:
    return float(t.detach().std())


@pytest.mark.parametrize("cls", [tp.FA, tp.BDFA, tp.KP])
def test_fa_family_xavier_normal(cls):
    rule = cls(sizes=[20, 300, 200, 10], feedback_init="xavier_normal")
    B1, B2 = rule.feedback_weights[:2]  # W_2^T: (300, 200); W_3^T: (200, 10)
    assert abs(_std(B1) - math.sqrt(2 / 500)) < 0.05 * math.sqrt(2 / 500)
    assert abs(_std(B2) - math.sqrt(2 / 210)) < 0.1 * math.sqrt(2 / 210)
    default = cls(sizes=[20, 300, 200, 10])
    assert abs(_std(default.feedback_weights[1]) - 1 / math.sqrt(10)) < 0.1 / math.sqrt(10)  # 3.3 x Xavier's


def test_bdfa_input_feedback_follows_the_law():
    rule = tp.BDFA(sizes=[400, 100, 10], feedback_init="xavier_uniform")
    assert float(rule.input_feedback.detach().abs().max()) <= math.sqrt(6 / 500)
    assert float(rule.input_feedback.detach().abs().max()) > 0.95 * math.sqrt(6 / 500)


def test_dfa_xavier_uniform_on_a_conv_block_output():
    """DFA's B~ into a 6x14x14 block from 10 outputs: biotorch's Xavier-uniform bound sqrt(6 / (1176 + 10))."""
    net = nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1176, 10))
    B = tp.DFA(network=net, feedback_init="xavier_uniform").feedback_weights[0]
    assert tuple(B.shape) == (1176, 10)
    a = math.sqrt(6 / 1186)
    assert float(B.abs().max()) <= a and float(B.abs().max()) > 0.98 * a


def test_sign_symmetric_rules_refuse_another_law():
    for cls in (tp.USF, tp.FRSF, tp.BRSF):
        with pytest.raises(ConfigError, match="feedback_init must be 'random' for sign-symmetric feedback"):
            cls(sizes=[3, 4, 2], feedback_init="xavier_normal")
    with pytest.raises(ConfigError, match="feedback_init must be one of 'random', 'xavier_normal', 'xavier_uniform', got 'pinv'"):
        tp.DFA(sizes=[3, 4, 2], feedback_init="pinv")


@pytest.mark.parametrize("cls, shape, fans", [(tp.DRL, (256, 10), 266), (tp.DDTPLinear, (256, 10), 266), (tp.OriginalDTP, (256, 10), 266)])
def test_learned_maps_xavier_normal(cls, shape, fans):
    rule = cls(sizes=[20, 256, 256, 10], activation="tanh", feedback_init="xavier_normal")
    Q = rule.feedback_weights[-1]
    assert tuple(Q.shape) == shape
    assert abs(_std(Q) - math.sqrt(2 / fans)) < 0.08 * math.sqrt(2 / fans)  # 0.087, where "random" gives 1/sqrt(10) = 0.32


def test_block_feedback_module_draws_under_the_law():
    net = nn.Sequential(nn.Unflatten(1, (1, 12, 12)), nn.Conv2d(1, 8, 5), nn.Tanh(), nn.Flatten(), nn.Linear(512, 200), nn.Tanh(), nn.Linear(200, 10))
    rule = tp.OriginalDTP(network=net, feedback_init="xavier_normal")
    back = [m for G in rule.feedback_weights for m in G.modules() if isinstance(m, (nn.Linear, nn.ConvTranspose2d))]
    stds = sorted(_std(m.weight) for m in back)  # mirrors of Linear(512, 200) and Linear(200, 10)
    assert abs(stds[0] - math.sqrt(2 / 712)) < 0.05 * math.sqrt(2 / 712)
    assert abs(stds[1] - math.sqrt(2 / 210)) < 0.08 * math.sqrt(2 / 210)


def test_learned_rules_refuse_an_unknown_init_and_a_bias_they_cannot_use():
    with pytest.raises(ConfigError, match="feedback_init must be one of 'pinv', 'regularised', 'random', 'xavier_normal', 'xavier_uniform', got 'zeros'"):
        tp.DRL(sizes=[3, 4, 2], feedback_init="zeros")
    with pytest.raises(ConfigError, match="feedback_bias needs the original form .* DTPAI's ThesisInverse"):
        tp.DTPAI(sizes=[3, 4, 2], feedback_bias=True)
    with pytest.raises(ConfigError, match="d_i would cancel"):
        tp.DDTPLinear(sizes=[3, 4, 2], feedback_bias=True)


# ------------------------------------------------------------------------------------ feedback biases
def test_original_inverse_bias_gradient_is_autograd_of_the_reconstruction_loss():
    torch.manual_seed(0)
    lower, upper = Dense(4, 5, activation="tanh").double(), Dense(5, 3, activation="tanh").double()
    g = OriginalInverse(noise_std=0.0, init="random", bias=True).bind(1, lower, upper).double()
    with torch.no_grad():
        g.d.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5, -0.4]))
    x = torch.randn(6, 4, dtype=torch.float64)
    h1 = torch.tanh(x @ lower.weight.detach().T)
    h2 = torch.tanh(h1 @ upper.weight.detach().T)
    grads = g.feedback_grads(Step([x, h1, h2], [h1, h2]), noise=None)
    Q, d = g.Q.detach().clone().requires_grad_(True), g.d.detach().clone().requires_grad_(True)
    loss = 0.5 * (torch.tanh(h2 @ Q.T + d) - h1).pow(2).sum(1).mean()
    eQ, ed = torch.autograd.grad(loss, (Q, d))
    torch.testing.assert_close(grads[g.Q], eQ, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[g.d], ed, rtol=1e-10, atol=1e-12)
    assert ed.abs().max() > 1e-3


class Recorder:
    """``noise(shape)`` from a seeded generator, keeping every draw."""

    def __init__(self, seed):
        self.gen, self.draws = torch.Generator().manual_seed(seed), []

    def __call__(self, shape):
        self.draws.append(torch.randn(shape, generator=self.gen, dtype=torch.float64))
        return self.draws[-1]


def _with_biases(cls, **kw):
    torch.manual_seed(0)
    rule = cls(sizes=[6, 5, 4, 3], activation="tanh", forward_optimizer=SGD, feedback_optimizer=SGD, feedback_bias=True, **kw).double()
    with torch.no_grad():  # Q and d away from their initial values
        for m in rule.maps:
            m.base.Q.add_(0.3 * torch.randn_like(m.base.Q))
            m.base.d.copy_(0.3 * torch.randn_like(m.base.d))
    return rule


@pytest.mark.parametrize("cls", [tp.DRL, tp.LDRL])
def test_drl_and_ldrl_bias_gradients_are_autograd_of_their_losses(cls):
    sigma = 0.3
    rule = _with_biases(cls, feedback_noise_std=sigma)
    x = torch.randn(7, 6, dtype=torch.float64)
    hs, pre = rule.net.forward_all(x)
    Ws = [W.detach() for W in rule.forward_weights]
    Qs = {m.index: m.base.Q.detach() for m in rule.maps}
    ds = {m.index: m.base.d.detach() for m in rule.maps}
    s = [torch.tanh, torch.tanh, lambda a: a]
    step = Step(hs, pre, rule.target_stepsize, layers=list(rule.net.layers), maps=list(rule.maps))

    def up(h, i):  # f_{i,L}
        for k in range(i + 1, 4):
            h = s[k - 1](h @ Ws[k - 1].T)
        return h

    for m in rule.maps:
        i = m.index
        noise = Recorder(seed=i)
        got = m.feedback_grads(step, noise)
        eps = [sigma * e for e in noise.draws]
        Q, d = Qs[i].clone().requires_grad_(True), ds[i].clone().requires_grad_(True)
        g = lambda v: torch.tanh(v @ Q.T + d)  # noqa: E731  g_i(v) = s_i(Q_i v + d_i)
        if cls is tp.DRL:
            h = up(hs[i] + eps[0], i)
            for k in range(2, i, -1):  # the difference maps above, held fixed
                h = hs[k] + torch.tanh(h @ Qs[k].T + ds[k]) - torch.tanh(hs[k + 1] @ Qs[k].T + ds[k])
            loss = 0.5 * (g(h) - g(hs[i + 1]) - eps[0]).pow(2).sum(1).mean() / sigma**2
        else:
            dx, dy = eps
            g0 = g(hs[i + 1])
            loss = (-2 * (dx * (g(s[i]((hs[i] + dx) @ Ws[i].T)) - g0)).sum(1) + (g(hs[i + 1] + dy) - g0).pow(2).sum(1)).mean()
        eQ, ed = torch.autograd.grad(loss, (Q, d))
        torch.testing.assert_close(got[m.base.Q], eQ, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got[m.base.d], ed, rtol=1e-9, atol=1e-11)
        assert ed.abs().max() > 1e-3


def test_feedback_bias_is_a_feedback_parameter_and_in_the_state_dict():
    rule = tp.DRL(sizes=[4, 5, 5, 2], activation="tanh", feedback_bias=True, feedback_init="xavier_normal", feedback_optimizer=SGD)
    params = rule.feedback_parameters()
    assert all(any(p is m.base.d for p in params) for m in rule.maps)
    assert rule.hparams["feedback_bias"] is True and rule.hparams["feedback_init"] == "xavier_normal"
    assert "maps.0.inner.d" in rule.state_dict()
