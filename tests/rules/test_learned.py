"""Learned-inverse rules (thesis 4.3, 5.2.1; Alg. A.8-A.17): the feedback training and the targets.

Float64 where the test is about math. Every expected value is computed here, independently of the
library (``torch.linalg.inv``/``pinv``, autograd, formulas written out in the test); the library
only supplies the quantity under test.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

import tplightning as tp
from conftest import make_rule, quiet_trainer, tiny_data

DT = torch.float64
SLOPE = 0.35
LEARNED = ["TPAI", "RTPAI", "DTPAI", "RDTPAI", "OriginalTP", "OriginalRTP", "OriginalDTP", "OriginalRDTP", "LeeDTP"]
THESIS_FORM = ["TPAI", "RTPAI", "DTPAI", "RDTPAI"]
DIFFERENCE = ["DTPAI", "RDTPAI", "OriginalDTP", "OriginalRDTP", "LeeDTP"]


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# Helpers written independently of the library
# --------------------------------------------------------------------------------------------


def leaky(a, s=SLOPE):
    return torch.where(a >= 0, a, s * a)


def leaky_inv(h, s=SLOPE):
    return torch.where(h >= 0, h, h / s)


def leaky_deriv(a, s=SLOPE):
    return torch.where(a >= 0, torch.ones_like(a), torch.full_like(a, s))


def well_conditioned(m: int, n: int, gen: torch.Generator, lo: float = 0.7, hi: float = 1.4) -> torch.Tensor:
    """A generic (non-symmetric, non-diagonal) ``m x n`` matrix with singular values in ``[lo, hi]``."""
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    k = min(m, n)
    S = torch.zeros(m, n, dtype=DT)
    S[range(k), range(k)] = torch.linspace(lo, hi, k, dtype=DT)
    return U @ S @ V.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def learned(name: str, sizes, seed: int = 0, **kw):
    """A float64 rule with well-conditioned forward weights drawn from ``seed``; returns (rule, Ws)."""
    kw.setdefault("feedback_seed", seed)
    rule = make_rule(name, sizes=sizes, **kw).double()
    gen = torch.Generator().manual_seed(1000 + seed)
    Ws = [well_conditioned(sizes[i + 1], sizes[i], gen) for i in range(len(sizes) - 1)]
    rule.load_forward_weights(Ws)
    return rule, Ws


@torch.no_grad()
def sgd_on_feedback(rule, steps: int, lr: float, hs=None, decay: bool = True) -> None:
    """Plain SGD on the gradients ``feedback_grads`` returns (Alg. A.8 / A.9), lr decaying to lr/10."""
    for s in range(steps):
        eta = lr * (1 - 0.9 * s / steps) if decay else lr
        for Q, g in rule.feedback_grads(hs if hs is not None else [torch.zeros(1, 1)]).items():
            Q -= eta * g


# --------------------------------------------------------------------------------------------
# Alg. A.8 and theorems 4.6 / 4.7 (fig. 5.9)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["TPAI", "DTPAI"])
@pytest.mark.parametrize("seed", [0, 1])
def test_alg_a8_square_layers_learn_the_inverse(name, seed):
    """Theorem 4.6, square W: Q -> W^-1 (white noise has full-rank covariance). At Q = W^-1 every
    sample's residual is zero, so SGD converges exactly (no noise floor)."""
    sizes = [4, 4, 4, 4]
    rule, Ws = learned(name, sizes, seed, feedback_init="random", feedback_weight_decay=0.0, feedback_batch_size=16)
    targets = {i: torch.linalg.inv(Ws[i]) for i in rule.feedback_layers}  # Q_i -> W_{i+1}^-1
    assert all(rel(rule.Q(i), t) > 0.3 for i, t in targets.items())  # starts far away
    sgd_on_feedback(rule, steps=300, lr=0.2)
    for i, t in targets.items():
        assert rel(rule.Q(i), t) < 1e-6, i


