"""Pure tensor math of target propagation, without Lightning.

Every function works on batches: activations are ``(B, n)`` tensors, weights ``(n_out, n_in)``
matrices as in the thesis (``h_i = s_i(W_i h_{i-1})``, eq. 4.1), so a batch computes
``h_i = s_i(h_{i-1} @ W_i.T)``.

>>> import torch
>>> from tplightning import functional as F
>>> W = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
>>> h_prev = torch.tensor([[1.0, -1.0]])  # one sample
>>> F.LeakyReLU(0.5)(h_prev @ W.T).tolist()
[[1.0, -1.0]]
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import ConfigError
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
    "inverse64",
    "pinv64",
    "singular_values64",
    "weight_product",
]


class Activation:
    """An element-wise non-linearity ``s`` with its derivative and (where it exists) inverse.

    ``h = s(a)`` maps a pre-activation ``a = W_i h_{i-1}`` to an activation (eq. 4.1).
    ``inverse(h)`` is ``s^{-1}(h)``, which the exact and thesis-form target maps apply (eq. 4.11,
    ``g_i = Q_i s_{i+1}^{-1}``, eq. 4.90). ``derivative(a, h=None)`` returns the diagonal of
    ``D_s = ds/da`` (eqs. 4.11-4.12) per element; ``h = s(a)``, when given, saves recomputing it.
    ``invertible`` says whether ``inverse`` exists, so a rule can refuse a non-invertible ``s``
    before training. Subclasses implement the three methods and set ``name`` (the key of
    :func:`get_activation`).

    >>> s = get_activation("tanh")
    >>> a = torch.tensor([0.0, 0.5])
    >>> torch.allclose(s.inverse(s(a)), a), s.derivative(a)[0].item()
    (True, 1.0)
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
    """``s(a) = a`` for ``a >= 0`` and ``negative_slope * a`` otherwise; the thesis uses 0.1 (eq. 5.13) and 0.35.

    Invertible for ``negative_slope > 0``: ``s^{-1}(h) = h`` for ``h >= 0`` and ``h / negative_slope`` below.
    The derivative is 1 for ``a >= 0`` and ``negative_slope`` below. At exactly ``a = 0`` the thesis does not
    say; :meth:`derivative` (used by the closed-form updates and targets) takes 1, while autograd through
    ``__call__`` (BP) takes ``negative_slope``.

    Args:
        negative_slope: slope for negative inputs, a finite number ``>= 0``. 0 makes it a ReLU: not invertible, so
            refused by a rule wherever it inverts this activation (``s_2..s_L`` of the thesis-form and exact-inverse
            maps) and accepted where no rule inverts it (``s_1``, as ``relu`` is). A negative slope is refused
            everywhere: it makes ``s`` fold negative inputs onto positive ones (``|a|`` at -1), no leaky ReLU and never
            invertible.

    >>> s = LeakyReLU(0.5)
    >>> a = torch.tensor([-2.0, 0.0, 3.0])
    >>> s(a).tolist(), s.inverse(s(a)).tolist(), s.derivative(a).tolist()
    ([-1.0, 0.0, 3.0], [-2.0, 0.0, 3.0], [0.5, 1.0, 1.0])
    """

    name = "leaky_relu"

    def __init__(self, negative_slope: float = 0.35):
        if not isinstance(negative_slope, (int, float)) or not math.isfinite(negative_slope) or negative_slope < 0:
            raise ConfigError(f"leaky_relu negative_slope must be a finite number >= 0 (0: a ReLU), got {negative_slope!r}")
        self.negative_slope = float(negative_slope)
        self.invertible = self.negative_slope > 0

    # One or two elementwise kernels each rather than a masked torch.where (slower on CPU, same values bit for bit;
    # the timing is in docs/RESULTS.md, "The leaky-ReLU kernel").
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
    """``s(a) = a``: the linear output layer of the thesis' regression experiments (``D_s = I``).

    >>> s = Identity()
    >>> a = torch.tensor([-2.0, 3.0])
    >>> s(a).tolist(), s.inverse(a).tolist(), s.derivative(a).tolist()
    ([-2.0, 3.0], [-2.0, 3.0], [1.0, 1.0])
    """

    name = "linear"

    def __call__(self, a: Tensor) -> Tensor:
        return a

    def inverse(self, h: Tensor) -> Tensor:
        return h

    def derivative(self, a: Tensor, h: Tensor | None = None) -> Tensor:
        return torch.ones_like(a)


