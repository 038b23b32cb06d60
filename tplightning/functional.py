"""Pure tensor math of target propagation, without Lightning.

Every function works on batches: activations are ``(B, n)`` tensors, weights ``(n_out, n_in)``
matrices as in the thesis (``h_i = s_i(W_i h_{i-1})``, eq. 4.1), so a batch computes
``h_i = s_i(h_{i-1} @ W_i.T)``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .losses import D, Loss, LocalScaling, get_loss

__all__ = [
    "Activation",
    "LeakyReLU",
    "Identity",
    "Tanh",
    "ReLU",
    "get_activation",
    "output_error",
    "output_target",
    "per_sample_loss",
    "local_delta",
    "local_update",
    "delta_update",
    "inverse_loss_grad",
    "original_inverse_loss_grad",
    "robust_sherman_morrison",
    "robust_woodbury",
    "robust_invertible_gaussian",
    "is_robustly_invertible",
    "cosine",
    "regularised_inverse",
]


class Activation:
    """An element-wise non-linearity ``s`` with its derivative and (where it exists) inverse.

    ``derivative`` takes the pre-activation ``a`` (and optionally the activation ``h = s(a)``,
    which some derivatives reuse) and returns the diagonal of ``D_s`` (eq. 4.11).
    """

    name: str = "activation"
    invertible: bool = True

    def __call__(self, a: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def derivative(self, a: Tensor, h: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LeakyReLU(Activation):
    """``s(a) = a`` for ``a >= 0`` and ``slope * a`` otherwise; the thesis uses 0.1 and 0.35."""

    name = "leaky_relu"

    def __init__(self, negative_slope: float = 0.35):
        if not isinstance(negative_slope, (int, float)) or not math.isfinite(negative_slope):
            raise ValueError(f"leaky_relu negative_slope must be a finite number, got {negative_slope!r}")
        self.negative_slope = float(negative_slope)
        self.invertible = self.negative_slope > 0

    # One or two elementwise kernels each, not torch.where's three (on this project's CPU build a masked
    # torch.where on 128x256 costs 8 times torch.nn.functional.leaky_relu); the values are the same bit for bit
    # (``scripts/ab_step_time.py /work/main --activation leaky_relu``: DTP-AI, RDTP-AI, MTP steps 0.90-0.91x, BP 0.70x).
    # Autograd through ``__call__`` (BP) now takes the slope as the derivative at exactly 0, ``derivative`` takes 1.
    def __call__(self, a: Tensor) -> Tensor:
        return torch.nn.functional.leaky_relu(a, self.negative_slope)

    def inverse(self, h: Tensor) -> Tensor:
        if not self.invertible:
            raise ValueError(
                f"leaky_relu with negative_slope={self.negative_slope} has no inverse: "
                "target propagation needs a negative slope > 0 (the thesis uses 0.1 or 0.35)"
            )
        # h for h >= 0, h / slope below: the smaller of the two for slopes <= 1, the larger for slopes > 1
        return (torch.minimum if self.negative_slope <= 1 else torch.maximum)(h, h / self.negative_slope)

    def derivative(self, a: Tensor, h: Tensor | None = None) -> Tensor:
        return (a >= 0).to(a.dtype).mul_(1 - self.negative_slope).add_(self.negative_slope)

    def __repr__(self) -> str:
        return f"LeakyReLU(negative_slope={self.negative_slope})"


class Identity(Activation):
    """The linear output layer of the thesis' regression experiments."""

    name = "linear"

    def __call__(self, a: Tensor) -> Tensor:
        return a

    def inverse(self, h: Tensor) -> Tensor:
        return h

    def derivative(self, a: Tensor, h: Tensor | None = None) -> Tensor:
        return torch.ones_like(a)