def test_alg_a8_contracting_layer_learns_the_pseudo_inverse():
    """Theorem 4.6, n_{i+1} < n_i, white noise, lambda = 0: Q -> W^dagger, and the reconstruction
    error cannot vanish: E||Q W h - h||^2 -> sigma^2 (n_i - n_{i+1}) (fig. 5.10b)."""
    sizes = [5, 5, 3]
    rule, Ws = learned("DTPAI", sizes, 0, feedback_init="random", feedback_weight_decay=0.0, feedback_batch_size=4096)
    W = Ws[1]  # (3, 5)
    target = torch.linalg.pinv(W)
    assert rel(rule.Q(1), target) > 0.3
    sgd_on_feedback(rule, steps=600, lr=0.2)
    assert rel(rule.Q(1), target) < 1e-2
    h = torch.randn(20000, 5, generator=torch.Generator().manual_seed(7), dtype=DT)
    recon = ((h @ W.T @ rule.Q(1).detach().T - h) ** 2).sum(1).mean()
    assert float(recon) == pytest.approx(5 - 3, rel=0.05)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_alg_a8_expanding_layer_with_weight_decay_theorem_4_7(sigma):
    """Theorem 4.7, n_{i+1} > n_i, lambda = 0.2: Q -> W^T (W W^T + lambda/sigma^2 I)^-1, not W^dagger,
    and the shift depends on lambda/sigma^2 (sigma = 2 lands elsewhere than lambda alone would give)."""
    lam, sizes = 0.2, [3, 3, 5]
    rule, Ws = learned(
        "DTPAI", sizes, 0, feedback_init="random", feedback_weight_decay=lam, feedback_noise_std=sigma,
        feedback_batch_size=2048,
    )
    W = Ws[1]  # (5, 3)
    I5 = torch.eye(5, dtype=DT)
    target = W.T @ torch.linalg.inv(W @ W.T + lam / sigma**2 * I5)
    sgd_on_feedback(rule, steps=400, lr=0.2)
    err = rel(rule.Q(1), target)
    assert err < 1e-2
    assert rel(rule.Q(1), torch.linalg.pinv(W)) > 5 * err  # regularised, not the pseudo-inverse
    if sigma != 1.0:  # lambda not divided by sigma^2 would be a different, distinguishable point
        wrong = W.T @ torch.linalg.inv(W @ W.T + lam * I5)
        assert rel(rule.Q(1), wrong) > 5 * err


def test_alg_a8_expanding_layer_without_weight_decay_finds_a_left_inverse():
    """lambda = 0, n_{i+1} > n_i: every Q with Q W = I minimises the loss (theorem 4.6 gives no unique
    W^dagger). Each sample gradient (Q W h - h)(W h)^T has its rows in range(W), so the part of Q
    acting on range(W)^perp never moves: Q -> W^dagger + Q_0 (I - W W^dagger), far from W^dagger."""
    rule, Ws = learned("DTPAI", [3, 3, 5], 0, feedback_init="random", feedback_weight_decay=0.0, feedback_batch_size=16)
    W = Ws[1]  # (5, 3)
    Q0 = rule.Q(1).detach().clone()
    W_pinv = torch.linalg.pinv(W)
    sgd_on_feedback(rule, steps=300, lr=0.2)
    Q = rule.Q(1)
    torch.testing.assert_close(Q @ W, torch.eye(3, dtype=DT), atol=1e-6, rtol=0)
    torch.testing.assert_close(Q, W_pinv + Q0 @ (torch.eye(5, dtype=DT) - W @ W_pinv), atol=1e-6, rtol=0)
    assert rel(Q, W_pinv) > 0.1


