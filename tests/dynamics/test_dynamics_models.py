"""Chapter-6 models against independent computations: dense autograd Jacobians, literal thesis formulas."""
from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian as autograd_jacobian

from tplightning.dynamics import ConvergenceError, MixtureNetwork, MultiplexingNetwork, TwoPhaseNetwork, nudged_target, short_circuit

DT = torch.float64
ETA = 0.1


def orthogonal(n, scale, g):
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0] * scale


def setup(L=4, n=5, B=6, seed=0, scale=1.2):
    g = torch.Generator().manual_seed(seed)
    Ws = [orthogonal(n, scale, g) for _ in range(L)]
    x = torch.randn(B, n, generator=g, dtype=DT)
    y = torch.randn(B, n, generator=g, dtype=DT)
    return Ws, x, y, g


# -------------------------------------------------------------------- dense, per-sample reference math
def forward(Ws, acts, x):
    hs, h = [], x
    for W, s in zip(Ws, acts):
        h = s(h @ W.T)
        hs.append(h)
    return hs


def dense_jac(fn, v):
    """Per-sample Jacobian of a row-wise map by autograd, ``(B, m, n)``."""
    return torch.stack([autograd_jacobian(lambda u: fn(u.unsqueeze(0))[0], row) for row in v])


def chain(mats, v):
    """``[M_1 M_2 ... M_k] v`` per sample (``mats`` in left-to-right order)."""
    for M in reversed(mats):
        v = (M @ v.unsqueeze(-1)).squeeze(-1)
    return v


# -------------------------------------------------------------------- mu -> 0
@pytest.mark.parametrize("act", ["leaky_relu", "tanh"])
def test_equilibrium_tends_to_forward_pass_as_mu_vanishes(act):
    Ws, x, y, _ = setup()
    for mu in (1e-4, 1e-6):
        m = MixtureNetwork(Ws, act, mu)
        hs = m.equilibrium(x, y)  # a fixed clamp far from the output
        fwd = forward(Ws, m.activations, x)
        gap = max(float((a - b).abs().max()) for a, b in zip(hs, fwd))
        assert gap < 50 * mu, (mu, gap)


@pytest.mark.parametrize("act", ["leaky_relu", "tanh"])
def test_exact_inverse_signal_matches_eq_6_15(act):
    """``h_i^* - f_i(h_{i-1}^*) ~ -eta^ (mu/(1-mu))^{L+1-i} [prod J_{f_{k+1}}^{-1}] e_L`` (eqs. 6.12, 6.15)."""
    Ws, x, y, _ = setup(L=3)  # the layer-1 signal is r^3 eta^ |e_L|: keep it well above rounding
    L = len(Ws)
    errors = {}
    for mu in (1e-2, 1e-3):
        m = MixtureNetwork(Ws, act, mu)
        hs = m.equilibrium(x, nudged_target(y, "mse", ETA), tol=1e-14)
        signal = [h - s(p @ W.T) for h, p, W, s in zip(hs, [x, *hs[:-1]], Ws, m.activations)]
        fwd = forward(Ws, m.activations, x)
        e_L = fwd[-1] - y
        Jf = [dense_jac(lambda u, W=W, s=s: s(u @ W.T), h) for W, s, h in zip(Ws[1:], m.activations[1:], fwd[:-1])]
        r = mu / (1 - mu)
        rel = []
        for i in range(1, L + 1):
            pred = -ETA * r ** (L + 1 - i) * chain([torch.linalg.inv(J) for J in Jf[i - 1 :]], e_L)
            rel.append(float((signal[i - 1] - pred).norm() / pred.norm()))
        errors[mu] = max(rel)
    assert errors[1e-2] < 0.05 and errors[1e-3] < 0.005
    assert errors[1e-3] < errors[1e-2] / 5  # first order: the error shrinks with mu