class Tanh(Activation):
    """``s(a) = tanh(a)``, ``D_s = 1 - tanh(a)^2``; the inverse ``atanh`` is taken of ``h`` clamped to
    ``[-1 + eps, 1 - eps]`` (``eps = 1e-6``), so a target outside ``(-1, 1)``, which no input reaches, still maps
    to a finite pre-activation (the thesis does not say what to do there).

    >>> s = Tanh()
    >>> s.derivative(torch.tensor([0.0])).tolist()
    [1.0]
    >>> bool(s.inverse(torch.tensor([1.5])).isfinite())
    True
    """

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
    """``s(a) = max(a, 0)``, for backprop baselines only: it is not invertible (``inverse`` raises ``ValueError``).

    The derivative at exactly ``a = 0`` is taken as 0.

    >>> s = ReLU()
    >>> a = torch.tensor([-1.0, 0.0, 2.0])
    >>> s(a).tolist(), s.derivative(a).tolist(), s.invertible
    ([0.0, 0.0, 2.0], [0.0, 0.0, 1.0], False)
    """

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
    """The :class:`Activation` named ``name``; an :class:`Activation` passes through unchanged.

    Args:
        name: ``leaky_relu``, ``linear`` (alias ``identity``), ``tanh`` or ``relu``, in any case.
        negative_slope: the slope of ``leaky_relu`` (ignored by the others).

    Raises:
        ValueError: for an unknown name, listing the known ones.

    >>> get_activation("leaky_relu", 0.1)
    LeakyReLU(negative_slope=0.1)
    >>> get_activation("Linear")
    Identity()
    """
    if isinstance(name, Activation):
        return name
    key = str(name).lower()
    if key not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    if key == "leaky_relu":
        return LeakyReLU(negative_slope)
    return _ACTIVATIONS[key]()


# --------------------------------------------------------------------------------------------
# Losses and output targets
# --------------------------------------------------------------------------------------------


def label_output(y: Tensor, n_out: int, loss: str | Loss, dtype: torch.dtype | None = None) -> Tensor:
    """The labels in output space (:meth:`tplightning.losses.Loss.labels` of the loss ``loss`` names).

    A label outside ``[0, n_out)`` gets a row of zeros here (checking would read the labels back from the device);
    the rules compute the loss of a batch first, whose cross-entropy refuses it.

    Args:
        y: regression targets ``(B, n_out)`` or integer class labels ``(B,)``.
        n_out: number of classes (used by ``cross_entropy`` only).
        loss: ``mse`` or ``cross_entropy``.
        dtype: dtype of the result (``None``: ``y``'s for ``mse``, the default float dtype for ``cross_entropy``).

    >>> label_output(torch.tensor([2, 0]), 3, "cross_entropy").tolist()
    [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """
    return get_loss(loss).labels(y, n_out, dtype)