@pytest.mark.parametrize("name,bias,sigma,lam", [
    ("DTPAI", False, 1.0, 0.0), ("TPAI", True, 2.0, 0.3),
    ("OriginalDTP", False, 0.0, 0.0), ("OriginalTP", True, 0.5, 0.3), ("LeeDTP", False, 0.7, 0.1),
])  # fmt: skip
def test_feedback_grads_are_autograd_gradients_of_the_inverse_losses(name, bias, sigma, lam):
    """Alg. A.8: grad of mean_b 1/2||Q s^-1(f(h)) - h||^2 + lambda/2 ||Q||^2 on h = sigma * noise;
    Alg. A.9 (+ eq. 3.13): grad of mean_b 1/2||s_i(Q f(h_i + eps)) - (h_i + eps)||^2 + lambda/2 ||Q||^2."""
    sizes = [4, 5, 5, 3] if name != "LeeDTP" else [4, 5, 5, 5, 3]
    rule, Ws = learned(name, sizes, 0, feedback_init="random", bias=bias, feedback_noise_std=sigma,
                       feedback_weight_decay=lam, feedback_batch_size=7)
    gen = torch.Generator().manual_seed(3)
    bs = []
    if bias:
        with torch.no_grad():
            for b in rule.net.biases:
                b.copy_(torch.randn(b.shape, generator=gen, dtype=DT))
        bs = [b.detach().clone() for b in rule.net.biases]
    drawn = []

    def fake_noise(shape):
        drawn.append(torch.randn(shape, generator=gen, dtype=DT))
        return drawn[-1]

    rule.noise = fake_noise
    x = torch.randn(9, sizes[0], generator=gen, dtype=DT)
    with torch.no_grad():
        hs, _ = rule.net.forward_all(x)
    grads = rule.feedback_grads(hs)
    assert set(grads) == {rule.Q(i) for i in rule.feedback_layers}
    L = len(sizes) - 1
    for n, i in enumerate(rule.feedback_layers):
        Q = rule.Q(i).detach().clone().requires_grad_()
        W = Ws[i]  # W_{i+1}
        if issubclass(rule.feedback_map, tp.target_maps.ThesisInverse):
            h = sigma * drawn[n]
            assert h.shape == (7, sizes[i])
            recon = (h @ W.T) @ Q.T  # Q s^-1(s(W h + b)) - Q b = Q W h
        else:
            eps = sigma * drawn[n] if sigma > 0 else 0.0
            h = hs[i] + eps
            a = h @ W.T + (bs[i] if bias else 0.0)
            h_next = a if i + 1 == L else leaky(a)
            recon = leaky(h_next @ Q.T)
        loss = 0.5 * ((recon - h) ** 2).sum(1).mean() + 0.5 * lam * (Q**2).sum()
        (expected,) = torch.autograd.grad(loss, Q)
        torch.testing.assert_close(grads[rule.Q(i)], expected)
    assert len(drawn) == (len(rule.feedback_layers) if (issubclass(rule.feedback_map, tp.target_maps.ThesisInverse) or sigma > 0) else 0)


def test_feedback_noise_is_seeded():
    a = learned("DTPAI", [4, 4, 4], 0, feedback_init="random")[0]
    b = learned("DTPAI", [4, 4, 4], 0, feedback_init="random")[0]
    c = learned("DTPAI", [4, 4, 4], 0, feedback_init="random", feedback_seed=5)[0]
    with torch.no_grad():
        b.Q(1).copy_(a.Q(1))
        c.Q(1).copy_(a.Q(1))
    hs = [torch.zeros(6, 4, dtype=DT)]
    ga, gb, gc = (list(r.feedback_grads(hs).values())[0] for r in (a, b, c))
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert not torch.allclose(ga, gc)


