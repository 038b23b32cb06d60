"""Math tests of ``tplightning.functional``: activations, losses, local updates and the exact-inverse
machinery (robust Sherman-Morrison, Alg. 4.1; its Woodbury generalisation; robust initialisation).

Every expected value is computed independently of the code under test: explicit formulas written
here, ``torch.linalg.inv`` / ``svdvals``, or autograd. All math runs in float64.
"""
from __future__ import annotations

import math

import pytest
import torch

from tplightning import functional as F
from tplightning.losses import D_INVERSE

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g: torch.Generator, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=DT) * std


def eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=DT)


def well_conditioned(n: int, g: torch.Generator) -> torch.Tensor:
    """A Gaussian matrix with condition number < 50, drawn without the code under test."""
    while True:
        W = randn(n, n, g=g)
        s = torch.linalg.svdvals(W)
        if s[0] / s[-1] < 50:
            return W


# ============================================================================================
# Activations
# ============================================================================================

INVERTIBLE = [
    pytest.param(lambda: F.get_activation("leaky_relu", 0.1), id="leaky_relu_0.1"),
    pytest.param(lambda: F.get_activation("leaky_relu", 0.35), id="leaky_relu_0.35"),
    pytest.param(lambda: F.get_activation("tanh"), id="tanh"),
    pytest.param(lambda: F.get_activation("linear"), id="linear"),
]


@pytest.mark.parametrize("make", INVERTIBLE)
def test_activation_inverse_round_trip(make):
    act = make()
    g = gen(0)
    a = randn(200, 6, g=g, std=1.5).clamp(-3, 3)  # tanh(3) = 0.995: atanh stays well inside its clamp
    torch.testing.assert_close(act.inverse(act(a)), a, rtol=0, atol=1e-10)
    h = act(randn(200, 6, g=g, std=1.5).clamp(-3, 3))
    torch.testing.assert_close(act(act.inverse(h)), h, rtol=0, atol=1e-12)
    assert act.invertible


@pytest.mark.parametrize("make", INVERTIBLE + [pytest.param(lambda: F.get_activation("relu"), id="relu")])
def test_activation_derivative_matches_autograd(make):
    act = make()
    a = randn(50, 6, g=gen(1), std=2.0)
    a = torch.where(a.abs() < 1e-3, torch.full_like(a, 0.5), a).requires_grad_(True)  # keep off the kinks
    (grad,) = torch.autograd.grad(act(a).sum(), a)  # element-wise map: d sum / d a_j = s'(a_j)
    torch.testing.assert_close(act.derivative(a.detach()), grad, rtol=1e-12, atol=1e-14)


def test_leaky_relu_values_are_the_thesis_formula():
    a = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0], dtype=DT)
    for slope in (0.1, 0.35):
        act = F.get_activation("leaky_relu", slope)
        expected = torch.tensor([-2.0 * slope, -0.5 * slope, 0.0, 0.5, 3.0], dtype=DT)
        torch.testing.assert_close(act(a), expected, rtol=0, atol=0)
        assert act.negative_slope == slope


def test_relu_has_no_inverse():
    act = F.get_activation("relu")
    assert not act.invertible
    with pytest.raises(ValueError, match="relu has no inverse"):
        act.inverse(torch.ones(3, dtype=DT))


def test_leaky_relu_zero_slope_has_no_inverse():
    act = F.get_activation("leaky_relu", 0.0)
    assert not act.invertible
    with pytest.raises(ValueError, match="negative_slope"):
        act.inverse(torch.ones(3, dtype=DT))


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        F.get_activation("bogus")


# ============================================================================================
# Losses, output error and output target (eqs. 4.4, 4.5)
# ============================================================================================


