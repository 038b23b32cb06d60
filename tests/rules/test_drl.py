"""DRL, DDTP-linear and L-DRL (Meulemans et al. 2020; Ernoult et al. 2022): each feedback loss's gradient is autograd on
the loss as its docstring writes it, and on a linear network the feedback weights converge to the loss's closed-form
minimiser (the pseudo-inverse / damped pseudo-inverse of the Jacobian to the output for the DRL, ``W_{i+1}^T`` for the
L-DRL). The references below are plain torch, written from the docstrings, not from the library's code."""
from __future__ import annotations

import functools

import pytest
import torch

import tplightning as tp
from tplightning.errors import ConfigError
from tplightning.target_maps import Step

SGD = functools.partial(torch.optim.SGD, lr=0.01)


# ------------------------------------------------------------------------------------ the losses as written
def _forward(Ws, s, h, i):
    """``f_{i,L}(h)``: ``h`` (an activation of layer ``i``) up to the output; ``s[k-1]`` is layer ``k``'s activation."""
    for k in range(i + 1, len(Ws) + 1):
        h = s[k - 1](h @ Ws[k - 1].T)
    return h


def drl_loss(i, Q_i, Ws, Qs, s, hs, eps, sigma):
    """``mean_b 1/(2 sigma^2) ||g_i(h~_{i+1}) - g_i(h_{i+1}) - sigma eps||^2``, ``h~`` the difference-propagated ``f_{i,L}(h_i + sigma eps)``."""
    L = len(Ws)
    h = _forward(Ws, s, hs[i] + eps, i)
    for k in range(L - 1, i, -1):  # g^diff_k(h) = h_k + s_k(Q_k h) - s_k(Q_k h_{k+1})
        h = hs[k] + s[k - 1](h @ Qs[k].T) - s[k - 1](hs[k + 1] @ Qs[k].T)
    r = s[i - 1](h @ Q_i.T) - s[i - 1](hs[i + 1] @ Q_i.T) - eps
    return 0.5 * r.pow(2).sum(1).mean() / sigma**2


def ddtp_loss(i, Q_i, Ws, s, hs, eps, sigma):
    """``mean_b 1/(2 sigma^2) ||Q_i (f_{i,L}(h_i + sigma eps) - h_L) - sigma eps||^2``."""
    d = _forward(Ws, s, hs[i] + eps, i) - hs[-1]
    return 0.5 * (d @ Q_i.T - eps).pow(2).sum(1).mean() / sigma**2


def ldrl_loss(i, Q_i, Ws, s, hs, dx, dy):
    """``mean_b [-2 eps^T (g_i(f_{i+1}(h_i + eps)) - g_i(h_{i+1})) + ||g_i(h_{i+1} + eta) - g_i(h_{i+1})||^2]``."""
    g = lambda v: s[i - 1](v @ Q_i.T)  # noqa: E731
    g0 = g(hs[i + 1])
    up = s[i]((hs[i] + dx) @ Ws[i].T)
    return (-2 * (dx * (g(up) - g0)).sum(1) + (g(hs[i + 1] + dy) - g0).pow(2).sum(1)).mean()


def reference_loss(rule, i, Qs, Ws, s, hs, draws):
    """The loss of map ``i`` of ``rule`` with its noise ``draws`` (the tensors ``noise`` returned, in order)."""
    sigma = rule.feedback_noise_std
    if isinstance(rule, tp.DRL):
        return drl_loss(i, Qs[i], Ws, Qs, s, hs, draws[0], sigma)
    if isinstance(rule, tp.DDTPLinear):
        return ddtp_loss(i, Qs[i], Ws, s, hs, draws[0], sigma)
    return ldrl_loss(i, Qs[i], Ws, s, hs, draws[0], draws[1])


class Recorder:
    """A ``noise(shape)`` callable that draws from a seeded generator and keeps every draw (scaled later by the map)."""

    def __init__(self, seed=0, dtype=torch.float64):
        self.gen, self.dtype, self.draws = torch.Generator().manual_seed(seed), dtype, []

    def __call__(self, shape):
        self.draws.append(torch.randn(shape, generator=self.gen, dtype=self.dtype))
        return self.draws[-1]


ACT = {"tanh": torch.tanh, "linear": lambda a: a}
NEW = [tp.DRL, tp.DDTPLinear, tp.LDRL]


def _rule(cls, sizes, activation="tanh", **kw):
    torch.manual_seed(0)
    rule = cls(sizes=list(sizes), activation=activation, forward_optimizer=SGD, feedback_optimizer=SGD, **kw).double()
    with torch.no_grad():  # Q away from its initial (pseudo-)inverse, so the losses have a gradient worth comparing
        for Q in rule.feedback_weights:
            Q.add_(0.3 * torch.randn_like(Q))
    return rule


