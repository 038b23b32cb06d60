"""Section 6.7: the Jacobian of eq. 6.40 against autograd and closed-form spectra."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian as autograd_jacobian

from tplightning.dynamics import MixtureNetwork, nudged_target
from tplightning.dynamics.models import _split
from tplightning.dynamics.stability import block_tridiagonal, random_blocks_check, spectrum, toeplitz_spectrum

DT = torch.float64


@pytest.mark.parametrize("target", ["fixed", "nudged"])
def test_jacobian_matches_autograd_of_the_vector_field(target):
    g = torch.Generator().manual_seed(1)
    Ws = [torch.randn(4, 4, generator=g, dtype=DT) for _ in range(3)]
    x = torch.randn(3, 4, generator=g, dtype=DT)
    y = torch.randn(3, 4, generator=g, dtype=DT)
    tau = 0.5
    m = MixtureNetwork(Ws, "tanh", 0.3, tau=tau)
    tgt = y if target == "fixed" else nudged_target(y, "mse", 0.2)
    hs = m.forward_pass(x)
    J = m.jacobian(x, hs, tgt)
    for b in range(3):
        def field(v):
            h = _split(v.unsqueeze(0), [4, 4, 4])
            t = tgt[b : b + 1] if target == "fixed" else h[-1] - 0.2 * (h[-1] - y[b : b + 1])
            return torch.cat(m.velocity(x[b : b + 1], h, t), -1)[0]
        Ja = autograd_jacobian(field, torch.cat([h[b] for h in hs]))
        torch.testing.assert_close(J[b], tau * Ja)


def test_two_layer_spectrum_closed_form():
    """``[[-I, mu A^{-1}], [(1-mu) A, -I]]`` has eigenvalues ``-1 +- sqrt(mu (1-mu))`` for any invertible ``A``."""
    g = torch.Generator().manual_seed(2)
    A = 3 * torch.randn(1, 5, 5, generator=g, dtype=DT)
    mu = 0.3
    J = block_tridiagonal([5, 5], [A], [torch.linalg.inv(A)], mu)
    eig = torch.linalg.eigvals(J[0])
    c = math.sqrt(mu * (1 - mu))
    assert torch.allclose(eig.imag, torch.zeros(10, dtype=DT), atol=1e-8)
    got = sorted(eig.real.tolist())
    assert got == pytest.approx([-1 - c] * 5 + [-1 + c] * 5, abs=1e-8)


def test_random_blocks_follow_the_toeplitz_spectrum_and_break_the_symmetric_claim():
    res = random_blocks_check(200, widths=[2, 4], depths=[2, 3, 5], generator=torch.Generator().manual_seed(0), chunk=50)
    assert res["cases"] == 200
    assert res["eigenvalue_counterexamples"] == 0
    assert res["max_deviation_from_toeplitz"] < 1e-6
    assert res["symmetric_part_counterexamples"] > 0  # negative definiteness in the x^T J x sense fails


def test_symmetric_part_counterexample_by_hand():
    """``A = 10 I``, ``mu = 1/4``: the off-diagonal of ``(J+J^T)/2`` is ``((1-mu) 10 + mu/10)/2 = 3.7625 > 1``."""
    A = 10 * torch.eye(1, dtype=DT).unsqueeze(0)
    J = block_tridiagonal([1, 1], [A], [torch.linalg.inv(A)], 0.25)
    s = spectrum(J)
    assert float(s["max_sym_eig"][0]) == pytest.approx(-1 + (0.75 * 10 + 0.25 / 10) / 2)
    assert float(s["max_real_eig"][0]) == pytest.approx(max(toeplitz_spectrum(0.25, 2)))


def test_network_jacobian_is_toeplitz_when_no_unit_changes_sign():
    g = torch.Generator().manual_seed(4)
    Ws = [torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=DT))[0] for _ in range(4)]
    x = torch.randn(4, 5, generator=g, dtype=DT)
    m = MixtureNetwork(Ws, "linear", 0.2)
    y = m.forward_pass(x)[-1] + 0.1
    s = spectrum(m.jacobian(x, m.equilibrium(x, y), y))
    assert torch.allclose(s["max_real_eig"], torch.full((4,), max(toeplitz_spectrum(0.2, 4)), dtype=DT), atol=1e-10)


def test_block_tridiagonal_checks_block_counts():
    with pytest.raises(ValueError, match="a 3-layer Jacobian needs 2 lower and upper blocks, got 1 and 2"):
        block_tridiagonal([2, 2, 2], [torch.zeros(1, 2, 2)], [torch.zeros(1, 2, 2)] * 2, 0.1)