def explicit_loss(h: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample loss written out: 1/2||h - y||^2, or -log softmax(h)_y = logsumexp(h) - h_y."""
    if loss == "mse":
        return 0.5 * ((h - y) ** 2).sum(-1)
    return torch.logsumexp(h, -1) - h.gather(1, y.long()[:, None])[:, 0]


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("seed", range(5))
def test_output_error_is_autograd_gradient_of_loss(loss, seed):
    g = gen(seed)
    B, n = 7, 5
    h = randn(B, n, g=g, std=2.0).requires_grad_(True)
    y = randn(B, n, g=g) if loss == "mse" else torch.randint(n, (B,), generator=g)
    torch.testing.assert_close(F.per_sample_loss(h, y, loss), explicit_loss(h, y, loss), rtol=1e-12, atol=1e-12)
    # per-sample gradients: the losses of different samples do not interact, so grad of the sum works
    (grad,) = torch.autograd.grad(explicit_loss(h, y, loss).sum(), h)
    torch.testing.assert_close(F.output_error(h.detach(), y, loss), grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_output_target_is_a_gradient_step(loss):
    g = gen(3)
    h = randn(4, 5, g=g)
    y = randn(4, 5, g=g) if loss == "mse" else torch.randint(5, (4,), generator=g)
    hr = h.clone().requires_grad_(True)
    (e,) = torch.autograd.grad(explicit_loss(hr, y, loss).sum(), hr)
    for eta in (0.1, 0.01, 1.3):
        torch.testing.assert_close(F.output_target(h, y, loss, eta), h - eta * e, rtol=1e-12, atol=1e-13)


def test_unknown_loss():
    h = torch.zeros(2, 3, dtype=DT)
    for fn in (F.output_error, F.per_sample_loss):
        with pytest.raises(ValueError, match="unknown loss"):
            fn(h, h, "hinge")


# ============================================================================================
# Local update (eq. 4.12, Alg. A.10) and the modified update with D^{-1} (Alg. A.1, A.6)
# ============================================================================================


@pytest.mark.parametrize("act_name", ["leaky_relu", "tanh", "linear"])
@pytest.mark.parametrize("seed", range(4))
def test_local_update_is_autograd_gradient_of_local_loss(act_name, seed):
    g = gen(10 + seed)
    act = F.get_activation(act_name, 0.35)
    B, n_in, n_out = 5, 4, 6
    W = randn(n_out, n_in, g=g).requires_grad_(True)
    h_prev = randn(B, n_in, g=g)
    h_hat = randn(B, n_out, g=g)
    local_loss = (0.5 * ((act(h_prev @ W.T) - h_hat) ** 2).sum(-1)).mean()
    (grad,) = torch.autograd.grad(local_loss, W)
    with torch.no_grad():
        a = h_prev @ W.T
        got = F.local_update(act.derivative(a), act(a), h_hat, h_prev)
    torch.testing.assert_close(got, grad, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("seed", range(4))
def test_local_update_modified_uses_inverse_derivative(seed):
    g = gen(20 + seed)
    act = F.get_activation("leaky_relu", 0.35)
    B, n_in, n_out = 6, 3, 5
    W, h_prev, h_hat = randn(n_out, n_in, g=g), randn(B, n_in, g=g), randn(B, n_out, g=g)
    a = h_prev @ W.T
    h = act(a)
    slope = torch.where(a >= 0, torch.ones_like(a), torch.full_like(a, 0.35))  # D written out
    expected = torch.zeros(n_out, n_in, dtype=DT)
    for b in range(B):
        expected += torch.outer((h[b] - h_hat[b]) / slope[b], h_prev[b]) / B
    torch.testing.assert_close(F.local_update(act.derivative(a), h, h_hat, h_prev, D_INVERSE), expected, rtol=1e-12, atol=1e-13)
    # and the plain one multiplies by D (different unless every slope is 1)
    expected_plain = sum(torch.outer((h[b] - h_hat[b]) * slope[b], h_prev[b]) for b in range(B)) / B
    torch.testing.assert_close(F.local_update(act.derivative(a), h, h_hat, h_prev), expected_plain, rtol=1e-12, atol=1e-13)


def test_cosine_per_sample():
    g = gen(5)
    a, b = randn(4, 3, 2, g=g), randn(4, 3, 2, g=g)
    c = F.cosine(a, b)
    for k in range(4):
        x, y = a[k].flatten(), b[k].flatten()
        assert math.isclose(float(c[k]), float(x @ y / (x.norm() * y.norm())), rel_tol=1e-12)


# ============================================================================================
# Robust Sherman-Morrison (Alg. 4.1)
# ============================================================================================


def clipped_pair(W: torch.Tensor, g: torch.Generator, one_plus_d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``u, v`` with ``1 + v^T W^{-1} u = one_plus_d``: ``u = c W x`` gives ``d = c v^T x``."""
    n = W.shape[0]
    x, v = randn(n, g=g), randn(n, g=g)
    c = (one_plus_d - 1) / (v @ x)
    return c * (W @ x), v


@pytest.mark.parametrize("seed", range(20))
def test_sherman_morrison_unclipped_branch(seed):
    g = gen(100 + seed)
    n, eps = 6, 0.5
    W = well_conditioned(n, g)
    W_inv = torch.linalg.inv(W)
    u, v = randn(n, g=g, std=0.3), randn(n, g=g, std=0.3)
    d = v @ torch.linalg.solve(W, u)
    if (1 + d).abs() < eps:  # rare for these scales; make the draw unclipped deterministically
        u = -u
        d = -d
    assert (1 + d).abs() >= eps
    W_new, W_inv_new, beta = F.robust_sherman_morrison(W, W_inv, u, v, eps)
    assert beta.dim() == 0 and float(beta) == 1.0
    torch.testing.assert_close(W_new, W + torch.outer(u, v), rtol=0, atol=1e-15)
    torch.testing.assert_close(W_inv_new, torch.linalg.inv(W + torch.outer(u, v)), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("one_plus_d", [0.0, 1e-9, 0.2, -0.2, 0.49, -0.49])
@pytest.mark.parametrize("seed", range(5))
def test_sherman_morrison_clipped_branch(seed, one_plus_d):
    g = gen(200 + seed)
    n, eps = 6, 0.5
    W = well_conditioned(n, g)
    W_inv = torch.linalg.inv(W)
    u, v = clipped_pair(W, g, one_plus_d)
    d = v @ torch.linalg.solve(W, u)
    assert abs(float(1 + d) - one_plus_d) < 1e-10
    W_new, W_inv_new, beta = F.robust_sherman_morrison(W, W_inv, u, v, eps)
    expected_beta = 1 / (eps - d)  # eq. 4.80
    assert math.isclose(float(beta), float(expected_beta), rel_tol=1e-12)
    assert 0 < float(beta) < 1  # "beta is always smaller than one" (section 4.2.3)
    W_expected = W + expected_beta * torch.outer(u, v)
    torch.testing.assert_close(W_new, W_expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W_inv_new, torch.linalg.inv(W_expected), rtol=1e-9, atol=1e-10)
    # the inverse update of Alg. 4.1's else branch, written out
    torch.testing.assert_close(W_inv_new, W_inv - torch.outer(W_inv @ u, v @ W_inv) / eps, rtol=1e-12, atol=1e-12)


def test_sherman_morrison_threshold_boundary_is_not_clipped():
    """Alg. 4.1 clips only for ``|1 + d| < eps``; ``|1 + d| = eps`` takes the plain branch.

    At ``1 + d = -eps`` the two branches differ (beta = 1 vs 1/(1 + 2 eps)); at ``1 + d = +eps`` they coincide.
    """
    W = torch.eye(3, dtype=DT) * 2
    v = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
    u = torch.tensor([-3.0, 0.0, 0.0], dtype=DT)  # d = v^T W^{-1} u = -1.5, 1 + d = -0.5 exactly
    W_new, W_inv_new, beta = F.robust_sherman_morrison(W, torch.linalg.inv(W), u, v, 0.5)
    assert float(beta) == 1.0
    torch.testing.assert_close(W_new, W + torch.outer(u, v), rtol=0, atol=0)
    torch.testing.assert_close(W_inv_new, torch.linalg.inv(W + torch.outer(u, v)), rtol=1e-14, atol=1e-15)
    _, _, beta = F.robust_sherman_morrison(W, torch.linalg.inv(W), u, v, 0.5000001)
    assert math.isclose(float(beta), 1 / (0.5000001 + 1.5), rel_tol=1e-12)


def test_sherman_morrison_chained_updates_stay_exact():
    """10^4 chained updates with the thesis' threshold keep ``W W^{-1} = I`` to round-off (cf. fig. 5.8)."""
    g = gen(7)
    n, eps = 6, 0.5
    W0 = well_conditioned(n, g)
    W, W_inv = W0, torch.linalg.inv(W0)
    U = randn(10_000, n, g=g, std=0.05)
    V = randn(10_000, n, g=g, std=0.5)
    for k in range(10_000):
        W, W_inv, _ = F.robust_sherman_morrison(W, W_inv, U[k], V[k], eps)
    assert (W @ W_inv - eye(n)).abs().max() < 1e-8
    assert (W_inv @ W - eye(n)).abs().max() < 1e-8
    assert (W - W0).abs().max() > 0.1  # W did move far from where it started


@pytest.mark.parametrize(
    "u_shape, v_shape", [((6, 1), (6,)), ((6,), (1, 6)), ((), (6,)), ((6,), ())]
)
def test_sherman_morrison_bad_shapes(u_shape, v_shape):
    W = torch.eye(6, dtype=DT)
    with pytest.raises(ValueError, match="must be vectors"):
        F.robust_sherman_morrison(W, W, torch.ones(u_shape, dtype=DT), torch.ones(v_shape, dtype=DT), 0.5)


# ============================================================================================
# Robust Woodbury (mini-batch generalisation)
# ============================================================================================


@pytest.mark.parametrize("B", [2, 4, 8])
@pytest.mark.parametrize("seed", range(6))
def test_woodbury_unclipped_branch(B, seed):
    g = gen(300 + seed)
    n, eps = 8, 0.5
    W = well_conditioned(n, g)
    U, V = randn(n, B, g=g, std=0.03), randn(n, B, g=g, std=0.3)
    K = V.T @ torch.linalg.solve(W, U)
    assert torch.linalg.svdvals(eye(B) + K)[-1] >= eps  # small updates: no clipping
    W_new, W_inv_new, beta, s_min = F.robust_woodbury(W, torch.linalg.inv(W), U, V, eps)
    assert float(beta) == 1.0
    assert math.isclose(float(s_min), float(torch.linalg.svdvals(eye(B) + K)[-1]), rel_tol=1e-10)
    torch.testing.assert_close(W_new, W + U @ V.T, rtol=0, atol=1e-14)
    torch.testing.assert_close(W_inv_new, torch.linalg.inv(W + U @ V.T), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("B", [2, 4, 8])
@pytest.mark.parametrize("delta", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("seed", range(4))
def test_woodbury_clipped_branch(B, delta, seed):
    """Force ``sigma_min(I + K) < eps``: ``U = -(1-delta) W V (V^T V)^{-1} + noise`` gives ``K ~ -(1-delta) I``."""
    g = gen(400 + 10 * seed + B)
    n, eps = 8, 0.5
    W = well_conditioned(n, g)
    V = randn(n, B, g=g)
    U = -(1 - delta) * W @ V @ torch.linalg.inv(V.T @ V) + randn(n, B, g=g, std=0.01)
    K = V.T @ torch.linalg.inv(W) @ U
    s_min_C = torch.linalg.svdvals(eye(B) + K)[-1]
    assert s_min_C < eps
    W_new, W_inv_new, beta, s_min = F.robust_woodbury(W, torch.linalg.inv(W), U, V, eps)
    beta_f = float(beta)
    assert math.isclose(float(s_min), float(s_min_C), rel_tol=1e-8, abs_tol=1e-12)
    assert 0 < beta_f <= 1
    # beta = 1/(eps - lambda_min(sym K)), lambda_min via the Rayleigh quotient's minimiser
    lam_min = torch.linalg.eigvalsh(0.5 * (K + K.T)).min()
    assert math.isclose(beta_f, float(1 / (eps - lam_min)), rel_tol=1e-10)
    # the clipped capacitance is robust: sigma_min(I/beta + K) >= eps, so the gain is <= 1/eps
    assert torch.linalg.svdvals(eye(B) / beta_f + K)[-1] >= eps - 1e-10
    W_expected = W + beta_f * U @ V.T
    torch.testing.assert_close(W_new, W_expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W_inv_new, torch.linalg.inv(W_expected), rtol=1e-9, atol=1e-10)
    assert (W_new @ W_inv_new - eye(n)).abs().max() < 1e-10


@pytest.mark.parametrize("one_plus_d", [None, 0.0, 0.3, -0.3])
@pytest.mark.parametrize("seed", range(5))
def test_woodbury_with_one_column_is_sherman_morrison(seed, one_plus_d):
    g = gen(500 + seed)
    n, eps = 6, 0.5
    W = well_conditioned(n, g)
    W_inv = torch.linalg.inv(W)
    if one_plus_d is None:
        u, v = randn(n, g=g, std=0.2), randn(n, g=g, std=0.2)
    else:
        u, v = clipped_pair(W, g, one_plus_d)
    sm = F.robust_sherman_morrison(W, W_inv, u, v, eps)
    wb = F.robust_woodbury(W, W_inv, u[:, None], v[:, None], eps)
    assert (float(sm[2]) == 1.0) == (one_plus_d is None)
    torch.testing.assert_close(wb[0], sm[0], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(wb[1], sm[1], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(wb[2], sm[2], rtol=1e-13, atol=0)
    assert math.isclose(float(wb[3]), abs(float(1 + v @ W_inv @ u)), rel_tol=1e-10, abs_tol=1e-13)


@pytest.mark.parametrize("U_shape, V_shape", [((6,), (6, 2)), ((6, 2), (6, 3)), ((6, 2), (6,))])
def test_woodbury_bad_shapes(U_shape, V_shape):
    W = torch.eye(6, dtype=DT)
    with pytest.raises(ValueError, match=r"\(n, B\)"):
        F.robust_woodbury(W, W, torch.ones(U_shape, dtype=DT), torch.ones(V_shape, dtype=DT), 0.5)


# ============================================================================================
# Fig. 5.5b: the robust update keeps the updated matrix away from singularity
# ============================================================================================


def test_robust_update_bounds_sigma_min_fig_5_5():
    """Fig. 5.5: W robust-invertible Gaussian (sigma_min*sigma_max > 0.4), u, v Gaussian, eps = 0.1.

    The plain update ``W + u v^T`` produces near-singular matrices; the robust one cannot:
    its new inverse is ``W^{-1} - W^{-1} u v^T W^{-1} / c`` with ``|c| >= eps``, so
    ``sigma_min(W_new) = 1/||W_new^{-1}||_2 >= 1 / (||W^{-1}||_2 + ||W^{-1} u|| ||W^{-T} v|| / eps)``
    -- a bound that does not depend on how close ``1 + d`` comes to 0. We check that bound in every
    trial, and the contrast with the plain update in the very same trials.
    """
    n, eps, N = 6, 0.1, 4000
    g = gen(55)
    Ws = torch.stack([F.robust_invertible_gaussian(n, 0.4, generator=g, dtype=DT) for _ in range(N)])
    u, v = randn(N, n, g=g), randn(N, n, g=g)
    W_invs = torch.linalg.inv(Ws)
    W_new, W_inv_new, beta = torch.func.vmap(F.robust_sherman_morrison, in_dims=(0, 0, 0, 0, None))(Ws, W_invs, u, v, eps)

    outer = u[:, :, None] * v[:, None, :]
    s_plain = torch.linalg.svdvals(Ws + outer)[:, -1]
    s_robust = torch.linalg.svdvals(W_new)[:, -1]
    one_plus_d = 1 + torch.einsum("bi,bij,bj->b", v, W_invs, u)
    Wu = torch.einsum("bij,bj->bi", W_invs, u)
    vW = torch.einsum("bi,bij->bj", v, W_invs)
    bound = 1 / (torch.linalg.matrix_norm(W_invs, 2) + Wu.norm(dim=1) * vW.norm(dim=1) / eps)

    # the robust result is exactly W + beta u v^T and stays exactly inverted
    torch.testing.assert_close(W_new, Ws + beta[:, None, None] * outer, rtol=1e-12, atol=1e-12)
    assert (W_new @ W_inv_new - eye(n)).abs().max() < 1e-9
    clipped = one_plus_d.abs() < eps
    assert torch.equal(beta < 1, clipped)
    assert 20 < int(clipped.sum()) < N // 2
    # the bound holds in every trial
    assert bool((s_robust >= bound * (1 - 1e-9)).all())
    # the plain update hits near-singular matrices, always where |1 + d| is small (fig. 5.5a), i.e.
    # exactly where the robust update clips ...
    near_singular = s_plain < 1e-3
    assert int(near_singular.sum()) >= 3
    assert bool(clipped[near_singular].all())
    # ... while the robust update never does, and in those trials it is far away from singular
    assert float(s_robust.min()) > 1e-3
    assert bool((s_robust[near_singular] > s_plain[near_singular]).all())
    assert float((s_robust[near_singular] / s_plain[near_singular]).median()) > 10
    assert float(s_robust.min()) > 10 * float(s_plain.min())
    # and where it did not clip, the robust update is the plain one
    torch.testing.assert_close(s_robust[~clipped], s_plain[~clipped], rtol=1e-9, atol=1e-12)


# ============================================================================================
# Robust initialisation (section 4.2.3, method 1)
# ============================================================================================


@pytest.mark.parametrize("n, tau, std", [(6, 0.4, 1.0), (6, 0.4, 6**-0.5), (4, 2.0, 1.0), (10, 0.4, 1.0)])
def test_robust_invertible_gaussian_satisfies_condition(n, tau, std):
    g = gen(9)
    for _ in range(10):
        W = F.robust_invertible_gaussian(n, tau, std, generator=g, dtype=DT)
        assert W.shape == (n, n) and W.dtype == DT
        ev = torch.linalg.eigvalsh(W.T @ W)  # squared singular values, computed another way
        assert float(ev.min().sqrt() * ev.max().sqrt()) > tau
        assert F.is_robustly_invertible(W, tau)


def test_robust_invertible_gaussian_is_reproducible():
    a = F.robust_invertible_gaussian(6, 0.4, generator=gen(3), dtype=DT)
    b = F.robust_invertible_gaussian(6, 0.4, generator=gen(3), dtype=DT)
    assert torch.equal(a, b)


def test_robust_invertible_gaussian_impossible_tau():
    with pytest.raises(ValueError, match="tau_init"):
        F.robust_invertible_gaussian(6, tau=1e6, max_attempts=20, generator=gen(0))


def test_is_robustly_invertible():
    assert F.is_robustly_invertible(torch.eye(3, dtype=DT), 0.99)
    assert not F.is_robustly_invertible(torch.eye(3, dtype=DT), 1.0)  # strict: sigma_min*sigma_max = 1
    assert not F.is_robustly_invertible(torch.diag(torch.tensor([10.0, 1.0, 0.01], dtype=DT)), 0.4)  # 0.1
    assert F.is_robustly_invertible(torch.diag(torch.tensor([100.0, 1.0, 0.01], dtype=DT)), 0.4)  # 1.0
    assert not F.is_robustly_invertible(torch.ones(3, 4, dtype=DT), 0.0)  # not square