def test_identity_of_eq_6_13_at_the_equilibrium():
    """``g_{i+1}(h_{i+2}^*) - f_{i+1}(h_i^*) = (h_{i+1}^* - f_{i+1}(h_i^*)) / mu`` holds exactly (eq. 6.13)."""
    Ws, x, y, g = setup()
    Qs = [torch.linalg.inv(W) + 0.05 * torch.randn(W.shape, generator=g, dtype=DT) for W in Ws[1:]]
    mu = 0.2
    m = MixtureNetwork(Ws, "tanh", mu, feedback=Qs)
    hs = m.equilibrium(x, nudged_target(y, "mse", ETA))
    tgt = hs[-1] - ETA * (hs[-1] - y)
    tops = [torch.atanh(h) @ Q.T for h, Q in zip(hs[1:-1], Qs[:-1])] + [hs[-1] @ Qs[-1].T]  # g_i(h_{i+1}^*), i < L
    tops.append(tgt)
    prev = [x, *hs[:-1]]
    for i in range(len(Ws)):
        f = prev[i] @ Ws[i].T
        f = torch.tanh(f) if i < len(Ws) - 1 else f
        torch.testing.assert_close(tops[i] - f, (hs[i] - f) / mu, atol=1e-8, rtol=1e-7)


def literal_6_22(Ws, Qs, acts, x, y, mu, eta):
    """Eq. 6.22/6.33 with dense Jacobians: reconstruction sum (product k=i..j-1) plus the target term."""
    L = len(Ws)
    fwd = forward(Ws, acts, x)
    e_L = fwd[-1] - y

    def g(i, h):  # g_i = Q_i s_{i+1}^{-1}
        return acts[i].inverse(h) @ Qs[i - 1].T

    Jg = [dense_jac(lambda u, i=i: g(i, u), fwd[i]) for i in range(1, L)]  # J_{g_k} at h_{k+1}
    rho = [g(j, fwd[j]) - fwd[j - 1] for j in range(1, L)]
    r = mu / (1 - mu)
    out = []
    for i in range(1, L + 1):
        total = torch.zeros_like(fwd[i - 1])
        for j in range(i, L):
            total = total + r ** (j + 1 - i) * chain(Jg[i - 1 : j - 1], rho[j - 1])
        if eta:
            total = total - eta * r ** (L + 1 - i) * chain(Jg[i - 1 :], e_L)
        out.append(total)
    return out


@pytest.mark.parametrize("act", ["leaky_relu", "tanh"])
def test_learned_inverse_signal_matches_eq_6_22(act):
    Ws, x, y, g = setup(L=3)
    Qs = [torch.linalg.inv(W) + 0.1 * torch.randn(W.shape, generator=g, dtype=DT) for W in Ws[1:]]
    errors = {}
    for mu in (1e-2, 1e-3):
        m = MixtureNetwork(Ws, act, mu, feedback=Qs)
        hs = m.equilibrium(x, nudged_target(y, "mse", ETA), tol=1e-14)
        sim = m.learning_signals(x, hs)
        pred = literal_6_22(Ws, Qs, m.activations, x, y, mu, ETA)
        errors[mu] = max(float((a - b).norm() / b.norm()) for a, b in zip(sim, pred))
    assert errors[1e-3] < 0.01 and errors[1e-3] < errors[1e-2] / 5, errors


def test_two_phase_matches_eqs_6_31_6_33_and_cancels_reconstruction_errors():
    Ws, x, y, g = setup()
    Qs = [torch.linalg.inv(W) + 0.1 * torch.randn(W.shape, generator=g, dtype=DT) for W in Ws[1:]]
    mu = 1e-2
    m = TwoPhaseNetwork(Ws, "tanh", mu, feedback=Qs)
    free, learn = m.equilibrium(x, nudged_target(y, "mse", ETA))
    torch.testing.assert_close(free[-1], free[-2] @ Ws[-1].T)  # eq. 6.29: h_L^{f*} = f_L(h_{L-1}^{f*}), linear output
    pf = literal_6_22(Ws, Qs, m.activations, x, y, mu, 0.0)
    pl_ = literal_6_22(Ws, Qs, m.activations, x, y, mu, ETA)
    for sim, pred in ((m.learning_signals(x, free), pf), (m.learning_signals(x, learn), pl_)):
        for a, b in zip(sim[:-1], pred[:-1]):
            assert float((a - b).norm() / b.norm()) < 0.03
    # eq. 6.36: h^f - h^l is the clean signal up to e^phase, much smaller than the reconstruction errors
    clean = [b - a for a, b in zip(pf, pl_)]  # -(signal term)
    for i in range(len(Ws) - 1):
        diff = free[i] - learn[i]
        e_phase = diff + clean[i]
        assert float(e_phase.norm()) < 0.05 * float(clean[i].norm())
        assert float(pf[i].norm()) > 3 * float(clean[i].norm())  # the single-phase signal is swamped