# --------------------------------------------------------------------------------------------
# Original form cannot invert a leaky-ReLU layer (figs. 5.10a vs 5.11)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_original_form_keeps_a_reconstruction_error_the_thesis_form_removes(seed):
    """Square leaky-ReLU layers. Thesis form g = Q s^-1(h): the reconstruction Q W h is exact at
    Q = W^-1. Original form g = s_1(Q h): s_1(Q s_2(W h)) = h would need Q s_2(W h) = s_1^-1(h) for
    all h, but the left side kinks on the hyperplanes w_j.h = 0 and the right side on h_k = 0, so no
    Q is exact for a generic W. Same number of steps; the error is measured on fresh samples of the
    distribution the original form trained on (h_1 = s_1(W_1 x), x Gaussian)."""
    n, B, steps, lr = 4, 256, 300, 0.2
    sizes = [n, n, n, n]
    thesis, Ws = learned("DTPAI", sizes, seed, feedback_init="random", feedback_noise_std=1.0, feedback_batch_size=B)
    original, Ws_o = learned("OriginalDTP", sizes, seed, feedback_init="random", feedback_noise_std=0.0)
    assert all(torch.equal(a, b) for a, b in zip(Ws, Ws_o))
    W1, W2 = Ws[0], Ws[1]
    gen = torch.Generator().manual_seed(50 + seed)

    def errors():
        h1 = leaky(torch.randn(4096, n, generator=gen, dtype=DT) @ W1.T)
        size = h1.norm(dim=1).mean()
        e_thesis = (h1 @ W2.T @ thesis.Q(1).detach().T - h1).norm(dim=1).mean() / size
        e_orig = (leaky(leaky(h1 @ W2.T) @ original.Q(1).detach().T) - h1).norm(dim=1).mean() / size
        return float(e_thesis), float(e_orig)

    _, e_orig_start = errors()
    with torch.no_grad():
        for _ in range(steps):
            sgd_on_feedback(thesis, 1, lr, decay=False)
            hs, _ = original.net.forward_all(torch.randn(B, n, generator=gen, dtype=DT))
            sgd_on_feedback(original, 1, lr, hs=hs, decay=False)
    e_thesis, e_orig = errors()
    assert e_orig < 0.7 * e_orig_start  # Alg. A.9 did train the original form ...
    assert e_orig > 0.05  # ... but it cannot reach zero
    assert e_thesis < 1e-6
    assert e_orig > 10 * e_thesis


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_inverse_feedback_gives_tpei_targets(seed):
    """With Q_i = W_{i+1}^-1, TP-AI (g = Q s^-1) is TP-EI, and DTP-AI too (g(h_{i+1}) = h_i exactly)."""
    sizes = [6, 6, 6, 6]
    torch.manual_seed(seed)
    tpei = make_rule("TPEI", sizes=sizes, target_stepsize=0.5).double()
    Ws = [W.detach().clone() for W in tpei.forward_weights]  # robustly invertible W_2..W_L
    tpei.load_forward_weights(Ws)  # refresh the inverses in float64
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 6, generator=gen, dtype=DT), torch.randn(5, 6, generator=gen, dtype=DT)
    hs, t_ei = tpei.compute_targets(x, y)
    # independent: h^_L = h_L - eta^ (h_L - y), h^_i = W_{i+1}^-1 s_{i+1}^-1(h^_{i+1})
    L = len(Ws)
    expected = [None] * L
    expected[L - 1] = hs[L] - 0.5 * (hs[L] - y)
    for i in range(L - 1, 0, -1):
        a = expected[i] if i + 1 == L else leaky_inv(expected[i])
        expected[i - 1] = torch.linalg.solve(Ws[i], a.T).T
    for a, b in zip(t_ei, expected):
        torch.testing.assert_close(a, b)
    for name in ("TPAI", "DTPAI"):
        rule = make_rule(name, sizes=sizes, target_stepsize=0.5, feedback_init="random").double()
        rule.load_forward_weights(Ws)
        with torch.no_grad():
            for i in rule.feedback_layers:
                rule.Q(i).copy_(torch.linalg.inv(Ws[i]))
        hs_ai, t_ai = rule.compute_targets(x, y)
        for a, b in zip(hs_ai, hs):
            torch.testing.assert_close(a, b)
        for a, b in zip(t_ai, t_ei):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", DIFFERENCE)
def test_difference_targets_satisfy_eq_3_14_for_any_feedback(name):
    """Eq. 4.101 gives eq. 3.14: h^_{i+1} = h_{i+1} => h^_i = h_i, whatever Q; for h^_{i+1} != h_{i+1}
    the target is h_i + g(h^_{i+1}) - g(h_{i+1}) with g written out here."""
    sizes = [5, 6, 6, 6, 4]
    rule, Ws = learned(name, sizes, 0, feedback_init="random")
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for Q in rule.feedback_weights:
            Q.copy_(3 * torch.randn(Q.shape, generator=gen, dtype=DT))  # nowhere near an inverse
    x = torch.randn(8, 5, generator=gen, dtype=DT)
    with torch.no_grad():
        hs, pre = rule.net.forward_all(x)
        L = len(Ws)
        for i in rule.feedback_layers:
            torch.testing.assert_close(rule.propagate(i, hs[i + 1], hs, pre), hs[i], rtol=0, atol=1e-12)
            h_hat = hs[i + 1] + 0.3 * torch.randn(hs[i + 1].shape, generator=gen, dtype=DT)
            Q = rule.Q(i)
            if issubclass(rule.feedback_map, tp.target_maps.ThesisInverse):
                inv = (lambda h: h) if i + 1 == L else leaky_inv
                g = lambda h: inv(h) @ Q.T  # noqa: E731
            else:
                g = lambda h: leaky(h @ Q.T)  # noqa: E731
            out = rule.propagate(i, h_hat, hs, pre)
            torch.testing.assert_close(out, hs[i] + g(h_hat) - g(hs[i + 1]))
            assert float((out - hs[i]).norm()) > 1e-2