class Tanh(Activation):
    """``tanh``; its inverse ``atanh`` is clamped just inside (-1, 1) so targets stay finite."""

    name = "tanh"
    eps = 1e-6

    def __call__(self, a: Tensor) -> Tensor:
        return torch.tanh(a)

    def inverse(self, h: Tensor) -> Tensor:
        return torch.atanh(h.clamp(-1 + self.eps, 1 - self.eps))

    def derivative(self, a: Tensor, h: Tensor | None = None) -> Tensor:
        t = torch.tanh(a) if h is None else h
        return 1 - t * t


class ReLU(Activation):
    """ReLU, for backprop baselines only: it is not invertible."""

    name = "relu"
    invertible = False

    def __call__(self, a: Tensor) -> Tensor:
        return torch.relu(a)

    def inverse(self, h: Tensor) -> Tensor:
        raise ValueError(
            "relu has no inverse (it maps every negative input to 0): use 'leaky_relu' with a "
            "negative_slope > 0, 'tanh' or 'linear' for target propagation"
        )

    def derivative(self, a: Tensor, h: Tensor | None = None) -> Tensor:
        return (a > 0).to(a.dtype)


_ACTIVATIONS = {"leaky_relu": LeakyReLU, "linear": Identity, "identity": Identity, "tanh": Tanh, "relu": ReLU}


def get_activation(name: str, negative_slope: float = 0.35) -> Activation:
    """Activation by name: ``leaky_relu`` (with ``negative_slope``), ``linear``, ``tanh``, ``relu``."""
    if isinstance(name, Activation):
        return name
    key = str(name).lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    if key == "leaky_relu":
        return LeakyReLU(negative_slope)
    return _ACTIVATIONS[key]()


# --------------------------------------------------------------------------------------------
# Losses and output targets
# --------------------------------------------------------------------------------------------


def label_output(y: Tensor, n_out: int, loss: str | Loss, dtype: torch.dtype | None = None) -> Tensor:
    """The labels in output space (:meth:`tplightning.losses.Loss.labels` of the loss ``loss`` names).

    >>> label_output(torch.tensor([1]), 3, "cross_entropy")
    tensor([[0., 1., 0.]])
    """
    return get_loss(loss).labels(y, n_out, dtype)


def output_error(h_L: Tensor, y: Tensor, loss: str | Loss) -> Tensor:
    """``e_L = dl/dh_L`` of the per-sample loss (eq. 4.5), shape ``(B, n_L)`` (:meth:`tplightning.losses.Loss.error`).

    >>> output_error(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]]), "mse")
    tensor([[1., 0.]])
    """
    return get_loss(loss).error(h_L, y)


def per_sample_loss(h_L: Tensor, y: Tensor, loss: str | Loss) -> Tensor:
    """The per-sample loss ``l`` whose gradient :func:`output_error` returns, shape ``(B,)``.

    >>> per_sample_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]]), "mse")
    tensor([0.5000])
    """
    return get_loss(loss).per_sample(h_L, y)


def output_target(h_L: Tensor, y: Tensor, loss: str | Loss, target_stepsize: float) -> Tensor:
    """``h^_L = h_L - eta^ * dl/dh_L`` (eq. 4.4).

    >>> output_target(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]]), "mse", 0.1)
    tensor([[0.9000, 2.0000]])
    """
    return get_loss(loss).output_target(h_L, y, target_stepsize)


def local_delta(d: Tensor, h: Tensor, h_hat: Tensor, scaling: LocalScaling = D) -> Tensor:
    """``D_i (h_i - h^_i)`` per sample, or ``D_i^{-1} (h_i - h^_i)`` with ``scaling=D_INVERSE`` (modified rules, Alg. A.1, A.6).

    >>> from tplightning.losses import D_INVERSE
    >>> local_delta(torch.tensor([[0.5]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]), D_INVERSE)
    tensor([[2.]])
    """
    return scaling.delta(d, h, h_hat)


def delta_update(delta: Tensor, h_prev: Tensor) -> Tensor:
    """``(1/B) sum_b delta_b h_{i-1,b}^T``: the weight gradient of a dense layer from its per-sample ``delta``."""
    return (delta / delta.shape[0]).T @ h_prev