def test_multiplexing_matches_eqs_6_53_6_57():
    g = torch.Generator().manual_seed(3)
    L, n = 4, 5
    Ws = [orthogonal(n, 0.5, g) for _ in range(L)]
    x = torch.randn(6, n, generator=g, dtype=DT)
    y = torch.randn(6, n, generator=g, dtype=DT)
    errs = []
    for eps in (0.02, 0.002):
        Qs = [torch.linalg.inv(W) + eps * torch.randn(W.shape, generator=g, dtype=DT) for W in Ws[1:]]
        m = MultiplexingNetwork(Ws, Qs, "tanh", feedback_activation="tanh")
        eta = 5 * eps
        hs, free, learn = m.phases(x, nudged_target(y, "mse", eta))
        fwd = forward(Ws, m.activations, x)
        torch.testing.assert_close(hs, fwd)  # event rates: the feed-forward pass (eq. 6.49)
        gmap = [lambda u, i=i: torch.tanh(u @ Qs[i - 1].T) for i in range(1, L)]
        Jg = [dense_jac(gmap[i - 1], fwd[i]) for i in range(1, L)]
        rho = [gmap[j - 1](fwd[j]) - fwd[j - 1] for j in range(1, L)]
        e_L = fwd[-1] - y
        worst = 0.0
        for i in range(1, L):
            rec = sum(chain(Jg[i - 1 : j - 1], rho[j - 1]) for j in range(i, L))
            sig = -eta * chain(Jg[i - 1 :], e_L)
            for sim, pred in ((free[i - 1] - fwd[i - 1], rec), (learn[i - 1] - fwd[i - 1], rec + sig)):
                worst = max(worst, float((sim - pred).norm() / pred.norm()))
            # eq. 6.59: the reconstruction errors cancel in h^f - h^l
            worst = max(worst, float(((free[i - 1] - learn[i - 1]) + sig).norm() / sig.norm()))
        errs.append(worst)
    assert errs[1] < 0.05 and errs[1] < errs[0] / 5, errs  # the error falls with eps: first order


# -------------------------------------------------------------------- weight dynamics at the simulated equilibria
def test_weight_updates_equal_eqs_6_17_6_26_6_35():
    Ws, x, y, g = setup(L=3, n=4, B=5)
    Qs = [torch.linalg.inv(W) + 0.1 * torch.randn(W.shape, generator=g, dtype=DT) for W in Ws[1:]]
    m = TwoPhaseNetwork(Ws, "tanh", 0.2, feedback=Qs)
    free, learn = m.equilibrium(x, nudged_target(y, "mse", ETA))
    B = x.shape[0]
    got = m.forward_update(x, free, learn)
    prev = [x, *learn[:-1]]
    for i, W in enumerate(Ws):
        a = prev[i] @ W.T
        d = 1 - torch.tanh(a) ** 2 if i < len(Ws) - 1 else torch.ones_like(a)
        want = torch.einsum("bj,bk->jk", d * (free[i] - learn[i]), prev[i]) / B  # eq. 6.35 (layer i)
        torch.testing.assert_close(got[i], want)
    single = MixtureNetwork(Ws, "tanh", 0.2, feedback=Qs)
    hs = single.equilibrium(x, nudged_target(y, "mse", ETA))
    prev = [x, *hs[:-1]]
    for i, (G, W) in enumerate(zip(single.forward_update(x, hs), Ws)):
        a = prev[i] @ W.T
        f = torch.tanh(a) if i < len(Ws) - 1 else a
        d = 1 - torch.tanh(a) ** 2 if i < len(Ws) - 1 else torch.ones_like(a)
        torch.testing.assert_close(G, torch.einsum("bj,bk->jk", d * (f - hs[i]), prev[i]) / B)  # eq. 6.17
    lam = 0.3
    for i, (G, Q) in enumerate(zip(single.feedback_update(hs, lam), Qs), start=1):
        t = torch.atanh(hs[i]) if i < len(Ws) - 1 else hs[i]
        err = t @ Q.T - hs[i - 1]
        torch.testing.assert_close(G, torch.einsum("bj,bk->jk", err, t) / B + lam * Q)  # eq. 6.26