@pytest.mark.parametrize("cls", NEW, ids=lambda c: c.__name__)
def test_feedback_gradient_is_autograd_on_the_documented_loss(cls):
    sizes = (6, 5, 4, 3)
    rule = _rule(cls, sizes, feedback_noise_std=0.3)
    x = torch.randn(7, 6, dtype=torch.float64)
    hs, pre = rule.net.forward_all(x)
    Ws = [W.detach() for W in rule.forward_weights]
    Qs = {i: rule.Q(i).detach() for i in rule.feedback_layers}
    s = [torch.tanh] * (len(sizes) - 2) + [ACT["linear"]]
    step = Step(hs, pre, rule.target_stepsize, layers=list(rule.net.layers), maps=list(rule.maps))
    for m in rule.maps:
        i, noise = m.index, Recorder(seed=m.index)
        got = m.feedback_grads(step, noise)[rule.Q(i)]
        draws = [rule.feedback_noise_std * d for d in noise.draws]
        Q = Qs[i].clone().requires_grad_(True)
        expected = torch.autograd.grad(reference_loss(rule, i, {**Qs, i: Q}, Ws, s, hs, draws), Q)[0]
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11, msg=f"{cls.__name__} Q_{i}")
        assert expected.abs().max() > 1e-3  # a gradient worth comparing


def _train_feedback(rule, x, iterations, lr, seed=0):
    """SGD on the rule's own feedback gradients at a fixed batch, fresh noise each iteration; the feedback weights end
    as their average over the second half (Polyak averaging removes the noise of the single-sample gradients)."""
    hs, pre = rule.net.forward_all(x)
    noise = Recorder(seed)
    step = Step(hs, pre, rule.target_stepsize, layers=list(rule.net.layers), maps=list(rule.maps))
    mean = {Q: torch.zeros_like(Q) for Q in rule.feedback_weights}
    for t in range(iterations):
        grads = {}
        for m in rule.maps:
            grads.update(m.feedback_grads(step, noise))
        with torch.no_grad():
            for Q, g in grads.items():
                Q.sub_(lr * g)
                if t >= iterations // 2:
                    mean[Q] += Q / (iterations - iterations // 2)
    with torch.no_grad():
        for Q, avg in mean.items():
            Q.copy_(avg)


def test_ddtp_linear_converges_to_the_damped_pseudo_inverse_on_a_linear_network():
    """DRL minimiser with direct feedback (Meulemans et al. 2020, section 4): ``Q_i = J^T (J J^T + lambda I)^{-1}``."""
    lam = 0.1
    rule = _rule(tp.DDTPLinear, (6, 5, 4, 3), activation="linear", feedback_noise_std=0.5, feedback_weight_decay=lam, feedback_init="random")
    _train_feedback(rule, torch.randn(256, 6, dtype=torch.float64), 1000, 0.3)
    for i in (1, 2):
        J = functools.reduce(lambda A, W: W.detach() @ A, rule.forward_weights[i + 1:], rule.forward_weights[i].detach())  # W_L ... W_{i+1}
        expected = J.T @ torch.linalg.inv(J @ J.T + lam * torch.eye(3, dtype=J.dtype))
        torch.testing.assert_close(rule.Q(i).detach(), expected, rtol=0, atol=2e-2)


def test_drl_converges_to_the_pseudo_inverse_of_the_path_to_the_output_on_a_linear_network():
    """Minimising the DRL makes the difference map from the output to layer ``i`` the pseudo-inverse of ``J_{f_{i,L}}``:
    ``Q_2 -> W_3^dagger`` and ``Q_1 Q_2 -> (W_3 W_2)^dagger`` (no damping: ``feedback_weight_decay = 0``)."""
    rule = _rule(tp.DRL, (6, 5, 4, 3), activation="linear", feedback_noise_std=0.5, feedback_init="random")
    _train_feedback(rule, torch.randn(256, 6, dtype=torch.float64), 1000, 0.3)
    W2, W3 = (W.detach() for W in rule.forward_weights[1:])
    torch.testing.assert_close(rule.Q(2).detach(), torch.linalg.pinv(W3), rtol=0, atol=2e-2)
    torch.testing.assert_close(rule.Q(1).detach() @ rule.Q(2).detach(), torch.linalg.pinv(W3 @ W2), rtol=0, atol=2e-2)


def test_ldrl_converges_to_the_transposed_forward_weights_on_a_linear_network():
    """The L-DRL's minimum is ``J_{g_i} = J_{f_{i+1}}^T`` (Ernoult et al. 2022): ``Q_i -> W_{i+1}^T`` for linear layers."""
    rule = _rule(tp.LDRL, (6, 5, 4, 3), activation="linear", feedback_noise_std=0.5, feedback_init="random")
    _train_feedback(rule, torch.randn(256, 6, dtype=torch.float64), 1000, 1.0)  # the loss scales with sigma^2 = 0.25
    for i in (1, 2):
        torch.testing.assert_close(rule.Q(i).detach(), rule.forward_weights[i].detach().T, rtol=0, atol=2e-2)


def test_ldrl_linear_feedback_reaches_the_transposed_output_weight_above_relu_layers():
    """``feedback_activation="linear"`` (``g_i(h) = Q_i h``): above ReLU hidden layers the output map's ``Q`` still reaches
    ``W_L^T`` (the L-DRL's minimum, ``J_g = J_f^T`` with ``J_f = W_L`` for a linear output layer); the original form
    ``relu(Q h)`` cannot (its Jacobian is zero wherever ``Q h < 0``) and ends far from it."""
    x = torch.randn(256, 6, dtype=torch.float64)
    ends = {}
    for form in ("linear", "lower"):
        rule = _rule(tp.LDRL, (6, 5, 4, 3), activation="relu", feedback_noise_std=0.5, feedback_init="random", feedback_activation=form)
        _train_feedback(rule, x, 1000, 1.0)
        ends[form] = float((rule.Q(2).detach() - rule.forward_weights[2].detach().T).abs().max())
    assert ends["linear"] < 3e-2 < 0.1 < ends["lower"]


def test_ldrl_refuses_an_unknown_feedback_activation():
    with pytest.raises(ConfigError, match="feedback_activation must be one of 'lower', 'linear', got 'tanh'"):
        tp.LDRL(sizes=[3, 4, 2], feedback_activation="tanh")


@pytest.mark.parametrize("cls", NEW, ids=lambda c: c.__name__)
def test_noise_must_be_positive(cls):
    with pytest.raises(ValueError, match="feedback_noise_std must be > 0"):
        cls(sizes=[4, 4, 4], forward_optimizer=SGD, feedback_optimizer=SGD, feedback_noise_std=0.0)


def test_ddtp_linear_feedback_weights_have_the_output_width_and_start_at_the_pseudo_inverse():
    torch.manual_seed(0)
    rule = tp.DDTPLinear(sizes=[6, 5, 4, 3], activation="tanh", forward_optimizer=SGD, feedback_optimizer=SGD)
    assert [tuple(Q.shape) for Q in rule.feedback_weights] == [(5, 3), (4, 3)]
    W1, W2, W3 = (W.detach().double() for W in rule.forward_weights)
    torch.testing.assert_close(rule.Q(1).double(), torch.linalg.pinv(W3 @ W2), rtol=1e-4, atol=1e-5)
    # the target is h_i + Q_i (h^_L - h_L), whatever the layer above receives
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    hs, targets = rule.compute_targets(x, y)
    torch.testing.assert_close(targets[0], hs[1] + (targets[-1] - hs[-1]) @ rule.Q(1).T)


def test_ddtp_linear_with_one_hidden_layer_trains_like_dtp_ai():
    """One hidden layer, linear output: DDTP-linear's target ``h_1 + Q (h^_2 - h_2)`` is DTP-AI's ``h_1 + Q (s^-1(h^_2) - a_2)``,
    both start at ``Q = W_2^dagger``, and the DRL's gradient ``(Q W - I) eps eps^T W^T / B`` is Alg. A.8's at ``sigma = 1`` for
    any DRL ``sigma`` (it cancels), with the same noise draws: the two rules train identically."""
    from conftest import OneBatch, make_rule, quiet_trainer

    runs = []
    for name, kw in (("DTPAI", {"feedback_noise_std": 1.0}), ("DDTPLinear", {"feedback_noise_std": 0.3})):
        torch.manual_seed(0)
        rule = make_rule(name, sizes=(5, 6, 4), **kw)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 4, generator=g)
        quiet_trainer(max_epochs=3).fit(rule, datamodule=OneBatch(x, y))
        runs.append([t.detach() for t in rule.forward_weights + rule.feedback_weights])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [tp.DRL, tp.LDRL], ids=lambda c: c.__name__)
