"""Local stability of the mixture network's fixed points (thesis section 6.7, eqs. 6.38-6.42).

The linearised dynamics ``tau dh/dt ~ J h`` have the block-tridiagonal Jacobian (eq. 6.40)::

    J = -I + (1 - mu) df/dh + mu dg/dh,

with the lower blocks ``J_{f_i} = D_{s_i} W_i`` (``i = 2..L``, eq. 6.41) and the upper blocks
``dg_i/dh_{i+1}`` (``i = 1..L-1``), ``J_{f_{i+1}}^{-1}`` for exact inverses (eq. 6.42).

The thesis states that a matrix of this form "is always negative definite (only strictly negative
eigenvalues)". These are two different claims for a non-symmetric matrix:

* **eigenvalue claim** (Hurwitz stability, what local stability needs): every eigenvalue has a
  negative real part. When the upper block really is the inverse of the lower one at the same
  point, ``T = diag(I, A_2, A_3 A_2, ...)`` turns ``J`` into ``T^{-1} J T = -I + (1-mu) S + mu S^T``
  (``S`` the block shift), a tridiagonal Toeplitz matrix whose eigenvalues are
  ``-1 + 2 sqrt(mu (1 - mu)) cos(k pi / (L + 1))``, ``k = 1..L`` (:func:`toeplitz_spectrum`), all
  negative for every ``mu`` in (0, 1): the claim holds exactly, whatever the blocks.
* **symmetric-part claim** (negative definiteness, ``x^T J x < 0``): the largest eigenvalue of
  ``(J + J^T)/2`` is negative. This fails as soon as ``(1-mu) J_f`` and ``mu J_f^{-T}`` are large
  enough; :func:`random_blocks_check` counts the counterexamples.

In a simulated network the two Jacobians of a pair are taken at different points: ``J_{f_{i+1}}``
at ``W_{i+1} h_i^*`` but ``dg_i/dh_{i+1} = J_{f_{i+1}}^{-1}`` at ``f_{i+1}^{-1}(h_{i+1}^*)``. For
leaky-ReLU units whose pre-activation changes sign between the two points the diagonal factors
differ (1 against the slope), so the exact cancellation above is lost; :func:`network_check`
measures the spectrum at simulated equilibria.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import functional as F

__all__ = ["block_tridiagonal", "spectrum", "toeplitz_spectrum", "random_blocks_check", "network_check"]


def block_tridiagonal(
    sizes: Sequence[int], lower: Sequence[Tensor], upper: Sequence[Tensor], mu: float, corner: Tensor | None = None
) -> Tensor:
    """``-I + (1-mu) lower + mu upper (+ mu corner)`` as a dense batched ``(B, N, N)`` matrix (eq. 6.40).

    Args:
        sizes: ``[n_1, ..., n_L]`` (``N = sum n_i``).
        lower: ``[J_{f_2}, ..., J_{f_L}]``, block ``(i, i-1)`` of shape ``(B, n_i, n_{i-1})``.
        upper: ``[dg_1/dh_2, ..., dg_{L-1}/dh_L]``, block ``(i, i+1)`` of shape ``(B, n_i, n_{i+1})``.
        mu: mixing coefficient.
        corner: optional ``(B, n_L, n_L)`` derivative of an output-dependent target ``g_L(h_L)``
            (zero for the fixed clamp of eq. 6.3, as in section 6.7).

    >>> block_tridiagonal([1, 1], [torch.tensor([[[2.0]]])], [torch.tensor([[[0.5]]])], mu=0.5)
    tensor([[[-1.0000,  0.2500],
             [ 1.0000, -1.0000]]])
    """
    L = len(sizes)
    if len(lower) != L - 1 or len(upper) != L - 1:
        raise ValueError(f"a {L}-layer Jacobian needs {L - 1} lower and upper blocks, got {len(lower)} and {len(upper)}")
    ref = (lower or upper or [corner])[0]
    B = ref.shape[0] if ref is not None else 1
    dtype = ref.dtype if ref is not None else torch.float64
    device = ref.device if ref is not None else None
    N = sum(sizes)
    off = [0]
    for n in sizes:
        off.append(off[-1] + n)
    J = -torch.eye(N, dtype=dtype, device=device).expand(B, N, N).clone()
    for k in range(L - 1):  # layer i = k + 2 below, k + 1 above (1-based)
        i0, i1, j0, j1 = off[k + 1], off[k + 2], off[k], off[k + 1]
        J[:, i0:i1, j0:j1] += (1 - mu) * lower[k]
        J[:, j0:j1, i0:i1] += mu * upper[k]
    if corner is not None:
        J[:, off[L - 1] :, off[L - 1] :] += mu * corner
    return J


def spectrum(J: Tensor) -> dict[str, Tensor]:
    """``max Re(eig J)`` and ``max eig((J + J^T)/2)`` per matrix of a batch ``(B, N, N)``, and the eigenvalues.

    Returns ``{"max_real_eig": (B,), "max_sym_eig": (B,), "eigvals": (B, N) complex}``: the first decides local
    stability, the second negative definiteness (see the module docstring).

    >>> s = spectrum(torch.tensor([[[-1.0, 0.25], [1.0, -1.0]]]))  # eigenvalues -1 +- 0.5
    >>> s["max_real_eig"], s["max_sym_eig"]
    (tensor([-0.5000]), tensor([-0.3750]))
    """
    eig = torch.linalg.eigvals(J)
    sym = torch.linalg.eigvalsh(0.5 * (J + J.transpose(-1, -2)))
    return {"max_real_eig": eig.real.max(-1).values, "max_sym_eig": sym[..., -1], "eigvals": eig}


def toeplitz_spectrum(mu: float, L: int) -> list[float]:
    """Eigenvalues ``-1 + 2 sqrt(mu(1-mu)) cos(k pi/(L+1))``, ``k = 1..L``, of the exact-inverse Jacobian.

    Each has multiplicity ``n`` for layers of width ``n`` (see the module docstring).

    >>> [round(v, 6) for v in toeplitz_spectrum(0.5, 2)]  # -1 + cos(pi/3), -1 + cos(2 pi/3)
    [-0.5, -1.5]
    """
    c = 2 * math.sqrt(mu * (1 - mu))
    return [-1 + c * math.cos(k * math.pi / (L + 1)) for k in range(1, L + 1)]


def random_blocks_check(
    cases: int, widths: Sequence[int], depths: Sequence[int], generator: torch.Generator | None = None, chunk: int = 500
) -> dict:
    """The thesis' experiment of section 6.7: random Gaussian ``J_i`` of random variance, ``mu ~ U(0, 0.5)``.

    ``J`` has ``-I`` on the diagonal, ``(1-mu) J_i`` below and ``mu J_i^{-1}`` above. Width and depth
    are drawn uniformly from ``widths`` and ``depths`` per case, the std of every block from
    ``10^U(-1, 1)``. Returns the counts of counterexamples to both claims, the largest values seen
    and the largest deviation from :func:`toeplitz_spectrum`.

    Args:
        cases: number of random Jacobians.
        widths, depths: the layer widths ``n`` and depths ``L`` to draw from.
        generator: random source (``None``: torch's global one).
        chunk: cases drawn at once (one width and depth per chunk).

    >>> out = random_blocks_check(4, [2], [2], generator=torch.Generator().manual_seed(0))
    >>> out["cases"], out["eigenvalue_counterexamples"]
    (4, 0)
    """
    dt = torch.float64
    rows = []
    for start in range(0, cases, chunk):
        m = min(chunk, cases - start)
        n = widths[int(torch.randint(len(widths), (1,), generator=generator))]
        L = depths[int(torch.randint(len(depths), (1,), generator=generator))]
        mu = 0.5 * torch.rand(m, 1, 1, generator=generator, dtype=dt)
        lower, upper = [], []
        for _ in range(L - 1):
            std = 10 ** (2 * torch.rand(m, 1, 1, generator=generator, dtype=dt) - 1)
            A = std * torch.randn(m, n, n, generator=generator, dtype=dt)
            lower.append(A)
            upper.append(F.inverse64(A))
        for b in range(m):  # mu differs per case: build one by one (cheap at these sizes)
            mb = float(mu[b])
            J = block_tridiagonal([n] * L, [A[b : b + 1] for A in lower], [U[b : b + 1] for U in upper], mb)
            s = spectrum(J)
            bound = max(toeplitz_spectrum(mb, L))
            rows.append((n, L, mb, float(s["max_real_eig"][0]), float(s["max_sym_eig"][0]), bound))
    real = torch.tensor([r[3] for r in rows])
    sym = torch.tensor([r[4] for r in rows])
    bound = torch.tensor([r[5] for r in rows])
    worst_sym = max(rows, key=lambda r: r[4])
    return {
        "cases": len(rows),
        "eigenvalue_counterexamples": int((real >= 0).sum()),
        "symmetric_part_counterexamples": int((sym >= 0).sum()),
        "max_real_eig": float(real.max()),
        "max_sym_eig": float(sym.max()),
        "max_deviation_from_toeplitz": float((real - bound).abs().max()),
        "worst_symmetric_case": {"width": worst_sym[0], "depth": worst_sym[1], "mu": worst_sym[2], "max_sym_eig": worst_sym[4]},
        "rows": rows,
    }


def network_check(model, x: Tensor, h_target: Tensor) -> dict[str, Tensor]:
    """Spectrum of the Jacobian (eq. 6.40) at the simulated equilibrium of a :class:`MixtureNetwork`.

    ``h_target`` is the fixed clamp of eq. 6.3, as in section 6.7. Returns :func:`spectrum`'s dict.

    >>> from tplightning.dynamics.models import MixtureNetwork
    >>> W = torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    >>> net = MixtureNetwork([W, 2 * W], "leaky_relu", mu=0.2)
    >>> x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    >>> bool(network_check(net, x, torch.zeros(1, 2, dtype=torch.float64))["max_real_eig"] < 0)
    True
    """
    hs = model.equilibrium(x, h_target)
    return spectrum(model.jacobian(x, hs, h_target))