def output_error(h_L: Tensor, y: Tensor, loss: str | Loss) -> Tensor:
    """``e_L = dl/dh_L`` of the per-sample loss (eq. 4.5), shape ``(B, n_L)`` (:meth:`tplightning.losses.Loss.error`).

    ``mse``: ``l = 1/2 ||h_L - y||^2`` so ``e_L = h_L - y`` (the thesis' L2 loss, eq. 5.36, per sample and with
    the factor 1/2 that makes ``e_L`` the plain difference); ``cross_entropy`` on logits ``h_L``
    with integer labels ``y``: ``e_L = softmax(h_L) - onehot(y)``.

    Args:
        h_L: network output ``(B, n_L)`` (logits for ``cross_entropy``).
        y: regression targets ``(B, n_L)`` or integer class labels ``(B,)``.
        loss: ``mse`` or ``cross_entropy``.

    >>> output_error(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]]), "mse").tolist()
    [[1.0, -2.0]]
    >>> output_error(torch.zeros(1, 2), torch.tensor([1]), "cross_entropy").tolist()
    [[0.5, -0.5]]
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
    """``(1/B) sum_b delta_b h_{i-1,b}^T``: the weight gradient of a dense layer from its per-sample ``delta``.

    Args:
        delta: per-sample ``delta_b``, ``(B, n_i)`` (e.g. from :func:`local_delta`).
        h_prev: the layer's inputs ``h_{i-1}``, ``(B, n_{i-1})``.

    Returns:
        ``(n_i, n_{i-1})``, the shape of ``W_i``.

    >>> delta_update(torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0, 0.0], [0.0, 2.0]])).tolist()
    [[1.0, 3.0]]
    """
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
    so ``g(f(h)) - h = Q a - h``. The result is ``(1/B) sum_b (Q a_b - h_b) a_b^T``, Alg. A.8's update direction:
    the 1/2 and the batch mean (eq. 4.91 writes the plain squared norm of one sample) make a gradient step
    match Alg. A.8. Adding ``lambda Q`` gives the regularised loss of eq. 4.97 (``lambda ||Q||_F^2 / 2`` in this
    scaling). The bias ``b_{i+1}`` is our addition (the thesis' layers have none).

    Args:
        Q: feedback weights ``(..., n_i, n_{i+1})``; leading dimensions batch independent problems.
        a_next: ``W_{i+1} h_i`` per sample, ``(..., B, n_{i+1})``.
        h: the layer-``i`` activations ``(..., B, n_i)``.

    >>> Q, a_next, h = torch.eye(2), torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    >>> inverse_loss_grad(Q, a_next, h).tolist()  # (Q a - h) a^T with Q a - h = [0, 2]
    [[0.0, 0.0], [2.0, 4.0]]
    """
    return ((a_next @ Q.transpose(-1, -2) - h) / h.shape[-2]).transpose(-1, -2) @ a_next


def original_inverse_loss_grad(Q: Tensor, h_next: Tensor, h: Tensor, activation: Activation) -> Tensor:
    """Gradient of ``mean_b 1/2 ||s(Q h_{i+1}) - h_i||^2`` w.r.t. ``Q``: the original-form inverse loss (Alg. A.9).

    ``g_i(h_{i+1}) = s_i(Q_i h_{i+1})`` (eq. 5.54); ``h`` is the (noise-injected, eq. 3.13) layer-``i``
    activation and ``h_next = f_{i+1}(h)``. The result is ``(1/B) sum_b (D_{s_i}(c_b) (g_b - h_b)) h_{next,b}^T``
    with ``c_b = Q h_{next,b}``; the 1/2 and the batch mean are chosen as in :func:`inverse_loss_grad`.
    Batched like :func:`inverse_loss_grad`; ``s(c)`` is evaluated once.

    Args:
        Q: feedback weights ``(..., n_i, n_{i+1})``.
        h_next: ``h_{i+1} = f_{i+1}(h)`` per sample, ``(..., B, n_{i+1})``.
        h: the (noisy) layer-``i`` activations ``(..., B, n_i)``.
        activation: ``s_i``, an :class:`Activation`.

    >>> Q = torch.tensor([[1.0, 0.0]], requires_grad=True)
    >>> h_next, h, s = torch.tensor([[-2.0, 1.0]]), torch.tensor([[0.0]]), LeakyReLU(0.5)
    >>> (0.5 * ((s(h_next @ Q.T) - h) ** 2).sum(-1).mean()).backward()
    >>> original_inverse_loss_grad(Q.detach(), h_next, h, s).tolist(), Q.grad.tolist()
    ([[1.0, -0.5]], [[1.0, -0.5]])
    """
    c = h_next @ Q.transpose(-1, -2)
    g = activation(c)
    return (activation.derivative(c, g) * (g - h)).transpose(-1, -2) @ h_next / h.shape[-2]