def test_feedback_evaluates_each_map_at_its_own_activation_once_per_step(cls, monkeypatch):
    """The cost of the DRL grows with the square of the depth (every layer's loss runs through the maps above it); the
    ``g_k(h_{k+1})`` that every difference target through map ``k`` subtracts is computed once per step, and the gradients
    reuse the pre-activations the losses computed. Counted per map in one feedback step: the DRL evaluates ``g_k`` at its own
    activation (once), at its own reconstruction, and at the reconstruction of each of the ``k - 1`` layers below that runs
    through it: ``k + 1`` in all; the L-DRL at ``h_{k+1}``, ``h_{k+1} + eta`` and ``f_{k+1}(h_k + eps)``: 3."""
    from tplightning.target_maps import OriginalInverse

    rule = _rule(cls, (6, 5, 5, 5, 5, 3), feedback_noise_std=0.3)
    calls: dict[int, int] = {}
    evaluate = OriginalInverse.evaluate

    def counted(self, h):
        calls[self.index] = calls.get(self.index, 0) + 1
        return evaluate(self, h)

    monkeypatch.setattr(OriginalInverse, "evaluate", counted)
    hs, pre = rule.net.forward_all(torch.randn(7, 6, dtype=torch.float64))
    rule.feedback_grads(hs, pre)
    expected = {k: k + 1 if cls is tp.DRL else 3 for k in rule.feedback_layers}
    assert calls == expected