@pytest.mark.parametrize("name", ["TPAI", "OriginalTP"])
def test_plain_targets_break_eq_3_14_with_random_feedback(name):
    """Without the difference correction, h^_{i+1} = h_{i+1} gives h^_i = g_i(h_{i+1}) != h_i."""
    rule, _ = learned(name, [5, 6, 6, 4], 0, feedback_init="random")
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(2), dtype=DT)
    with torch.no_grad():
        hs, pre = rule.net.forward_all(x)
        for i in rule.feedback_layers:
            out = rule.propagate(i, hs[i + 1], hs, pre)
            assert float((out - hs[i]).norm()) > 0.1 * float(hs[i].norm())


@pytest.mark.parametrize("loss,out_act", [("mse", "linear"), ("mse", "tanh"), ("cross_entropy", "linear")])
def test_lee_dtp_penultimate_target_is_a_gradient_step(loss, out_act):
    """LeeDTP: h^_{L-1} = h_{L-1} - eta^ dl/dh_{L-1} (autograd here), output target eq. 4.4 and the
    lower layers' original-form difference targets, for mse and cross-entropy."""
    sizes, eta = [5, 6, 6, 4], 0.3
    rule, Ws = learned("LeeDTP", sizes, 0, feedback_init="random", loss=loss, output_activation=out_act,
                       target_stepsize=eta)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 5, generator=gen, dtype=DT)
    y = torch.randint(0, 4, (7,), generator=gen) if loss == "cross_entropy" else torch.randn(7, 4, generator=gen, dtype=DT)
    hs, targets = rule.compute_targets(x, y)
    out_fn = torch.tanh if out_act == "tanh" else (lambda a: a)

    def per_sample_sum(h_L):
        if loss == "mse":
            return 0.5 * ((h_L - y) ** 2).sum()
        return torch.nn.functional.cross_entropy(h_L, y, reduction="sum")

    h3 = hs[3].detach().clone().requires_grad_()
    (e3,) = torch.autograd.grad(per_sample_sum(h3), h3)
    torch.testing.assert_close(targets[2], hs[3] - eta * e3)  # output target, eq. 4.4
    h2 = hs[2].detach().clone().requires_grad_()
    (e2,) = torch.autograd.grad(per_sample_sum(out_fn(h2 @ Ws[2].T)), h2)
    torch.testing.assert_close(targets[1], hs[2] - eta * e2)  # penultimate: gradient step
    Q1 = rule.Q(1).detach()
    torch.testing.assert_close(targets[0], hs[1] + leaky(targets[1] @ Q1.T) - leaky(hs[2] @ Q1.T))


@pytest.mark.parametrize("sizes", [(4, 4), (3, 4)])
def test_lee_dtp_refuses_a_network_without_hidden_layer(sizes):
    """Its penultimate target would be a 'target for the input' overwriting h^_L (found by this suite)."""
    with pytest.raises(ValueError, match=r"LeeDTP needs a hidden layer"):
        make_rule("LeeDTP", sizes=sizes)