def local_update(d: Tensor, h: Tensor, h_hat: Tensor, h_prev: Tensor, scaling: LocalScaling = D) -> Tensor:
    """Gradient of the local loss ``mean_b 1/2 ||h_i - h^_i||^2`` w.r.t. ``W_i`` (eq. 4.12, Alg. A.10).

    ``(1/B) sum_b D_i (h_i - h^_i) h_{i-1}^T`` with ``d`` the diagonal of ``D_i`` per sample; the
    modified rules (``scaling=D_INVERSE``) use ``D_i^{-1}`` instead. A step ``W <- W - eta * result`` is the thesis'
    ``Delta W_i``. :class:`~tplightning.layers.Dense` computes exactly this (from :func:`local_delta`
    and :func:`delta_update`, whose composition this is).

    >>> local_update(torch.ones(2, 1), torch.ones(2, 1), torch.zeros(2, 1), torch.tensor([[1.0], [3.0]]))
    tensor([[2.]])
    """
    return delta_update(local_delta(d, h, h_hat, scaling), h_prev)


def inverse_loss_grad(Q: Tensor, a_next: Tensor, h: Tensor) -> Tensor:
    """Gradient of ``mean_b 1/2 ||Q a_b - h_b||^2`` w.r.t. ``Q``: the thesis-form inverse loss (Alg. A.8, eq. 4.91).

    ``g_i(h_{i+1}) = Q_i (s_{i+1}^{-1}(h_{i+1}) - b_{i+1})`` and ``a_next = s^{-1}(f_{i+1}(h_i)) - b = W_{i+1} h_i``,
    so ``g(f(h)) - h = Q a - h``. Batched: ``Q (..., n_i, n_{i+1})``, ``a_next (..., B, n_{i+1})``,
    ``h (..., B, n_i)``. Adding ``lambda Q`` gives the regularised loss of eq. 4.97.
    """
    return ((a_next @ Q.transpose(-1, -2) - h) / h.shape[-2]).transpose(-1, -2) @ a_next


def original_inverse_loss_grad(Q: Tensor, h_next: Tensor, h: Tensor, activation: Activation) -> Tensor:
    """Gradient of ``mean_b 1/2 ||s(Q h_{i+1}) - h_i||^2`` w.r.t. ``Q``: the original-form inverse loss (Alg. A.9).

    ``g_i(h_{i+1}) = s_i(Q_i h_{i+1})`` (eq. 5.54); ``h`` is the (noise-injected, eq. 3.13) layer-``i``
    activation and ``h_next = f_{i+1}(h)``. Batched like :func:`inverse_loss_grad`; ``s(c)`` is evaluated once.
    """
    c = h_next @ Q.transpose(-1, -2)
    g = activation(c)
    return (activation.derivative(c, g) * (g - h)).transpose(-1, -2) @ h_next / h.shape[-2]


def regularised_inverse(W: Tensor, gamma: float) -> Tensor:
    """``W^T (W W^T + gamma I)^{-1}`` (theorem 4.7); ``W^dagger`` for ``gamma = 0``. Computed in float64.

    The minimiser of the regularised inverse loss (eq. 4.97) with ``gamma = lambda / sigma^2``: the feedback weights
    Alg. A.8 converges to with weight decay ``lambda``. Its singular values are ``s / (s^2 + gamma) <= 1 / (2 sqrt(gamma))``
    where the plain inverse has ``1 / s``, so a nearly singular forward matrix (a student at Frobenius distance 8 from
    its teacher often has ``sigma_min < 0.05``) no longer amplifies the propagated targets 20-fold and more.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    Wd = W.detach().double()
    if gamma == 0:
        return torch.linalg.pinv(Wd).to(W.dtype)
    n = Wd.shape[0]
    return torch.linalg.solve(Wd @ Wd.T + gamma * torch.eye(n, dtype=Wd.dtype, device=Wd.device), Wd).T.to(W.dtype)


def cosine(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-sample cosine of the angle between rows of ``a`` and ``b`` (flattened per sample)."""
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)


