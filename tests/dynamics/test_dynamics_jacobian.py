"""The Jacobian of eq. 6.40 (``MixtureNetwork.jacobian``) against ``torch.autograd.functional.jacobian`` of the residual
``R(h) = -h + (1-mu) f(h) + mu g(h)`` written out here by hand (eq. 6.1), in float64.

Where the bug would hide, the parameters do not: learned, non-square feedback ``Q_i`` (not ``W^{-1}``), a tanh output
(``s_L^{-1}`` in ``g_{L-1}`` is not the identity), leaky-ReLU with a slope far from 1, rates away from the forward pass
and from any equilibrium, and both a fixed clamp and an output-dependent (nudged) target.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian as autograd_jacobian

from tplightning.dynamics import MixtureNetwork

DT = torch.float64
MU, ETA = 0.3, 0.4


def leaky(a: torch.Tensor, slope: float) -> torch.Tensor:
    return torch.where(a >= 0, a, slope * a)


def leaky_inv(h: torch.Tensor, slope: float) -> torch.Tensor:
    return torch.where(h >= 0, h, h / slope)


def residual(v, x, Ws, Qs, sizes, hidden, hidden_inv, target):
    """``R(h)`` of one sample, ``v = [h_1; ...; h_L]``: eq. 6.1's right-hand side times tau, with ``s_L = tanh``."""
    hs = list(torch.split(v, sizes))
    L = len(Ws)
    acts = [hidden] * (L - 1) + [torch.tanh]
    invs = [hidden_inv] * (L - 1) + [torch.atanh]
    prev = [x, *hs[:-1]]
    out = []
    for i in range(1, L + 1):
        f = acts[i - 1](Ws[i - 1] @ prev[i - 1])
        g = Qs[i - 1] @ invs[i](hs[i]) if i < L else target(hs[-1])  # g_i = Q_i s_{i+1}^{-1}(h_{i+1}), g_L = h_L^trgt
        out.append(-hs[i - 1] + (1 - MU) * f + MU * g)
    return torch.cat(out)


@pytest.mark.parametrize("feedback", ["learned", "exact"])
@pytest.mark.parametrize("clamp", ["fixed", "nudged"])
@pytest.mark.parametrize("hidden_name", ["tanh", "leaky_relu"])
def test_jacobian_equals_autograd_of_the_hand_written_residual(feedback, clamp, hidden_name):
    g = torch.Generator().manual_seed(7)
    sizes = [5, 4, 3] if feedback == "learned" else [4, 4, 4]
    n0, B, slope = 6, 3, 0.35
    Ws = [0.9 * torch.randn(n, m, generator=g, dtype=DT) for n, m in zip(sizes, [n0, *sizes[:-1]])]
    if feedback == "learned":
        Qs = [0.7 * torch.randn(sizes[i], sizes[i + 1], generator=g, dtype=DT) for i in range(len(sizes) - 1)]
    else:
        Qs = [torch.linalg.inv(W) for W in Ws[1:]]
    x = torch.randn(B, n0, generator=g, dtype=DT)
    y = 0.6 * torch.rand(B, sizes[-1], generator=g, dtype=DT) - 0.3
    if hidden_name == "tanh":
        hidden, hidden_inv = torch.tanh, torch.atanh
    else:
        hidden, hidden_inv = (lambda a: leaky(a, slope)), (lambda h: leaky_inv(h, slope))
    m = MixtureNetwork(Ws, hidden_name, MU, feedback=Qs if feedback == "learned" else None, output_activation="tanh",
                       negative_slope=slope)  # fmt: skip
    # rates away from the forward pass: every unit moved by up to 0.2, kept inside tanh's range
    hs = [h + 0.2 * (2 * torch.rand(h.shape, generator=g, dtype=DT) - 1) for h in m.forward_pass(x)]
    hs = [h.clamp(-0.9, 0.9) for h in hs[:-1]] + [hs[-1].clamp(-0.9, 0.9)]
    if hidden_name == "leaky_relu":
        assert all(float(h.abs().min()) > 1e-3 for h in hs)  # away from the kink
        assert any(bool((h < 0).any()) for h in hs[:-1])  # the slope matters
    target = y if clamp == "fixed" else (lambda h_L: h_L - ETA * (h_L - y))  # mse: h^_L = h_L - eta (h_L - y)
    J = m.jacobian(x, hs, target)
    assert J.shape == (B, sum(sizes), sum(sizes))
    for b in range(B):
        t_b = (lambda h_L: y[b]) if clamp == "fixed" else (lambda h_L: h_L - ETA * (h_L - y[b]))
        v = torch.cat([h[b] for h in hs])
        expected = autograd_jacobian(lambda u: residual(u, x[b], Ws, Qs, sizes, hidden, hidden_inv, t_b), v)
        torch.testing.assert_close(J[b], expected, rtol=1e-10, atol=1e-12)
    if clamp == "nudged":  # the output-dependent target adds only the corner block mu d h_L^trgt / d h_L = mu (1 - eta) I
        n, N = sizes[-1], sum(sizes)
        extra = torch.zeros(N, N, dtype=DT)
        extra[-n:, -n:] = MU * (1 - ETA) * torch.eye(n, dtype=DT)
        torch.testing.assert_close(J - m.jacobian(x, hs, y), extra.expand(B, N, N), rtol=0, atol=1e-12)