def test_weight_update_equals_eq_6_58():
    Ws, x, y, g = setup(L=3, n=4, B=5)
    Qs = [0.5 * torch.randn(4, 4, generator=g, dtype=DT) for _ in Ws[1:]]
    m = MultiplexingNetwork(Ws, Qs, "leaky_relu")
    hs, free, learn = m.phases(x, nudged_target(y, "mse", ETA))
    prev = [x, *hs[:-1]]
    for i, (G, W) in enumerate(zip(m.forward_update(x, hs, free, learn), Ws)):
        a = prev[i] @ W.T
        d = torch.where(a >= 0, 1.0, 0.35).to(DT) if i < len(Ws) - 1 else torch.ones_like(a)
        torch.testing.assert_close(G, torch.einsum("bj,bk->jk", d * (free[i] - learn[i]), prev[i]) / x.shape[0])
    torch.testing.assert_close(learn[-1], hs[-1] - ETA * (hs[-1] - y))  # eq. 6.54
    torch.testing.assert_close(free[-1], hs[-1])  # the free phase's short circuit
    # our feedback rule: the gradient of 1/2 mean_b ||t_i(Q_i h^_{i+1}^f) - h_i||^2 w.r.t. Q_i, h^f fixed
    for i, G in enumerate(m.feedback_update(hs, free), start=1):
        Q = Qs[i - 1].clone().requires_grad_(True)
        c = free[i] @ Q.T
        loss = 0.5 * ((torch.where(c >= 0, c, 0.35 * c) - hs[i - 1]) ** 2).sum(-1).mean()
        torch.testing.assert_close(G, torch.autograd.grad(loss, Q)[0])


# -------------------------------------------------------------------- trajectories converge to equilibrium()
def test_mixture_trajectory_converges_to_equilibrium():
    Ws, x, y, g = setup(L=3)
    Qs = [torch.linalg.inv(W) + 0.1 * torch.randn(W.shape, generator=g, dtype=DT) for W in Ws[1:]]
    for fb in (None, Qs):
        m = MixtureNetwork(Ws, "leaky_relu", 0.3, feedback=fb, tau=2.0)
        target = nudged_target(y, "mse", 0.5)
        eq = m.equilibrium(x, target)
        t = torch.tensor([0.0, 5.0, 400.0], dtype=DT)
        traj = m.trajectory(x, target, t, h0=[torch.zeros_like(h) for h in eq])
        for h_t, h_eq in zip(traj, eq):
            assert float((h_t[-1] - h_eq).abs().max()) < 1e-6
            assert float((h_t[1] - h_eq).abs().max()) > 1e-3  # it really moved there


def test_two_phase_and_multiplexing_trajectories_converge():
    Ws, x, y, g = setup(L=3)
    Qs = [torch.linalg.inv(W) + 0.1 * torch.randn(W.shape, generator=g, dtype=DT) for W in Ws[1:]]
    t = torch.tensor([0.0, 80.0], dtype=DT)
    target = nudged_target(y, "mse", ETA)
    m = TwoPhaseNetwork(Ws, "tanh", 0.2, feedback=Qs)
    (free, learn), (tf, tl) = m.equilibrium(x, target), m.trajectory(x, target, t)
    for a, b in zip([*free, *learn], [*tf, *tl]):
        assert float((a - b[-1]).abs().max()) < 1e-6
    mp = MultiplexingNetwork(Ws, Qs, "tanh")
    hs, hhat = mp.equilibrium(x, target)
    th, thhat = mp.trajectory(x, target, t)
    for a, b in zip([*hs, *hhat], [*th, *thhat]):
        assert float((a - b[-1]).abs().max()) < 1e-6