def regularised_inverse(W: Tensor, gamma: float) -> Tensor:
    """``W^T (W W^T + gamma I)^{-1}`` (theorem 4.7); ``W^dagger`` for ``gamma = 0``. Computed in float64.

    The minimiser of the regularised inverse loss (eq. 4.97) with ``gamma = lambda / sigma^2``: the feedback weights
    Alg. A.8 converges to with weight decay ``lambda``. Its singular values are ``s / (s^2 + gamma) <= 1 / (2 sqrt(gamma))``
    where the plain inverse has ``1 / s``, so a nearly singular forward matrix no longer amplifies the propagated
    targets without bound. ``gamma = 0`` is :func:`pinv64`.

    Args:
        W: ``(n, m)`` forward matrix (detached).
        gamma: ``>= 0``.

    >>> W = torch.tensor([[2.0, 0.0]])
    >>> regularised_inverse(W, 0.0).tolist(), regularised_inverse(W, 1.0).flatten().tolist()  # 1/2 and 2/(4 + 1)
    ([[0.5], [0.0]], [0.4000000059604645, 0.0])
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if gamma == 0:
        return pinv64(W)
    Wd = W.detach().double()
    n = Wd.shape[0]
    return torch.linalg.solve(Wd @ Wd.T + gamma * torch.eye(n, dtype=Wd.dtype, device=Wd.device), Wd).T.to(W.dtype)


def cosine(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-sample cosine ``<a_b, b_b> / max(||a_b|| ||b_b||, eps)`` of the rows of ``a`` and ``b`` (flattened per sample).

    A zero row gives 0, not NaN.

    Args:
        a: ``(B, ...)``.
        b: ``(B, ...)``, as many elements per sample as ``a``.
        eps: lower bound of the denominator.

    >>> cosine(torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [6.0, 8.0], [1.0, 0.0]])).tolist()
    [0.0, 1.0, 0.0]
    """
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

    >>> W = torch.eye(2)
    >>> u, v = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])  # d = 1: no clipping
    >>> W_new, W_inv_new, beta = robust_sherman_morrison(W, W, u, v, 0.5)
    >>> W_new.tolist(), W_inv_new.tolist(), beta.item()
    ([[2.0, 0.0], [0.0, 1.0]], [[0.5, 0.0], [0.0, 1.0]], 1.0)
    >>> W_new, W_inv_new, beta = robust_sherman_morrison(W, W, -u, v, 0.5)  # d = -1: W + u v^T singular
    >>> round(beta.item(), 4), torch.allclose(W_new @ W_inv_new, torch.eye(2))  # beta = 1 / (0.5 - (-1))
    (0.6667, True)
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
        W: ``(n, n)`` forward matrix.
        W_inv: its inverse.
        U: ``(n, B)``, the columns ``u_b``.
        V: ``(n, B)``, the columns ``v_b``.
        threshold: ``epsilon``.

    Returns:
        ``(W_new, W_inv_new, beta, sigma_min(C))`` with ``beta`` and ``sigma_min(C)`` 0-d tensors.

    >>> W = torch.eye(3)
    >>> U, V = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> W_new, W_inv_new, beta, s_min = robust_woodbury(W, W, U, V, 0.5)
    >>> W_new.diagonal().tolist(), W_inv_new.diagonal().tolist(), beta.item(), s_min.item()
    ([2.0, 2.0, 1.0], [0.5, 0.5, 1.0], 1.0, 2.0)
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

    The thesis uses ``tau = 0.4`` (section 5.1.3). Of the section's two tests (``sigma_min`` alone, or the product
    ``sigma_min * sigma_max``) we take the product, the one the thesis recommends and uses. With ``batch``,
    ``batch`` independent matrices ``(batch, n, cols)`` (``cols`` defaults to ``n``; the same test for non-square
    ones), failing ones redrawn until all pass; ``diagonal`` draws diagonal ones, like the ``D_{s_i}`` of fig. 5.12.

    Args:
        n: rows (and columns unless ``cols`` is given).
        tau: the threshold ``tau_init``.
        std: standard deviation of the entries.
        max_attempts: draws before giving up (large ``n`` with small ``std`` rarely passes: the expected
            ``sigma_min`` is ``O(std / sqrt(n))``).
        generator: ``torch.Generator`` of the draws.
        dtype: dtype of the result (``None``: the default).
        batch: number of independent matrices (``None``: one ``(n, n)`` matrix).
        cols: columns of the batched matrices.
        diagonal: draw diagonal matrices (batched only).

    Raises:
        ValueError: after ``max_attempts`` draws without success, or for a non-square ``diagonal``.

    >>> W = robust_invertible_gaussian(4, generator=torch.Generator().manual_seed(0))
    >>> tuple(W.shape), is_robustly_invertible(W, 0.4)
    ((4, 4), True)
    >>> robust_invertible_gaussian(2, batch=3, cols=5, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([3, 2, 5])
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
    """``sigma_min(W) * sigma_max(W) > tau`` for a square ``W`` (the thesis' initialisation test, section 4.2.3).

    The singular values come from :func:`singular_values64`; a non-square ``W`` is never accepted.

    >>> W = torch.tensor([[2.0, 0.0], [0.0, 0.25]])  # sigma_max sigma_min = 0.5
    >>> is_robustly_invertible(W, 0.4), is_robustly_invertible(W, 0.6)
    (True, False)
    """
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        return False
    s = singular_values64(W)
    return bool(s[-1] * s[0] > tau)


# --------------------------------------------------------------------------------------------
# Float64 linear algebra and the product of weights, shared by the maps, the diagnostics and dynamics/
# --------------------------------------------------------------------------------------------


def inverse64(W: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``W^{-1}`` of a square matrix, computed in float64 (LU) and returned in ``dtype`` (default: ``W``'s).

    The exact inverses of the thesis (eq. 4.16, eq. 6.4) start from it and the drift guard of the
    Sherman-Morrison updates restores it; float64 keeps the digits a float32 LU loses on ill-conditioned
    weights. ``W`` is detached: the result is a value, not part of an autograd graph.

    Args:
        W: ``(..., n, n)`` matrix (or a batch of them).
        dtype: dtype of the result (``None``: ``W``'s).

    >>> inverse64(torch.tensor([[2.0, 0.0], [1.0, 1.0]])).tolist()
    [[0.5, 0.0], [-0.5, 1.0]]
    """
    return torch.linalg.inv(W.detach().double()).to(W.dtype if dtype is None else dtype)


def pinv64(W: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The Moore-Penrose pseudo-inverse ``W^dagger`` (SVD), computed in float64 and returned in ``dtype`` (default: ``W``'s).

    ``W^dagger = V S^{-1} U^T`` for ``W = U S V^T``; ``W^T (W W^T)^{-1}`` when ``W`` has full row rank. It initialises
    the learned feedback ``Q = W^dagger`` (section 5.2.2) and is the factor of the Gauss-Newton signal (eq. 5.60).
    ``W`` is detached.

    Args:
        W: ``(..., n, m)`` matrix.
        dtype: dtype of the result (``None``: ``W``'s).

    >>> pinv64(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])).tolist()
    [[1.0, 0.0], [0.0, 0.5], [0.0, 0.0]]
    """
    return torch.linalg.pinv(W.detach().double()).to(W.dtype if dtype is None else dtype)


def singular_values64(W: Tensor) -> Tensor:
    """The singular values ``sigma_1 >= ... >= sigma_min`` of ``W``, computed and returned in float64.

    The tests of invertibility read them: ``sigma_min sigma_max > tau`` (section 4.2.3), the condition number
    ``sigma_max / sigma_min`` before an exact inverse, ``sigma_min`` of a square layer of the chapter-6 networks.

    Args:
        W: ``(..., n, m)`` matrix; ``W`` is detached.

    >>> singular_values64(torch.tensor([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [5.0, 0.0]
    """
    return torch.linalg.svdvals(W.detach().double())


def weight_product(weights: Sequence[Tensor]) -> Tensor:
    """``W_k ... W_2 W_1`` of ``weights = [W_1, ..., W_k]``, the first factor applied first.

    With ``weights = [W_{i+1}, ..., W_L]`` this is ``J = W_L ... W_{i+1}``, the Jacobian of the linear network from
    layer ``i`` to the output, ``(n_L, n_i)``: DDTP-linear's Gauss-Newton feedback ``J^dagger`` and the path DFA's
    feedback is compared with. Accumulated from the left, ``J <- W_{k} J``, in the weights' own dtype.

    Args:
        weights: matrices ``W_j`` of shape ``(n_j, n_{j-1})``, in the order they act (at least one).

    >>> weight_product([torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])]).tolist()
    [[3.0, 6.0], [4.0, 8.0]]
    """
    if not weights:
        raise ValueError("weight_product needs at least one matrix")
    J = weights[0]
    for W in weights[1:]:
        J = W @ J
    return J
