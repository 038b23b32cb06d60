"""First-order (small ``mu``, small ``eta^``) predictions of chapter 6, from the forward pass alone.

Mixture network (eqs. 6.13-6.16, 6.20-6.22, 6.30-6.33). With ``delta_i = h_i^* - f_i(h_{i-1}^*)``,
eq. 6.5 gives exactly ``delta_i = r (g_i(h_{i+1}^*) - h_i^*)``, ``r = mu/(1-mu)`` (eq. 6.13 rearranged);
a first-order expansion of ``g_i`` around ``f_{i+1}(h_i^*)`` gives the linear recursion
``delta_i ~ r (rho_i + J_{g_i} delta_{i+1})`` with the reconstruction error
``rho_i = g_i(f_{i+1}(h_i)) - h_i``. Unrolled::

    delta_i ~ sum_{j=i}^{L-1} r^{j+1-i} [prod_{k=i}^{j-1} J_{g_k}] rho_j  +  r^{L-i} [prod_{k=i}^{L-1} J_{g_k}] delta_L,

and the output layer gives ``delta_L = r (h_L^trgt - h_L^*)``: ``-r eta^ e_L`` for the nudged target of
eq. 6.10 (eq. 6.12), ``0`` for the free phase (eq. 6.29). The last term is then the thesis' learning
signal ``-eta^ r^{L+1-i} [prod J_{g_k}] e_L`` (eqs. 6.15, 6.22; ``J_{g_k} = J_{f_{k+1}}^{-1}`` for
exact inverses, eq. 6.16). Two readings: eq. 6.22 writes the product of the propagated
reconstruction errors as ``prod_{k=i+1}^{j}`` and the errors as ``g_j(h_{j+1}^*) - h_j^*``; the
recursion gives ``prod_{k=i}^{j-1}`` (the matrix sizes only fit that way, ``J_{g_k}`` is
``n_k x n_{k+1}``), and ``g_j(h_{j+1}^*) - h_j^* = rho_j + O(delta)``, the same to first order.

Multiplexing network (eqs. 6.52-6.57): ``d_i = h^_i - h_i`` obeys the same recursion with factor 1,
``d_i ~ rho_i + J_{g_i} d_{i+1}``, ``d_L = h^_L - h_L`` (``-eta^ e_L`` learning, ``0`` free phase).

Everything is evaluated at the forward pass (``h_i = f_i(h_{i-1})``, ``J_{g_k}`` at ``h_{k+1}``), so
the prediction is independent of the simulated equilibrium it is compared with.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

__all__ = ["propagate_first_order", "mixture_first_order", "multiplexing_first_order"]


def propagate_first_order(
    factor: float, jvps: Sequence[Callable[[Tensor], Tensor]], rho: Sequence[Tensor], top: Tensor
) -> dict[str, list[Tensor]]:
    """Unroll ``d_i = factor (rho_i + J_{g_i} d_{i+1})``, ``d_L = top``, split by linearity.

    Args:
        factor: ``mu/(1-mu)`` (mixture) or 1 (multiplexing).
        jvps: ``[v -> J_{g_1} v, ..., v -> J_{g_{L-1}} v]``.
        rho: ``[rho_1, ..., rho_{L-1}]`` reconstruction errors.
        top: ``d_L``.

    Returns:
        ``{"signal": [...], "reconstruction": [...], "total": [...]}``, lists over layers ``1..L``:
        the part carried from ``top``, the part from the reconstruction errors, and their sum.

    >>> import torch
    >>> out = propagate_first_order(0.5, [lambda v: 2 * v], [torch.tensor([[0.1]])], torch.tensor([[1.0]]))
    >>> out["signal"][0], out["reconstruction"][0]  # 0.5 (2 * 1), 0.5 (0.1 + 2 * 0)
    (tensor([[1.]]), tensor([[0.0500]]))
    """
    L = len(rho) + 1
    signal, recon = [None] * L, [None] * L
    signal[-1], recon[-1] = top, top * 0
    for i in range(L - 1, 0, -1):
        signal[i - 1] = factor * jvps[i - 1](signal[i])
        recon[i - 1] = factor * (rho[i - 1] + jvps[i - 1](recon[i]))
    return {"signal": signal, "reconstruction": recon, "total": [s + r for s, r in zip(signal, recon)]}


def mixture_first_order(model, x: Tensor, top: Tensor) -> dict[str, list[Tensor]]:
    """First-order ``delta_i = h_i^* - f_i(h_{i-1}^*)`` of a :class:`~tplightning.dynamics.models.MixtureNetwork`.

    ``top`` is ``delta_L``: ``-mu/(1-mu) eta^ e_L`` for the nudged target (eq. 6.12), zeros for the
    free phase. With exact inverses ``rho = 0`` and ``signal`` is eq. 6.15/6.16; with learned ones
    this is eq. 6.22 (learning phase, eq. 6.33) or eq. 6.31 (free phase).

    >>> import torch
    >>> from tplightning.dynamics.models import MixtureNetwork
    >>> W = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    >>> net = MixtureNetwork([W, W], "linear", mu=0.2)  # exact inverses: rho = 0
    >>> top = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    >>> mixture_first_order(net, torch.ones(1, 2, dtype=torch.float64), top)["signal"][0]  # r W^{-1} top, r = 1/4
    tensor([[0.1250, 0.5000]], dtype=torch.float64)
    """
    hs = model.forward_pass(x)
    rho = [model.g(i, hs[i]) - hs[i - 1] for i in range(1, model.L)]
    jvps = [(lambda v, i=i: (model.g_derivative(i, hs[i]) @ v.unsqueeze(-1)).squeeze(-1)) for i in range(1, model.L)]
    return propagate_first_order(model.ratio, jvps, rho, top)


def multiplexing_first_order(model, x: Tensor, top: Tensor) -> dict[str, list[Tensor]]:
    """First-order ``h^_i - h_i`` of a :class:`~tplightning.dynamics.models.MultiplexingNetwork` (eqs. 6.53, 6.57).

    ``top = h^_L - h_L``: ``-eta^ e_L`` (learning phase, eq. 6.54) or zeros (free phase).

    >>> import torch
    >>> from tplightning.dynamics.models import MultiplexingNetwork
    >>> W = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    >>> net = MultiplexingNetwork([W, W], [torch.linalg.inv(W)], "linear")  # g_1 = W^{-1}: rho = 0
    >>> top = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    >>> multiplexing_first_order(net, torch.ones(1, 2, dtype=torch.float64), top)["total"][0]
    tensor([[0.5000, 2.0000]], dtype=torch.float64)
    """
    hs = model.forward_pass(x)
    rho = [model.g(i, hs[i]) - hs[i - 1] for i in range(1, model.L)]
    jvps = [(lambda v, i=i: model.g_jvp(i, hs[i], v)) for i in range(1, model.L)]
    return propagate_first_order(1.0, jvps, rho, top)