# --------------------------------------------------------------------------------------------
# Exact inverses: robust Sherman-Morrison (Alg. 4.1) and its mini-batch generalisation
# --------------------------------------------------------------------------------------------


def robust_sherman_morrison(
    W: Tensor, W_inv: Tensor, u: Tensor, v: Tensor, threshold: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Robust Sherman-Morrison update, exactly Alg. 4.1 of the thesis.

    With ``d = v^T W^{-1} u``: if ``|1 + d| >= threshold`` then ``W + u v^T`` and its inverse by
    Sherman-Morrison (eq. 4.19), ``beta = 1``; else ``beta = 1/(threshold - d)``, ``W + beta u v^T``
    and ``W^{-1} - W^{-1} u v^T W^{-1} / threshold`` (eq. 4.80), which is exactly its inverse.

    Batched: leading dimensions of ``W (..., n, n)``, ``u (..., n)``, ``v (..., n)`` are trials.

    Args:
        W: ``(n, m)`` forward matrix (square for an inverse to exist).
        W_inv: its inverse.
        u: ``(n,)`` left vector (``-eta D (h - h^)``, eq. 4.17).
        v: ``(m,)`` right vector (``h_{i-1}``, eq. 4.18).
        threshold: ``epsilon`` of Alg. 4.1.

    Returns:
        ``(W_new, W_inv_new, beta)``, ``beta`` a 0-d tensor (one per trial when batched).
    """
    if u.dim() < 1 or u.dim() != v.dim() or W.dim() != u.dim() + 1:
        raise ValueError(f"u and v must be vectors (batched like W), got shapes {tuple(u.shape)}, {tuple(v.shape)} for W {tuple(W.shape)}")
    if u.dim() == 1:
        Wu, vW = W_inv @ u, v @ W_inv  # (n,)
        d = v @ Wu
        uv, WuvW = torch.outer(u, v), torch.outer(Wu, vW)
    else:
        Wu, vW = (W_inv @ u.unsqueeze(-1)).squeeze(-1), (v.unsqueeze(-2) @ W_inv).squeeze(-2)
        d = (v * Wu).sum(-1)
        uv, WuvW = u.unsqueeze(-1) * v.unsqueeze(-2), Wu.unsqueeze(-1) * vW.unsqueeze(-2)
    clipped = (1 + d).abs() < threshold
    beta = torch.where(clipped, 1 / (threshold - d), torch.ones_like(d))
    denom = torch.where(clipped, torch.full_like(d, threshold), 1 + d)
    if u.dim() > 1:
        beta_, denom_ = beta[..., None, None], denom[..., None, None]
        return W + beta_ * uv, W_inv - WuvW / denom_, beta
    return W + beta * uv, W_inv - WuvW / denom, beta


def robust_woodbury(
    W: Tensor, W_inv: Tensor, U: Tensor, V: Tensor, threshold: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact inverse after a rank-B update ``W + beta U V^T`` (Woodbury), robust in the spirit of Alg. 4.1.

    The thesis restricts exact inverses to batch size 1 (section 4.1.3). A mini-batch update
    ``Delta W = U V^T`` (columns ``u_b = -eta/B D_b (h_b - h^_b)``, ``v_b = h_{i-1,b}``) has rank B,
    and Woodbury keeps the inverse exact at O(n^2 B + B^3)::

        (W + beta U V^T)^{-1} = W^{-1} - W^{-1} U (I/beta + K)^{-1} V^T W^{-1},   K = V^T W^{-1} U.

    Robustness rule (our generalisation of Alg. 4.1, whose role ``1 + d`` is played by the
    capacitance ``C = I + K``): if ``sigma_min(C) >= threshold`` take ``beta = 1``; otherwise
    ``beta = 1 / (threshold - lambda_min(sym K))`` with ``sym K = (K + K^T)/2``. Then
    ``sigma_min(I/beta + K) >= lambda_min(sym(I/beta + K)) = threshold``, so the correction's
    gain ``||(I/beta + K)^{-1}||_2`` is at most ``1/threshold`` exactly as in Alg. 4.1, and
    ``0 < beta <= 1`` (a shortened step, never a reversed one). For B = 1, ``sym K = d`` and
    ``sigma_min(C) = |1 + d|``, so this is Alg. 4.1 to the letter.

    Args:
        W: ``(n, n)`` forward matrix. W_inv: its inverse. U: ``(n, B)``. V: ``(n, B)``.
        threshold: ``epsilon``.

    Returns:
        ``(W_new, W_inv_new, beta, sigma_min(C))`` with ``beta`` and ``sigma_min(C)`` 0-d tensors.
    """
    if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[1]:
        raise ValueError(f"U and V must be (n, B) matrices with the same B, got {tuple(U.shape)} and {tuple(V.shape)}")
    B = U.shape[1]
    WU = W_inv @ U  # (n, B)
    VW = V.T @ W_inv  # (B, n)
    K = V.T @ WU  # (B, B)
    eye = torch.eye(B, dtype=K.dtype, device=K.device)
    s_min = torch.linalg.svdvals(eye + K)[-1]
    lam_min = torch.linalg.eigvalsh(0.5 * (K + K.T))[0]
    clipped = s_min < threshold
    beta = torch.where(clipped, 1 / (threshold - lam_min), torch.ones_like(lam_min))
    X = torch.linalg.solve(eye / beta + K, VW)  # (B, n)
    return W + beta * (U @ V.T), W_inv - WU @ X, beta, s_min


def robust_invertible_gaussian(
    n: int,
    tau: float = 0.4,
    std: float = 1.0,
    max_attempts: int = 1000,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    batch: int | None = None,
    cols: int | None = None,
    diagonal: bool = False,
) -> Tensor:
    """Gaussian ``(n, n)`` matrix redrawn until ``sigma_min * sigma_max > tau`` (section 4.2.3, method 1).

    The thesis uses ``tau = 0.4``. With ``batch``, ``batch`` independent matrices ``(batch, n, cols)``
    (``cols`` defaults to ``n``; the same test for non-square ones), failing ones redrawn until all
    pass; ``diagonal`` draws diagonal ones, like the ``D_{s_i}`` of fig. 5.12. Raises ``ValueError``
    after ``max_attempts`` draws (large ``n`` with small ``std`` rarely passes: the expected
    ``sigma_min`` is ``O(std / sqrt(n))``).
    """
    cols = n if cols is None else cols
    if diagonal and cols != n:
        raise ValueError(f"a diagonal matrix must be square, got {n}x{cols}")
    if batch is None:
        for _ in range(max_attempts):
            W = torch.randn(n, n, generator=generator, dtype=dtype) * std
            if is_robustly_invertible(W, tau):
                return W
    else:
        M = torch.empty(batch, n, cols, dtype=dtype)
        todo = torch.arange(batch)
        for _ in range(max_attempts):
            if diagonal:
                draw = torch.diag_embed(torch.randn(len(todo), n, generator=generator, dtype=dtype)) * std
            else:
                draw = torch.randn(len(todo), n, cols, generator=generator, dtype=dtype) * std
            M[todo] = draw
            s = torch.linalg.svdvals(draw)
            todo = todo[s[:, 0] * s[:, -1] <= tau]
            if len(todo) == 0:
                return M
    raise ValueError(
        f"no {n}x{cols} Gaussian matrix (std={std}) with sigma_min*sigma_max > tau_init={tau} after "
        f"{max_attempts} attempts; lower tau_init or raise the init std"
    )


def is_robustly_invertible(W: Tensor, tau: float) -> bool:
    """``sigma_min(W) * sigma_max(W) > tau`` for a square ``W`` (the thesis' initialisation test)."""
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        return False
    s = torch.linalg.svdvals(W.double())
    return bool(s[-1] * s[0] > tau)
