"""The shared float64 linear algebra and weight product of :mod:`tplightning.functional`, checked against numpy, and the
callers that now use them (target maps, diagnostics, dynamics/) checked against the same independent computations."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import tplightning as tp
from tplightning import functional as F
from tplightning.dynamics import DynamicalTP, MixtureNetwork, MultiplexingDTP, TwoPhaseDTP


def rand(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def ill_conditioned(n: int, cond: float, seed: int) -> np.ndarray:
    """A float32-representable ``(n, n)`` matrix with singular values from 1 down to ``1/cond``."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (U @ np.diag(np.geomspace(1, 1 / cond, n)) @ V.T).astype(np.float32)


# ------------------------------------------------------------------------------------ inverse64


def test_inverse64_literal():
    W = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert F.inverse64(W).tolist() == [[0.5, 0.0], [-0.5, 1.0]]


def test_inverse64_is_the_float64_inverse_rounded_to_the_input_dtype():
    W = ill_conditioned(6, 1e6, seed=0)
    expected = np.linalg.inv(W.astype(np.float64))
    out = F.inverse64(torch.from_numpy(W))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected.astype(np.float32), rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    # a float32 inverse of the same matrix is far off: the float64 step is what the test sees
    plain = torch.linalg.inv(torch.from_numpy(W)).numpy()
    assert np.abs(plain - expected).max() > 1e-3 * np.abs(expected).max()


def test_inverse64_keeps_float64_when_asked_and_detaches():
    W = torch.from_numpy(ill_conditioned(4, 10.0, seed=1)).requires_grad_(True)
    out = F.inverse64(W, torch.float64)
    assert out.dtype == torch.float64 and not out.requires_grad
    np.testing.assert_allclose(out.numpy(), np.linalg.inv(W.detach().numpy().astype(np.float64)), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ pinv64


def test_pinv64_literal():
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert F.pinv64(W).tolist() == [[1.0, 0.0], [0.0, 0.5], [0.0, 0.0]]


@pytest.mark.parametrize("shape", [(3, 5), (5, 3)])
def test_pinv64_is_numpys_pseudo_inverse(shape):
    W = rand(shape, seed=2)
    out = F.pinv64(torch.from_numpy(W).float(), torch.float64)
    assert out.dtype == torch.float64 and out.shape == shape[::-1]
    np.testing.assert_allclose(out.numpy(), np.linalg.pinv(W.astype(np.float32).astype(np.float64)), rtol=1e-10, atol=1e-12)
    assert F.pinv64(torch.from_numpy(W).float()).dtype == torch.float32


def test_regularised_inverse_at_zero_is_the_pseudo_inverse_and_above_zero_is_theorem_4_7():
    W = rand((3, 5), seed=3)
    Wt = torch.from_numpy(W)
    np.testing.assert_allclose(F.regularised_inverse(Wt, 0.0).numpy(), np.linalg.pinv(W), rtol=1e-10, atol=1e-12)
    gamma = 0.3
    expected = W.T @ np.linalg.inv(W @ W.T + gamma * np.eye(3))
    np.testing.assert_allclose(F.regularised_inverse(Wt, gamma).numpy(), expected, rtol=1e-10)


# ------------------------------------------------------------------------------------ singular_values64


def test_singular_values64_literal_and_float64():
    s = F.singular_values64(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert s.dtype == torch.float64 and s.tolist() == [5.0, 0.0]


def test_singular_values64_is_numpys_svd():
    W = rand((4, 6), seed=4).astype(np.float32)
    expected = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(F.singular_values64(torch.from_numpy(W)).numpy(), expected, rtol=1e-12)


def test_is_robustly_invertible_reads_sigma_min_times_sigma_max():
    W = torch.tensor([[2.0, 0.0], [0.0, 0.25]])  # sigma_max sigma_min = 0.5
    assert F.is_robustly_invertible(W, 0.4) and not F.is_robustly_invertible(W, 0.6)


# ------------------------------------------------------------------------------------ weight_product


def test_weight_product_literal_order():
    W1, W2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])
    assert F.weight_product([W1, W2]).tolist() == [[3.0, 6.0], [4.0, 8.0]]  # W2 W1, not W1 W2 (which is [[11.]])