# -------------------------------------------------------------------- bad input
def test_errors_are_named():
    Ws, x, y, _ = setup(L=3, n=4)
    with pytest.raises(ValueError, match=r"mu must lie in \(0, 1\).*got 1.5"):
        MixtureNetwork(Ws, "tanh", 1.5)
    with pytest.raises(ValueError, match=r"mu must lie in \(0, 1\).*got 0"):
        MixtureNetwork(Ws, "tanh", 0)
    with pytest.raises(ValueError, match=r"exact inverses \(eq. 6.4\) need square W_2, got shape \(3, 4\)"):
        MixtureNetwork([Ws[0], torch.randn(3, 4, dtype=DT)], "tanh", 0.1)
    with pytest.raises(ValueError, match="layer 2's activation ReLU.. is not invertible"):
        MixtureNetwork(Ws, "relu", 0.1)
    with pytest.raises(ValueError, match=r"Q_1 must have shape \(4, 4\), got \(4, 3\)"):
        MixtureNetwork(Ws, "tanh", 0.1, feedback=[torch.zeros(4, 3), torch.zeros(4, 4)])
    with pytest.raises(ValueError, match=r"W_2 has 5 columns but W_1 has 4 rows"):
        MixtureNetwork([Ws[0], torch.randn(4, 5)], "tanh", 0.1)
    m = MixtureNetwork(Ws, "tanh", 0.1)
    with pytest.raises(ValueError, match=r"x must be a \(batch, 4\) tensor, got shape \(6, 3\)"):
        m.equilibrium(x[:, :3], y)
    with pytest.raises(ValueError, match=r"h_target must have the output's shape \(6, 4\), got \(6, 2\)"):
        m.equilibrium(x, y[:, :2])
    with pytest.raises(ValueError, match="method must be 'newton' or 'fixed_point', got 'euler'"):
        m.equilibrium(x, y, method="euler")
    with pytest.raises(ValueError, match=r"feedback must list L-1 = 2 matrices"):
        MultiplexingNetwork(Ws, [torch.zeros(4, 4)])


def test_non_convergence_raises():
    Ws, x, y, _ = setup(L=3, n=4)
    m = MixtureNetwork(Ws, "leaky_relu", 0.3)
    with pytest.raises(ConvergenceError, match=r"equilibrium not found: residual .* after 1 newton iterations \(mu=0.3"):
        m.equilibrium(x, y, max_iter=1, tol=1e-14, ode_fallback=0)
    # feedback 5x the inverse: eq. 6.40's spectrum leaves the left half-plane and the iteration diverges
    big = MixtureNetwork(Ws, "leaky_relu", 0.5, feedback=[5 * torch.linalg.inv(W) for W in Ws[1:]])
    with pytest.raises(ConvergenceError, match="fixed_point iterations"):
        big.equilibrium(x, y, method="fixed_point", damping=1.0, max_iter=200)
    # Newton fails there too (one iteration allowed), and so does the ODE it falls back on: the point is unstable
    with pytest.raises(ConvergenceError, match=r"restarted after integrating eq. 6.1 over t = 100 tau|integrating eq. 6.1 failed"):
        big.equilibrium(x, y, max_iter=1, tol=1e-14)


def test_short_circuit_free_phase_keeps_the_forward_pass_with_exact_inverses():
    """Thesis 6.4: with h_L^trgt = h_L (no target) every layer equals its forward prediction."""
    Ws, x, _, _ = setup()
    m = MixtureNetwork(Ws, "tanh", 0.3)
    for a, b in zip(m.equilibrium(x, short_circuit), forward(Ws, m.activations, x)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