# --------------------------------------------------------------------------------------------
# Training schedule: pre-training, iterations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DTPAI", "OriginalDTP"])
def test_feedback_pretraining_changes_only_q(name):
    sizes = (6, 6, 6, 6)

    def fit(pretrain):
        torch.manual_seed(0)
        rule = make_rule(name, sizes=sizes, feedback_init="random", feedback_pretrain_epochs=pretrain)
        W0 = [W.detach().clone() for W in rule.forward_weights]
        Q0 = [Q.detach().clone() for Q in rule.feedback_weights]
        quiet_trainer(max_epochs=1).fit(rule, datamodule=tiny_data(sizes))
        dW = [float((W.detach() - w).abs().max()) for W, w in zip(rule.forward_weights, W0)]
        dQ = [float((Q.detach() - q).abs().max()) for Q, q in zip(rule.feedback_weights, Q0)]
        return dW, dQ

    dW, dQ = fit(1)
    assert dW == [0.0] * 3
    assert all(d > 1e-4 for d in dQ)
    dW, dQ = fit(0)
    assert all(d > 1e-5 for d in dW)
    assert all(d > 1e-4 for d in dQ)


class _FwdCount(torch.optim.SGD):
    steps = 0

    def step(self, closure=None):
        type(self).steps += 1
        return super().step(closure)


class _FbCount(_FwdCount):
    steps = 0


@pytest.mark.parametrize("k", [1, 3])
def test_feedback_iterations_steps_per_batch_in_a_fit(k):
    _FwdCount.steps = _FbCount.steps = 0
    rule = make_rule("DTPAI", forward_optimizer=functools.partial(_FwdCount, lr=0.01),
                     feedback_optimizer=functools.partial(_FbCount, lr=0.01), feedback_iterations=k)
    quiet_trainer(max_epochs=1).fit(rule, datamodule=tiny_data())  # 64 samples / batch 8
    assert (_FwdCount.steps, _FbCount.steps) == (8, 8 * k)


@pytest.mark.parametrize("k", [1, 3])
def test_feedback_iterations_are_sequential_sgd_steps(k):
    """Original form without noise: the k updates of one batch are k SGD steps on the same h, each
    from the Q the previous one left (Alg. A.9 gradient written out here)."""
    lr = 0.05
    rule, Ws = learned("OriginalDTP", [5, 6, 6, 4], 0, feedback_init="random", feedback_noise_std=0.0,
                       feedback_iterations=k, feedback_optimizer=functools.partial(torch.optim.SGD, lr=lr))
    opts = rule.build_optimizers()
    rule.optimizer_list = lambda: opts
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1), dtype=DT)
    with torch.no_grad():
        hs, pre = rule.net.forward_all(x)
    expected = {}
    for i in rule.feedback_layers:
        Q = rule.Q(i).detach().clone()
        for _ in range(k):
            c = hs[i + 1] @ Q.T
            Q = Q - lr * (leaky_deriv(c) * (leaky(c) - hs[i])).T @ hs[i + 1] / 8
        expected[i] = Q
    W0 = [W.detach().clone() for W in rule.forward_weights]
    with torch.no_grad():
        rule.update_feedback(hs, pre)
    for i in rule.feedback_layers:
        torch.testing.assert_close(rule.Q(i), expected[i])
    assert all(torch.equal(a, b) for a, b in zip(W0, rule.forward_weights))


# --------------------------------------------------------------------------------------------
# Initialisation, structure, construction errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DTPAI", "OriginalTP", "LeeDTP"])
def test_pinv_init_at_construction_and_after_new_forward_weights(name):
    sizes = (5, 6, 4, 3)
    rule = make_rule(name, sizes=sizes, feedback_init="pinv")

    def check():
        for i in rule.feedback_layers:
            W = rule.net.weights[i].detach().double()  # W_{i+1}
            torch.testing.assert_close(rule.Q(i).double(), torch.linalg.pinv(W), rtol=1e-4, atol=1e-5)

    check()
    gen = torch.Generator().manual_seed(9)
    new = [torch.randn(W.shape, generator=gen) for W in rule.forward_weights]
    rule.load_forward_weights(new)
    assert all(torch.equal(W, w) for W, w in zip(rule.forward_weights, new))
    check()
    dm = tiny_data(sizes)  # the InitNearTeacher path
    tp.InitNearTeacher(distance=2.0, seed=1).setup(SimpleNamespace(datamodule=dm), rule, "fit")
    assert not torch.equal(rule.forward_weights[1], new[1])
    check()