def test_weight_product_is_numpys_chain():
    Ws = [rand((5, 4), 5), rand((3, 5), 6), rand((2, 3), 7)]
    out = F.weight_product([torch.from_numpy(W) for W in Ws])
    np.testing.assert_allclose(out.numpy(), Ws[2] @ Ws[1] @ Ws[0], rtol=1e-12)


def test_weight_product_needs_a_matrix():
    with pytest.raises(ValueError, match="at least one matrix"):
        F.weight_product([])


# ------------------------------------------------------------------------------------ the callers


def test_exact_inverse_map_holds_numpys_inverse():
    torch.manual_seed(0)
    rule = tp.TPEI(sizes=[4, 4, 4])
    m = rule.maps[0]
    W = m.upper.weight.detach().numpy().astype(np.float64)
    np.testing.assert_allclose(m.W_inv.numpy(), np.linalg.inv(W).astype(np.float32), rtol=1e-5, atol=1e-6)


def test_direct_linear_pinv_init_is_the_pseudo_inverse_of_the_product_above():
    torch.manual_seed(0)
    rule = tp.DDTPLinear(sizes=[5, 4, 3, 2])
    Ws = [W.detach().numpy().astype(np.float64) for W in rule.net.weights]
    for i, expected in [(1, np.linalg.pinv(Ws[2] @ Ws[1])), (2, np.linalg.pinv(Ws[2]))]:
        np.testing.assert_allclose(rule.maps[i - 1].base.Q.detach().numpy(), expected.astype(np.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [DynamicalTP, TwoPhaseDTP, MultiplexingDTP])
def test_dynamics_feedback_starts_at_numpys_pseudo_inverse(cls):
    torch.manual_seed(0)
    kw = {"inverses": "learned"} if cls is DynamicalTP else {}
    rule = cls(sizes=[5, 4, 3], **kw)
    W2 = rule.net.weights[1].detach().numpy().astype(np.float64)
    np.testing.assert_allclose(rule.feedback[0].detach().numpy(), np.linalg.pinv(W2).astype(np.float32), rtol=1e-5, atol=1e-6)


def test_mixture_exact_feedback_is_numpys_inverse_and_learned_update_is_the_inverse_loss_gradient():
    rng = np.random.default_rng(8)
    Ws = [rng.standard_normal((3, 3)) for _ in range(2)]
    net = MixtureNetwork([torch.from_numpy(W) for W in Ws], "leaky_relu", mu=0.2)
    np.testing.assert_allclose(net.feedback[0].numpy(), np.linalg.inv(Ws[1]), rtol=1e-12)
    Q = rng.standard_normal((3, 3))
    learned = MixtureNetwork([torch.from_numpy(W) for W in Ws], "leaky_relu", mu=0.2, feedback=[torch.from_numpy(Q)],
                             output_activation="leaky_relu")  # t_1 = s_2^{-1} must not be the identity
    h1, h2 = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    lam, slope = 0.1, 0.35
    t = np.where(h2 >= 0, h2, h2 / slope)  # s^{-1} of leaky-ReLU
    expected = (t @ Q.T - h1).T @ t / 4 + lam * Q  # mean_b (Q t_b - h_b) t_b^T + lambda Q (eq. 6.26)
    np.testing.assert_allclose(learned.feedback_update([torch.from_numpy(h1), torch.from_numpy(h2)], lam)[0].numpy(), expected, rtol=1e-12)


def test_multiplexing_rule_shares_the_training_step_by_inheritance():
    assert "training_step" not in vars(MultiplexingDTP) and "training_step" not in vars(DynamicalTP)
    assert MultiplexingDTP.training_step is DynamicalTP.training_step
    assert not issubclass(MultiplexingDTP, DynamicalTP)


def test_dfa_angle_reference_is_the_product_above():
    from tplightning.diagnostics import weight_alignment_angles

    torch.manual_seed(0)
    rule = tp.DFA(sizes=[4, 4, 3, 2])
    Ws = [W.detach().numpy().astype(np.float64) for W in rule.net.weights]
    with torch.no_grad():  # B~_1 = (W_3 W_2)^T: aligned with the path backprop takes
        rule.maps[0].base.B.copy_(torch.from_numpy((Ws[2] @ Ws[1]).T))
        rule.maps[1].base.B.copy_(-torch.from_numpy(Ws[2].T))  # opposite: 180 degrees
    angles = weight_alignment_angles(rule)
    assert float(angles[1]) < 0.1 and float(angles[2]) > 179.9