def test_random_init_is_left_alone_by_new_forward_weights():
    rule = make_rule("DTPAI", sizes=(5, 6, 4, 3), feedback_init="random")
    Q0 = [Q.detach().clone() for Q in rule.feedback_weights]
    assert not torch.allclose(Q0[0], torch.linalg.pinv(rule.net.weights[1].detach()), atol=1e-2)
    rule.load_forward_weights([torch.randn(W.shape) for W in rule.forward_weights])
    assert all(torch.equal(a, b) for a, b in zip(Q0, rule.feedback_weights))


@pytest.mark.parametrize("name", LEARNED)
def test_feedback_weights_are_live_parameters_of_the_feedback_optimizer(name):
    sizes = (5, 6, 4, 3)
    rule = make_rule(name, sizes=sizes)
    Qs = rule.feedback_weights
    expected = [(6, 4)] if name == "LeeDTP" else [(6, 4), (4, 3)]  # Q_i: (n_i, n_{i+1}), i = 1..L-1 (Lee: L-2)
    assert [tuple(Q.shape) for Q in Qs] == expected
    assert all(Q is rule.Q(i) for i, Q in enumerate(Qs, start=1))
    fwd, fb = rule.build_optimizers()
    fb_ids = {id(p) for p in fb.param_groups[0]["params"]}
    assert fb_ids == {id(Q) for Q in Qs}
    assert not fb_ids & {id(p) for p in fwd.param_groups[0]["params"]}
    params = {id(p) for p in rule.parameters()}
    assert fb_ids <= params
    with torch.no_grad():
        Qs[0].zero_()
    h = torch.rand(3, 4) + 0.1  # positive: in the range of every activation
    assert torch.equal(rule.g(1, h), torch.zeros(3, 6))  # the same tensors, not copies


@pytest.mark.parametrize("name", THESIS_FORM)
@pytest.mark.parametrize("kw", [{"activation": "relu"}, {"negative_slope": 0.0}, {"output_activation": "relu"}])
def test_thesis_form_needs_invertible_activations(name, kw):
    """g_i = Q_i s_{i+1}^-1 inverts s_2..s_L; s_1 is never inverted, so relu there is fine."""
    with pytest.raises(ValueError, match="has no inverse"):
        make_rule(name, sizes=(6, 6, 6, 6), **kw)
    if "output_activation" not in kw:
        make_rule(name, sizes=(6, 6, 6), **kw)  # one hidden layer: s_1 only feeds W_2


@pytest.mark.parametrize("name", ["OriginalTP", "OriginalDTP", "LeeDTP"])
def test_original_form_accepts_relu(name):
    rule = make_rule(name, sizes=(6, 6, 6, 6), activation="relu")
    hs, targets = rule.compute_targets(torch.randn(4, 6), torch.randn(4, 6))
    assert all(torch.isfinite(t).all() for t in targets)


@pytest.mark.parametrize("kw,match", [
    ({"feedback_noise_std": -0.1}, "feedback_noise_std and feedback_weight_decay must be >= 0"),
    ({"feedback_weight_decay": -1e-3}, "feedback_noise_std and feedback_weight_decay must be >= 0"),
    ({"feedback_iterations": 0}, "feedback_iterations must be >= 1"),
    ({"feedback_pretrain_epochs": -1}, "feedback_pretrain_epochs >= 0"),
    ({"feedback_init": "bogus"}, "feedback_init must be one of 'pinv', 'regularised', 'random'"),
])  # fmt: skip
@pytest.mark.parametrize("name", ["DTPAI", "OriginalDTP", "LeeDTP"])
def test_bad_feedback_arguments(name, kw, match):
    with pytest.raises(ValueError, match=match):
        make_rule(name, **kw)


@pytest.mark.parametrize("bad", [0, -4])
def test_bad_feedback_batch_size(bad):
    with pytest.raises(ValueError, match=f"feedback_batch_size must be >= 1 .*got {bad}"):
        make_rule("DTPAI", feedback_batch_size=bad)


def test_thesis_form_needs_noise():
    with pytest.raises(ValueError, match="feedback_noise_std must be > 0 for the thesis form"):
        make_rule("DTPAI", feedback_noise_std=0.0)
    make_rule("OriginalDTP", feedback_noise_std=0.0)  # the original form trains on activations
