"""Target maps as values: ``g_i`` with its feedback parameters and its feedback-training rule (pure torch).

A target map turns the target of layer ``i + 1`` into the target of layer ``i``. Each map is an
``nn.Module`` bound to the layers below and above it (``lower = f_i``, ``upper = f_{i+1}``):

* :class:`ExactInverse` ``g_i(h) = W_{i+1}^{-1} (s_{i+1}^{-1}(h) - b)`` (eq. 4.16); ``W^{-1}`` is a buffer
  kept exact under every update of ``W_{i+1}`` by the robust Sherman-Morrison (Alg. 4.1) or Woodbury
  update, so this map also *owns* the forward update of ``W_{i+1}`` (:attr:`keeps_upper_weight`);
* :class:`ThesisInverse` ``g_i(h) = Q_i (s_{i+1}^{-1}(h) - b)`` (eq. 4.90 / 5.51), ``Q`` trained by Alg. A.8 on
  white noise with the regularised inverse loss (eq. 4.97);
* :class:`OriginalInverse` ``g_i(h) = s_i(Q_i h)`` (eq. 5.54; Bengio 2014, Lee et al. 2015), ``Q`` trained by
  Alg. A.9 on the current activations with optional noise injection (eq. 3.13);
* :class:`GradientTarget` ``h^_i = h_i - eta^ dl/dh_i`` for the layer below the output (Lee et al. 2015's
  penultimate target), which needs no feedback weights;
* :class:`FeedbackAlignment` and its family (:class:`SignSymmetry`, :class:`KolenPollack`, :class:`WeightMirror`)
  carry feedback weights ``B`` in place of ``W^T`` (feedback-alignment "targets");
* :class:`Difference` wraps any of them: ``h^_i = h_i + g_i(h^_{i+1}) - g_i(h_{i+1})`` (eq. 4.101);
* :class:`DifferenceReconstruction` (DRL, Meulemans et al. 2020) and :class:`LocalDifferenceReconstruction` (L-DRL,
  Ernoult et al. 2022): the original form ``s_i(Q_i h)`` trained by their feedback losses instead of Alg. A.9;
  :class:`DirectLinear` (DDTP-linear, Meulemans et al. 2020): ``h^_i = h_i + Q_i (h^_L - h_L)``, ``Q_i`` trained by the DRL.

With a dense ``f_{i+1}`` the maps and their feedback gradients are closed forms; with a convolution
``Q`` is a transposed convolution (see :meth:`tplightning.layers.Layer.transpose`) and the feedback
gradient comes from autograd on the same loss. With a block ``f_{i+1}`` (:class:`~tplightning.blocks.Block`, any
``nn.Module``) the learned maps hold the block's feedback *module* ``G_{i+1}`` where they would hold ``Q``
(:attr:`_LearnedMap.operator`; ``transpose`` applies it), with the same losses and autograd gradients over its
parameters; the maps that need a matrix or ``s^{-1}`` (exact inverses, the thesis form) refuse a block by name.

A map sees one training step through a :class:`Step`: the forward pass ``[h_0..h_L]``, ``[a_1..a_L]``,
(for :class:`GradientTarget`) the output error ``e_L = dl/dh_L`` and ``eta^``, and (for the DRL maps, whose loss runs a
corrupted activation up to the output and back) the network's layers and maps.
"""
from __future__ import annotations

import contextlib
import functools
import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from . import functional as F
from .errors import ConfigError
from .blocks import Block
from .layers import FEEDBACK_LAWS, AuxiliaryDense, Conv2d, Dense, Layer, random_feedback, sign_feedback_scales

__all__ = [
    "Step",
    "TargetMap",
    "ExactInverse",
    "ThesisInverse",
    "OriginalInverse",
    "GradientTarget",
    "FeedbackAlignment",
    "TrainedFeedback",
    "SignSymmetry",
    "KolenPollack",
    "WeightMirror",
    "mirror_product",
    "DirectFeedback",
    "Difference",
    "plain",
    "DifferenceReconstruction",
    "LocalDifferenceReconstruction",
    "DirectLinear",
    "FixedInverse",
]


@dataclass
class Step:
    """What a map may read of one training step: ``hs = [h_0..h_L]``, ``pre = [a_1..a_L]``; ``output_error()``
    returns ``e_L = dl/dh_L`` (computed once, on first use) and ``target_stepsize`` is ``eta^``; ``layers`` are
    ``[f_1..f_L]`` and ``maps`` ``[g_1..g_{L-1}]`` (bound), for the feedback losses that need the path to the output.
    ``memo`` keeps what a map computes at the step's own activations until its weights change (:meth:`TargetMap.at_own`).

    >>> step = Step([torch.zeros(2, 3)], [], 0.1, error_fn=lambda: torch.ones(2, 1))
    >>> step.output_error()
    tensor([[1.],
            [1.]])
    """

    hs: list[Tensor]
    pre: list[Tensor]
    target_stepsize: float = 0.0
    error_fn: Callable[[], Tensor] | None = None
    output_target: Tensor | None = None  # h^_L, once computed
    layers: Sequence[Layer] = ()
    maps: Sequence["TargetMap"] = ()
    _error: Tensor | None = field(default=None, repr=False)
    memo: dict = field(default_factory=dict, repr=False)
    feedback_losses: list | None = field(default=None, repr=False)  # a list: each map appends its feedback loss's value

    def report_loss(self, loss: Callable[[], Tensor]) -> None:
        """Append ``loss()`` to :attr:`feedback_losses` when the step collects them (the stopping rule of a feedback
        schedule); otherwise nothing is computed."""
        if self.feedback_losses is not None:
            self.feedback_losses.append(loss().detach())

    def output_error(self) -> Tensor:
        if self._error is None:
            if self.error_fn is None:
                raise ValueError("this step carries no output error (no labels were given)")
            self._error = self.error_fn()
        return self._error


class TargetMap(nn.Module, metaclass=ABCMeta):
    """Base of the maps (abstract). :meth:`bind` attaches the layers; subclasses define :meth:`forward` (``g_i``).

    A concrete map bound to two dense layers:

    >>> lower, upper = Dense(3, 3), Dense(3, 3, activation="linear")
    >>> g = OriginalInverse(init="random").bind(1, lower, upper)
    >>> g(torch.zeros(2, 3)).shape
    torch.Size([2, 3])
    """

    #: sets the target itself rather than inverting the layer above (diagnostics: ``e^TP_i = Delta_i``)
    direct: bool = False
    #: the map keeps ``W_{i+1}``'s exact inverse and therefore applies ``W_{i+1}``'s update itself
    keeps_upper_weight: bool = False

    def bind(self, index: int, lower: Layer, upper: Layer) -> "TargetMap":
        """Attach to layers ``index`` (``lower``) and ``index + 1`` (``upper``); returns ``self``."""
        self.index = index
        self._layers = (lower, upper)  # a tuple: the layers belong to the network, not to the map
        self.check_layers(lower, upper)
        return self

    @property
    def lower(self) -> Layer:
        return self._layers[0]

    @property
    def upper(self) -> Layer:
        return self._layers[1]

    @property
    def base(self) -> "TargetMap":
        """The map itself (:class:`Difference` returns the map it wraps)."""
        return self

    def check_layers(self, lower: Layer, upper: Layer) -> None:
        """Raise :class:`~tplightning.errors.ConfigError` when the map cannot serve these layers."""

    @abstractmethod
    def forward(self, h_next: Tensor) -> Tensor:
        """``g_i(h_{i+1})`` for a batch of layer-``(i+1)`` activations."""

    def _shape(self, v: Tensor) -> Tensor:
        return v.reshape(v.shape[0], *self.lower.out_shape)

    def target(self, h_hat_next: Tensor, step: Step) -> Tensor:
        """Plain target ``h^_i = g_i(h^_{i+1})``."""
        return self(h_hat_next)

    def denormalised(self, t: Tensor, step: Step, mu: Tensor, sigma: Tensor) -> Tensor:
        """The target of layer ``i``'s output from :meth:`target`'s ``t`` when layer ``i + 1`` normalises its input
        (Alg. A.1): ``g_i`` inverts onto the normalised input ``(h_i - mu) / sigma``, so ``sigma t + mu``; a direct map
        targets ``h_i`` itself and keeps ``t``.

        >>> from tplightning.layers import Dense
        >>> g = OriginalInverse(init="random").bind(1, Dense(2, 2), Dense(2, 2))
        >>> g.denormalised(torch.ones(1, 2), None, mu=torch.tensor([1.0, 0.0]), sigma=torch.tensor([2.0, 3.0])).tolist()
        [[3.0, 3.0]]
        """
        return t if self.direct else sigma * t + mu

    def difference_target(self, h_hat_next: Tensor, step: Step) -> Tensor:
        """``h_i + g_i(h^_{i+1}) - g_i(h_{i+1})`` (eq. 4.101)."""
        return step.hs[self.index] + self(h_hat_next) - self.at_own(step)

    def at_own(self, step: Step) -> Tensor:
        """``g_i(h_{i+1})`` at the step's own activation, computed once per step and weights: every difference target
        through this map needs it, and the DRL of each layer below runs through this map (:class:`DifferenceReconstruction`)."""
        return self._memo(step, self.__call__)

    def _memo(self, step: Step, fn: Callable[[Tensor], object]):
        """``fn(h_{i+1})`` kept in ``step.memo`` under this map's index and the versions of its and ``f_{i+1}``'s weights and
        buffers, so an in-place update of any (an optimizer step) computes it afresh."""
        tensors = [*self.parameters(), *self.buffers(), *self.upper.parameters(), *self.upper.buffers()]
        key = (self.index, *(t._version for t in tensors))
        if key not in step.memo:
            step.memo[key] = fn(step.hs[self.index + 1])
        return step.memo[key]

    def feedback_parameters(self) -> list[Tensor]:
        return [p for p in self.parameters() if p.requires_grad]

    def feedback_grads(self, step: Step, noise: Callable[[tuple[int, ...]], Tensor]) -> dict[Tensor, Tensor]:
        """``{Q: gradient}`` of this map's feedback loss for one step; empty for maps without learned weights."""
        return {}

    def on_weights_changed(self) -> None:
        """Recompute state derived from the forward weights (they were replaced)."""

    def has_closed_form(self) -> bool:
        """Whether :meth:`set_closed_form` can set the map to the minimiser of its feedback loss (a feedback schedule's
        ``closed_form``); maps whose loss has none (or none this library computes) say no."""
        return False

    def set_closed_form(self) -> None:
        """Set the feedback weights to the minimiser of this map's feedback loss (where :meth:`has_closed_form`)."""
        raise ValueError(f"{type(self).__name__} has no closed-form feedback weights")


class _LinearAfterInverse(TargetMap):
    """``g_i(h) = M (s_{i+1}^{-1}(h) - b_{i+1})``: the exact inverse (``M = W^{-1}``) and the thesis form (``M = Q``)."""

    @abstractmethod
    def matrix(self) -> Tensor:
        """``M``: ``W_{i+1}^{-1}`` or ``Q_i``."""

    def check_layers(self, lower, upper):
        if not upper.matrix_structure:
            raise ConfigError(
                f"layer {self.index + 1} is a {upper.describe()}: {type(self).__name__}'s g_{self.index}(h) = M s^-1(h) needs a "
                "layer s(W h + b) with a weight matrix and an invertible activation; use an original-form map (OriginalDTP, LeeDTP, DRL, LDRL, DDTPLinear)"
            )
        if not upper.activation.invertible:
            raise ConfigError(
                f"layer {self.index + 1} activation {upper.activation!r} has no inverse, which g_{self.index}(h) = M s^-1(h) needs; "
                "use leaky_relu with negative_slope > 0, tanh or linear, or an original-form map"
            )

    def forward(self, h_next):
        return self._shape(self.upper.transpose(self.upper.pre_output(h_next), self.matrix()))

    def difference_target(self, h_hat_next, step):
        """One matmul: ``g`` is linear after ``s^{-1}``, so ``g(h^) - g(h) = M (s^{-1}(h^) - a_{i+1})``."""
        i = self.index
        v = self.upper.activation.inverse(h_hat_next) - step.pre[i]
        return step.hs[i] + self._shape(self.upper.transpose(v, self.matrix()))


class ExactInverse(_LinearAfterInverse):
    """``g_i(h) = W_{i+1}^{-1} s_{i+1}^{-1}(h)`` with ``W^{-1}`` kept exact (thesis 4.1, Alg. 4.1, A.4-A.6).

    The map owns ``W_{i+1}``'s forward update: :meth:`rank_update` applies ``W <- W + beta U V^T`` and
    updates ``W^{-1}`` by the robust Sherman-Morrison (rank 1) or Woodbury (rank B) formula
    (:func:`~tplightning.functional.robust_sherman_morrison`, :func:`~tplightning.functional.robust_woodbury`).
    Needs a square dense ``f_{i+1}`` with an invertible activation.

    Args:
        threshold: ``epsilon`` of the robust update (thesis 0.5).
        tau_init: a weight is acceptable when ``sigma_min sigma_max > tau_init`` (section 4.2.3).
        inverse_tolerance: the drift guard re-inverts ``W`` when the probed ``|(W W^{-1} - I) r|_inf / |r|_inf``
            exceeds it (against the round-off of chained updates, cf. fig. 5.8).

    >>> lower, upper = Dense(2, 2), Dense(2, 2, activation="linear")
    >>> with torch.no_grad():
    ...     _ = upper.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    >>> g = ExactInverse().bind(1, lower, upper)
    >>> g(torch.tensor([[2.0, 4.0]]))
    tensor([[1., 1.]])
    """

    keeps_upper_weight = True

    def __init__(self, threshold: float = 0.5, tau_init: float = 0.4, inverse_tolerance: float = 1e-4):
        super().__init__()
        if not threshold > 0:
            raise ConfigError(f"threshold (epsilon) must be > 0, got {threshold}")
        self.threshold, self.tau_init, self.inverse_tolerance = threshold, tau_init, inverse_tolerance
        self.reset_stats()

    def check_layers(self, lower, upper):
        if not upper.supports_exact_inverse:
            raise ConfigError(
                f"an exact inverse of layer {self.index + 1} ({upper.describe()}) "
                "is not available: exact inverses need square dense layers; use a learned map (ThesisInverse, OriginalInverse)"
            )
        super().check_layers(lower, upper)
        n = upper.weight.shape[0]
        self.register_buffer("W_inv", torch.empty(n, n, dtype=upper.weight.dtype, device=upper.weight.device))
        self.refresh()

    def matrix(self):
        return self.W_inv

    @torch.no_grad()
    def refresh(self) -> None:
        """``W^{-1}`` from ``W`` in float64; ``ValueError`` for a (numerically) singular ``W``."""
        W = self.upper.weight
        s = F.singular_values64(W)
        if not bool(s[-1] > 0) or not bool(torch.isfinite(s).all()) or float(s[0] / s[-1]) > 1e12:
            raise ValueError(f"W_{self.index + 1} is singular or numerically singular (singular values {s.tolist()})")
        self.W_inv.copy_(F.inverse64(W))

    def on_weights_changed(self):
        self.refresh()

    def accepts(self, W: Tensor) -> bool:
        return F.is_robustly_invertible(W, self.tau_init)

    @torch.no_grad()
    def rank_update(self, U: Tensor, V: Tensor) -> None:
        """``W <- W + beta U V^T`` and its exact inverse (``U, V`` of shape ``(n, B)``; ``beta`` by Alg. 4.1)."""
        W, W_inv = self.upper.weight, self.W_inv
        if U.shape[1] == 1:
            W_new, inv_new, beta = F.robust_sherman_morrison(W, W_inv, U[:, 0], V[:, 0], self.threshold)
            s_min = (1 + V[:, 0] @ W_inv @ U[:, 0]).abs()
        else:
            W_new, inv_new, beta, s_min = F.robust_woodbury(W, W_inv, U, V, self.threshold)
        W.copy_(W_new)
        W_inv.copy_(inv_new)
        st = self.stats
        st["updates"] += 1
        st["clipped"] = st["clipped"].to(beta.device) + (beta < 1).float()
        st["min_capacitance"] = torch.minimum(st["min_capacitance"].to(beta.device), s_min.float())

    def reset_stats(self) -> None:
        self.stats = {"updates": 0, "clipped": torch.zeros(()), "min_capacitance": torch.tensor(float("inf"))}

    @torch.no_grad()
    def probe_error(self, seed: int, probes: int = 4) -> Tensor:
        """O(n^2) estimate of the drift: ``max_r |(W W^{-1} - I) r|_inf / |r|_inf`` over seeded Gaussian probes."""
        W, W_inv = self.upper.weight, self.W_inv
        g = torch.Generator(W.device).manual_seed(seed)
        R = torch.randn(W.shape[0], probes, generator=g, device=W.device, dtype=W.dtype)
        return ((W @ (W_inv @ R) - R).abs().amax(0) / R.abs().amax(0)).max()

    @torch.no_grad()
    def sigma_min(self, iterations: int = 8) -> Tensor:
        """O(n^2) estimate of ``sigma_min(W) = 1/||W^{-1}||_2`` by power iteration on ``W^{-1}``."""
        v = torch.ones(self.W_inv.shape[1], device=self.W_inv.device, dtype=self.W_inv.dtype)
        for _ in range(iterations):
            v = self.W_inv.T @ (self.W_inv @ v)
            v = v / v.norm()
        return 1 / (self.W_inv @ v).norm()

    @torch.no_grad()
    def guard(self, seed: int) -> tuple[dict[str, Tensor], bool]:
        """Drift guard and O(n^2) diagnostics: ``(logs, reinverted)``; re-inverts (O(n^3), rare) past the tolerance."""
        i = self.index + 1
        err = self.probe_error(seed)
        logs = {f"inverse/error_{i}": err, f"inverse/sigma_min_{i}": self.sigma_min()}
        if self.stats["updates"]:
            logs[f"inverse/clipped_fraction_{i}"] = self.stats["clipped"] / self.stats["updates"]
            logs[f"inverse/min_capacitance_{i}"] = self.stats["min_capacitance"]
        reinvert = float(err) > self.inverse_tolerance
        if reinvert:
            self.W_inv.copy_(F.inverse64(self.upper.weight))
        self.reset_stats()
        return logs, reinvert


#: the initial feedback weights of the learned maps: the forward weights' (regularised) pseudo-inverse, or a random draw
#: under one of :data:`~tplightning.layers.FEEDBACK_LAWS`
LEARNED_INITS = ("pinv", "regularised", *FEEDBACK_LAWS)


def check_feedback_options(noise_std: float, weight_decay: float, init: str) -> None:
    """:class:`~tplightning.errors.ConfigError` for a negative noise std or weight decay, or an unknown initialisation.

    >>> check_feedback_options(1.0, 0.0, "pinv")
    >>> check_feedback_options(1.0, 0.0, "zeros")
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: feedback_init must be one of 'pinv', 'regularised', 'random', 'xavier_normal', 'xavier_uniform', got 'zeros'
    """
    if noise_std < 0 or weight_decay < 0:
        raise ConfigError(f"feedback_noise_std and feedback_weight_decay must be >= 0, got {noise_std} and {weight_decay}")
    if init not in LEARNED_INITS:
        raise ConfigError(f"feedback_init must be one of {', '.join(map(repr, LEARNED_INITS))}, got {init!r}")
    if init == "regularised" and not (weight_decay > 0 and noise_std > 0):
        raise ConfigError(
            "feedback_init='regularised' is theorem 4.7's inverse for lambda = feedback_weight_decay > 0 and "
            f"sigma = feedback_noise_std > 0, got {weight_decay} and {noise_std}"
        )


class _LearnedMap(TargetMap):
    """Shared parts of the learned maps: ``Q`` (shape of ``f_{i+1}``'s transpose), its initialisation and loss options.

    Args:
        noise_std: ``sigma`` of Alg. A.8's white noise (thesis form) or of eq. 3.13's noise injection (original form).
        weight_decay: ``lambda`` of the regularised inverse loss (eq. 4.97): the gradient gains ``lambda Q``.
        init: ``pinv`` (``Q = W_{i+1}^dagger``, the thesis' experiments, section 5.2.2; the adjoint ``W^T`` for
            convolutions), ``regularised`` (theorem 4.7's ``W^T (W W^T + lambda/sigma^2 I)^{-1}``, the fixed point the
            regularised feedback training moves to; :func:`~tplightning.functional.regularised_inverse`) or a random draw:
            ``random`` (Gaussian, std ``1/sqrt(fan-in)``), ``xavier_normal`` or ``xavier_uniform`` (Glorot & Bengio 2010;
            :func:`~tplightning.layers.random_feedback`). ``pinv`` and ``regularised`` draw the random ``Q`` first too
            (the global generator moves as for ``random``).
    """

    def __init__(self, noise_std: float = 1.0, weight_decay: float = 0.0, init: str = "pinv"):
        super().__init__()
        check_feedback_options(noise_std, weight_decay, init)
        self.noise_std, self.weight_decay, self.init = noise_std, weight_decay, init

    @property
    def law(self) -> str:
        """The law of the first random draw of ``Q`` (:func:`~tplightning.layers.random_feedback`): ``init``'s, or ``random``
        before a pseudo-inverse replaces it."""
        return self.init if self.init in FEEDBACK_LAWS else "random"

    @property
    def inverts(self) -> bool:
        """Whether ``Q`` starts as (and is reset to) the forward weights' pseudo-inverse (``init`` ``pinv`` or ``regularised``)."""
        return self.init not in FEEDBACK_LAWS

    def check_layers(self, lower, upper):
        super().check_layers(lower, upper)
        M = upper.make_feedback(self.law)  # Q: a matrix of the shape of W_{i+1}^T; a block's feedback module G_{i+1}
        if isinstance(M, nn.Parameter):
            self.Q = M
        else:
            self.feedback_module = M
        if self.inverts:
            self.init_pinv()

    @property
    def operator(self) -> Tensor | nn.Module:
        """What ``f_{i+1}``'s :meth:`~tplightning.layers.Layer.transpose` applies: the matrix ``Q``, or for a block the
        feedback module (:meth:`~tplightning.blocks.Block.make_feedback`)."""
        return self.Q if "Q" in self._parameters else self.feedback_module

    def matrix(self):
        return self.operator

    @torch.no_grad()
    def init_pinv(self) -> None:
        """``Q = W^dagger``, or theorem 4.7's regularised inverse with ``gamma = lambda / sigma^2`` for ``init='regularised'``."""
        gamma = self.weight_decay / self.noise_std**2 if self.init == "regularised" else 0.0
        self.upper.init_feedback(self.operator, gamma)

    def on_weights_changed(self):
        if self.inverts:
            self.init_pinv()

    def _decayed(self, grad: Tensor | dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """``{parameter: gradient + lambda parameter}`` from the gradient of ``Q`` or the ``{parameter: gradient}`` of a
        feedback module."""
        grads = grad if isinstance(grad, dict) else {self.Q: grad}
        return {p: g + self.weight_decay * p for p, g in grads.items()} if self.weight_decay else grads

    def _autograd(self, loss_of_Q: Callable[[Tensor | nn.Module], Tensor]) -> Tensor | dict[Tensor, Tensor]:
        """The gradient of ``loss_of_Q(operator)``: of ``Q`` (a tensor), or ``{parameter: gradient}`` of a feedback module."""
        with torch.enable_grad():
            if "Q" in self._parameters:
                Q = self.Q.detach().requires_grad_(True)
                return torch.autograd.grad(loss_of_Q(Q), Q)[0]
            params = [p for p in self.feedback_module.parameters() if p.requires_grad]
            return dict(zip(params, torch.autograd.grad(loss_of_Q(self.feedback_module), params)))


class ThesisInverse(_LearnedMap, _LinearAfterInverse):
    """``g_i(h) = Q_i s_{i+1}^{-1}(h)`` (eq. 4.90), ``Q`` trained on white noise by Alg. A.8.

    Alg. A.8 draws ``h_i ~ N(0, sigma^2 I)`` and minimises ``mean_b 1/2 ||g_i(f_{i+1}(h_i)) - h_i||^2`` (+ ``lambda/2 ||Q||^2``,
    eq. 4.97), whose minimiser is ``W^T (W W^T + lambda/sigma^2 I)^{-1}`` (theorem 4.7). ``g(f(h)) = Q W h``, so the
    gradient is :func:`~tplightning.functional.inverse_loss_grad`.

    The other arguments are those of :class:`_LearnedMap`.

    Args:
        batch_size: noise samples per update (``None``: the training batch size).

    >>> lower, upper = Dense(2, 2), Dense(2, 2, activation="linear")
    >>> g = ThesisInverse().bind(1, lower, upper)  # Q = W^dagger at the start (init="pinv")
    >>> torch.allclose(g(upper(torch.ones(1, 2))), torch.ones(1, 2), atol=1e-5)
    True
    """

    def __init__(self, noise_std: float = 1.0, weight_decay: float = 0.0, init: str = "pinv", batch_size: int | None = None):
        super().__init__(noise_std, weight_decay, init)
        if not noise_std > 0:
            raise ConfigError("feedback_noise_std must be > 0 for the thesis form: Alg. A.8 learns Q from white noise of that std")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"feedback_batch_size must be >= 1 (or None for the training batch size), got {batch_size}")
        self.batch_size = batch_size

    def has_closed_form(self):
        return isinstance(self.upper, Dense)

    @torch.no_grad()
    def set_closed_form(self):
        """``Q = W^T (W W^T + lambda/sigma^2 I)^{-1}`` (``W = W_{i+1}``), the minimiser of Alg. A.8's regularised loss
        (theorem 4.7; ``W^dagger`` for ``lambda = 0``, theorem 4.6), computed in float64.

        >>> upper = Dense(3, 2, activation="linear")
        >>> g = ThesisInverse(init="random").bind(1, Dense(3, 3), upper)
        >>> g.set_closed_form()
        >>> torch.allclose(g.Q, torch.linalg.pinv(upper.weight.detach()), atol=1e-6)
        True
        """
        if not self.has_closed_form():
            raise ValueError(f"ThesisInverse's closed form needs a dense layer above, got {type(self.upper).__name__}")
        self.upper.init_feedback(self.Q, self.weight_decay / self.noise_std**2)

    def feedback_grads(self, step, noise):
        B = self.batch_size or step.hs[0].shape[0]
        h = self.noise_std * noise((B, *self.lower.out_shape))
        a_next = self.upper.linear_out(h)  # s^-1(f_{i+1}(h)) - b = W h
        step.report_loss(lambda: 0.5 * (self._shape(self.upper.transpose(a_next, self.operator)) - h).pow(2).sum() / B)
        if self.upper.closed_form:
            return self._decayed(F.inverse_loss_grad(self.Q, a_next, h.flatten(1)))
        return self._decayed(self._autograd(lambda Q: 0.5 * (self._shape(self.upper.transpose(a_next, Q)) - h).pow(2).sum() / B))


_IDENTITY = F.get_activation("linear")


class OriginalInverse(_LearnedMap):
    """``g_i(h) = s_i(Q_i h)`` (eq. 5.54), ``Q`` trained by Alg. A.9 on the current activations.

    Alg. A.9 minimises ``mean_b 1/2 ||g_i(f_{i+1}(h_i)) - h_i||^2`` at the layer's activations, here with the noise
    injection of eq. 3.13 (``h_i + sigma eps``; ``sigma = 0`` disables it). Any activation works (no inverse needed).

    With ``bias``, ``g_i(h) = s_i(Q_i h + d_i)``: a feedback bias ``d_i`` inside the nonlinearity, initialised at 0 and
    trained by the same feedback loss (with the same weight decay), as the feedback bias of Meulemans et al. (2020)'s
    code (``lib/dtp_layers.py``, ``DTPLayer.propagate_backward``: ``t(Q h + d)``; ``nn.init.constant_(feedbackbias, 0)``;
    their feedback optimizer holds weights and biases with one weight decay). Dense layers above only.

    The other arguments are those of :class:`_LearnedMap`.

    Args:
        bias: learn a feedback bias ``d_i`` (a parameter ``d`` of ``n_i`` units).

    >>> lower, upper = Dense(2, 2, activation="linear"), Dense(2, 2, activation="linear")
    >>> g = OriginalInverse().bind(1, lower, upper)  # Q = W^dagger at the start
    >>> torch.allclose(g(upper(torch.ones(1, 2))), torch.ones(1, 2), atol=1e-5)
    True
    >>> OriginalInverse(bias=True).bind(1, lower, upper).d
    Parameter containing:
    tensor([0., 0.], requires_grad=True)
    """

    def __init__(self, noise_std: float = 1.0, weight_decay: float = 0.0, init: str = "pinv", bias: bool = False):
        super().__init__(noise_std, weight_decay, init)
        self.bias = bool(bias)

    def check_layers(self, lower, upper):
        super().check_layers(lower, upper)
        if self.bias:
            if not upper.closed_form:
                raise ConfigError(f"feedback_bias needs a dense layer above layer {self.index}, got {upper.describe()}")
            W = upper.weight
            self.d = nn.Parameter(torch.zeros(lower.out_features, dtype=W.dtype, device=W.device))

    def forward(self, h_next):
        return self.evaluate(h_next)[1]

    @property
    def feedback_activation(self):
        """``s_i`` of ``g_i(h) = s_i(Q_i h)``: the lower layer's activation."""
        return self.lower.activation

    def evaluate(self, h_next: Tensor) -> tuple[Tensor, Tensor]:
        """``(Q h + d, s_i(Q h + d))`` (``d`` with ``bias`` only): the feedback gradients reuse the pre-activation
        (:meth:`q_grad`)."""
        c = self.upper.transpose(h_next, self.operator)
        if self.bias:
            c = c + self.d
        return c, self.feedback_activation(self._shape(c))

    def at_own(self, step):
        return self.own_evaluation(step)[1]

    def own_evaluation(self, step: Step) -> tuple[Tensor, Tensor]:
        """:meth:`evaluate` at ``h_{i+1}``, once per step and weights (:meth:`TargetMap.at_own`)."""
        return self._memo(step, self.evaluate)

    def q_grad(self, terms: Sequence[tuple]) -> Tensor:
        """``d/dQ sum_k <u_k, g_i(v_k)>`` for terms ``(v_k, u_k)`` or ``(v_k, u_k, evaluate(v_k))``: the chain rule through
        ``g_i(v) = s_i(Q v)``, which every feedback loss of this form ends with (``u_k = dloss/dg_i(v_k)``). Closed form
        ``sum_k (u_k * s'(Q v_k))^T v_k`` for a dense layer above (reusing ``evaluate(v_k)`` when a term brings it),
        autograd otherwise. With a feedback bias, ``{Q: that, d: sum_k sum_b (u_k * s'(Q v_k + d))}``."""
        if self.upper.closed_form:
            act, grad, grad_d = self.feedback_activation, 0, 0
            for v, u, *known in terms:
                c, out = known[0] if known else self.evaluate(v)
                du = u.flatten(1) * act.derivative(c, out.reshape(c.shape))
                grad = grad + du.T @ v
                if self.bias:
                    grad_d = grad_d + du.sum(0)
            return {self.Q: grad, self.d: grad_d} if self.bias else grad
        act = self.feedback_activation
        return self._autograd(lambda Q: sum((u * act(self._shape(self.upper.transpose(v, Q)))).sum() for v, u, *_ in terms))

    def feedback_grads(self, step, noise):
        i, h = self.index, step.hs[self.index]
        if self.noise_std > 0:
            h = h + self.noise_std * noise(tuple(h.shape))
        h_next = self.upper(h) if self.noise_std > 0 else step.hs[i + 1]
        step.report_loss(lambda: 0.5 * (self.evaluate(h_next)[1] - h).pow(2).sum() / h.shape[0])
        if self.upper.closed_form and self.bias:  # mean_b 1/2 ||g_i(h_next) - h||^2 through q_grad, for Q and d
            c, g = self.evaluate(h_next)
            return self._decayed(self.q_grad([(h_next, (g - h) / h.shape[0], (c, g))]))
        if self.upper.closed_form:
            return self._decayed(F.original_inverse_loss_grad(self.Q, h_next, h.flatten(1), self.feedback_activation))
        act = self.feedback_activation
        return self._decayed(self._autograd(lambda Q: 0.5 * (act(self._shape(self.upper.transpose(h_next, Q))) - h).pow(2).sum() / h.shape[0]))


class GradientTarget(TargetMap):
    """``h^_i = h_i - eta^ dl/dh_i``: the gradient target Lee et al. (2015) give the layer below the output (thesis 3.1.2).

    Only for ``i = L - 1``; ``dl/dh_{L-1} = W_L^T D_{s_L} e_L`` in closed form for a dense output layer, by
    autograd otherwise. An output layer narrower than the one below is no obstacle (nothing is inverted).

    >>> lower, upper = Dense(2, 2), Dense(2, 1, activation="linear")
    >>> g = GradientTarget().bind(1, lower, upper)
    >>> hs, pre = [torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 1)], [torch.ones(1, 2), torch.zeros(1, 1)]
    >>> step = Step(hs, pre, 0.5, error_fn=lambda: torch.ones(1, 1))
    >>> torch.allclose(g.target(None, step), 1 - 0.5 * upper.weight.detach())
    True
    """

    direct = True

    def target(self, h_hat_next, step):
        i = self.index
        if i != len(step.hs) - 2:
            raise ValueError(f"GradientTarget serves the layer below the output, not layer {i} of {len(step.hs) - 1}")
        e = step.output_error()
        if self.upper.closed_form:
            delta = e * self.upper.activation.derivative(step.pre[i])  # dl/da_L
            return step.hs[i] - step.target_stepsize * delta @ self.upper.full_weight()
        return step.hs[i] - step.target_stepsize * self._shape(self.upper.vjp(step.hs[i], e))

    difference_target = target

    def forward(self, h_next):
        raise ValueError("GradientTarget has no feedback map g: it sets the target from the loss gradient")


#: modules with parameters that feedback alignment through a block leaves as they are: element-wise scales and shifts
#: (normalisation layers, PReLU), whose "transport" carries no weight matrix
_DIAGONAL_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                     nn.InstanceNorm3d, nn.LayerNorm, nn.GroupNorm, nn.PReLU)  # fmt: skip
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def feedback_slots(block: Block, who: str) -> list[tuple[str, tuple[int, ...], int]]:
    """``[(name, feedback shape, fan-in)]`` of a block's weighted submodules, for the feedback-alignment maps: ``W^T``'s
    shape for a ``Linear`` and the kernel's for a convolution (the conventions of :class:`~tplightning.layers.Dense` and
    :class:`~tplightning.layers.Conv2d`), and the fan-in of the map back (output features; output channels times the
    kernel's size). A :class:`~tplightning.errors.ConfigError` names ``who`` and the module for a block with no weight
    matrix, or with a parameterised module other than ``Linear``, a zero-padded convolution or a normalisation.

    >>> from tplightning.blocks import Block
    >>> feedback_slots(Block(nn.Sequential(nn.Linear(3, 4), nn.Tanh())), "FA")
    [('0', (3, 4), 4)]
    """
    slots = []
    for name, m in block.module.named_modules():
        if isinstance(m, nn.Linear):
            slots.append((name, (m.in_features, m.out_features), m.out_features))
        elif isinstance(m, _CONVS) and m.padding_mode == "zeros":
            slots.append((name, tuple(m.weight.shape), m.weight.shape[0] * math.prod(m.weight.shape[2:])))
        elif any(True for _ in m.parameters(recurse=False)) and not isinstance(m, _DIAGONAL_MODULES):
            raise ConfigError(
                f"{who} cannot serve {block.describe()}: its module {name or '(the block)'} ({type(m).__name__}) has weights that "
                "feedback alignment would have to replace in the backward pass; it serves Linear, zero-padded Conv1d/2d/3d and "
                "normalisation modules"
            )
    if not slots:
        raise ConfigError(f"{who} cannot serve {block.describe()}: the block has no Linear or convolution whose weight a feedback weight replaces")
    return slots


def transposed_for(owner: Layer | nn.Module, t: Tensor) -> Tensor:
    """A weight-shaped tensor in feedback shape or back: transposed for a dense layer or ``Linear`` (feedback ``W^T``), as is
    for a convolution (feedback in the kernel's shape, used by a transposed convolution).

    >>> transposed_for(nn.Linear(3, 2), torch.zeros(2, 3)).shape
    torch.Size([3, 2])
    """
    return t.T if isinstance(owner, (Dense, nn.Linear)) else t


def _input_map(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The part of a ``Linear`` or convolution's output that is linear in its input, with ``weight`` in place of its own."""
    if isinstance(module, nn.Linear):
        return nnf.linear(x, weight)
    conv = {1: nnf.conv1d, 2: nnf.conv2d, 3: nnf.conv3d}[weight.dim() - 2]
    return conv(x, weight, None, module.stride, module.padding, module.dilation, module.groups)


def _straight_through(module: nn.Module, inputs: tuple, output: Tensor, weight: Tensor) -> Tensor:
    alt = _input_map(module, inputs[0], weight)
    return output.detach() + (alt - alt.detach())


@contextlib.contextmanager
def feedback_in_backward(block: Block, weights: dict[str, Tensor]):
    """Inside, each submodule ``name`` of ``block.module`` named in ``weights`` (a ``Linear`` or convolution) returns
    ``f(x; W).detach() + f(x; B) - f(x; B).detach()`` with ``B = weights[name]`` in its weight's shape: exactly its own
    output (``a - a = 0`` in floating point), so every activation, pooling and normalisation after it runs at the true
    forward point, but the gradient with respect to its input ``x`` is ``B``'s (``B^T v`` for a ``Linear``, the transposed
    convolution with ``B`` for a convolution). A vector-Jacobian product of the block inside
    (:meth:`~tplightning.blocks.Block.vjp`) is backprop through the block with each weight replaced by its feedback
    weight in the backward pass only. Forward hooks do it, so the block's own forward code is untouched.

    >>> from tplightning.blocks import Block
    >>> block = Block(nn.Sequential(nn.Linear(2, 2, bias=False), nn.Tanh()))
    >>> B, x, v = torch.eye(2), torch.ones(1, 2), torch.ones(1, 2)
    >>> with feedback_in_backward(block, {"0": B}):
    ...     back = block.vjp(x, v)
    >>> torch.allclose(back, (1 - block(x) ** 2) @ B)  # tanh' at the true point, then B^T v
    True
    """
    handles = []
    try:
        for name, W in weights.items():
            handles.append(block.module.get_submodule(name).register_forward_hook(functools.partial(_straight_through, weight=W)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _FixedFeedback(TargetMap):
    """A fixed random feedback matrix ``B`` (a buffer: it never learns) drawn by
    :func:`~tplightning.layers.random_feedback` from torch's global generator when the map is bound (so
    ``seed_everything`` sets it).

    Args:
        init: the law of ``B`` (:data:`~tplightning.layers.FEEDBACK_LAWS`): ``random`` (Gaussian with std
            ``1/sqrt(fan-in)``), ``xavier_normal`` or ``xavier_uniform`` (Glorot & Bengio 2010, the fans of ``B``).
    """

    def __init__(self, init: str = "random"):
        super().__init__()
        if init not in FEEDBACK_LAWS:
            raise ConfigError(f"feedback_init must be one of {', '.join(map(repr, FEEDBACK_LAWS))}, got {init!r}")
        self.init = init

    def _draw(self, shape: tuple[int, ...], fan_in: int, like: Tensor, name: str = "B") -> None:
        self.register_buffer(name, random_feedback(shape, fan_in, self.init, like=like))

    def feedback_tensors(self) -> list[Tensor]:
        """The feedback weights (``[B]``; one per weighted submodule of a block above)."""
        return [self.B]

    def forward(self, h_next):
        raise ValueError(f"{type(self).__name__} propagates errors, not activations: it has no feedback map g of h")


class FeedbackAlignment(_FixedFeedback):
    """Feedback alignment (Lillicrap et al. 2016; thesis eqs. 3.18, 3.20) as a target map.

    ``h^_i = h_i + B_i (D_{s_{i+1}} (h^_{i+1} - h_{i+1}))``, ``B_i`` fixed and random in the shape of ``W_{i+1}^T``. With
    the output target ``h^_L - h_L = -eta^ e_L`` this makes ``D_{s_i} (h_i - h^_i) = eta^ delta_i^FA`` of eq. 3.18
    (``delta`` in pre-activation coordinates), so the layer update is eta^ times eq. 3.20's; with ``B_i = W_{i+1}^T`` it is
    backprop's (eq. 3.19). For a convolution above, ``B`` is a transposed convolution.

    Above a :class:`~tplightning.blocks.Block`, each weighted submodule ``k`` (``Linear`` or convolution) has its own
    ``B_k`` (buffers ``B_0, B_1, ...``, shaped and drawn as for a dense or convolutional layer, :func:`feedback_slots`),
    and ``h^_i = h_i + J~^T (h^_{i+1} - h_{i+1})`` with ``J~^T`` backprop through the block with every ``W_k`` replaced by
    ``B_k`` in the backward pass only (:func:`feedback_in_backward`): activation derivatives, max-pooling's routing and
    batch normalisation at the true forward point. A ``Linear -> Tanh`` block so gets the dense layer's target.

    >>> lower, upper = Dense(2, 3), Dense(3, 2, activation="linear")
    >>> g = FeedbackAlignment().bind(1, lower, upper)
    >>> g.B.shape  # fixed, random, in the shape of W_2^T
    torch.Size([3, 2])
    """

    _slots: tuple = ()  # (name, feedback shape, fan-in) of a block's weighted submodules

    def check_layers(self, lower, upper):
        if isinstance(upper, Block):
            self._slots = tuple(feedback_slots(upper, type(self).__name__))
            for k, (_, shape, fan_in) in enumerate(self._slots):
                self._draw(shape, fan_in, upper.weight, f"B_{k}")
        else:
            self._draw(upper.feedback_shape(), upper.feedback_fan_in, upper.weight)

    def slot_feedback(self, k: int) -> Tensor:
        """The feedback weight of a block's ``k``-th weighted submodule, in feedback shape (``B_k``)."""
        return getattr(self, f"B_{k}")

    def feedback_tensors(self):
        return [self.slot_feedback(k) for k in range(len(self._slots))] if self._slots else [self.B]

    def block_slots(self) -> tuple:
        """``(name, feedback shape, fan-in)`` of each weighted submodule of a block above; empty above a dense or conv layer."""
        return self._slots

    def block_feedback(self) -> dict[str, Tensor]:
        """``{submodule name: B_k in the weight's shape}`` for :func:`feedback_in_backward`."""
        module = self.upper.module
        return {name: transposed_for(module.get_submodule(name), self.slot_feedback(k)) for k, (name, _, _) in enumerate(self._slots)}

    def target(self, h_hat_next, step):
        i = self.index
        if self._slots:
            with feedback_in_backward(self.upper, self.block_feedback()):
                back = self.upper.vjp(step.hs[i], h_hat_next - step.hs[i + 1])
            return step.hs[i] + self._shape(back)
        delta = self.upper.derivative(step.pre[i], step.hs[i + 1]) * (h_hat_next - step.hs[i + 1])
        return step.hs[i] + self._shape(self.upper.transpose(delta, self.B))

    difference_target = target


class TrainedFeedback(FeedbackAlignment):
    """Feedback alignment's map with ``B_i`` a trainable parameter (bidirectional FA, thesis 3.2.4): the targets are
    :class:`FeedbackAlignment`'s (eq. 3.23); the rule trains ``B`` (:class:`~tplightning.rules.alignment.BDFA`).

    >>> g = TrainedFeedback().bind(1, Dense(2, 3), Dense(3, 2))
    >>> g.feedback_parameters()[0].shape
    torch.Size([3, 2])
    """

    def _draw(self, shape, fan_in, like, name="B"):
        setattr(self, name, nn.Parameter(random_feedback(shape, fan_in, self.init, like=like)))


class SignSymmetry(FeedbackAlignment):
    """Sign-concordant feedback: :class:`FeedbackAlignment`'s target with ``B_i = M_i ⊙ sign(W_{i+1})^T``.

    Only the feedback weight differs from FA (the target is eq. 3.18's with this ``B``): the signs of ``W_{i+1}^T`` are read
    at every use, so they follow the forward weights, and the magnitudes ``M_i`` never carry ``W``'s. The three variants of
    Liao, Leibo & Poggio (2016), with the scales of biotorch (Sanfiz & Akrout 2021, which follows Xiao et al. 2018 in
    scaling uSF by the initial weights' std to avoid exploding gradients):

    * ``magnitude="uniform"`` (uSF): ``M = c``, ``c = sqrt(2 / (fan_in + fan_out))`` of ``W_{i+1}`` (the std of a Xavier
      law, biotorch's default initialisation; :func:`sign_feedback_scales`);
    * ``magnitude="fixed"`` (frSF): ``M = |R|``, ``R ~ U(-a, a)`` with Xavier's bound ``a = sqrt(6 / (fan_in + fan_out))``,
      drawn once when the map is bound (torch's global generator, as FA's ``B``) and kept (a buffer, in checkpoints);
    * ``magnitude="batch"`` (brSF): the same law, drawn afresh for every training batch by :meth:`redraw` from the
      rule's generator (:class:`~tplightning.rules.alignment.BRSF`).

    ``B`` is in ``W_{i+1}^T``'s shape for a dense layer above and in the kernel's shape for a convolution (used through a
    transposed convolution, :meth:`~tplightning.layers.Layer.transpose`); above a :class:`~tplightning.blocks.Block` each
    weighted submodule ``k`` has its own (magnitudes ``R_0, R_1, ...``), used as FA's are (:class:`FeedbackAlignment`).
    This library's forward weights are Gaussian with std ``1/sqrt(fan_in)``, not Xavier's, so the ratio of ``|B|`` to
    ``|W|`` is not biotorch's exactly; the scales above are kept as biotorch's so that ``B`` means the same number there
    and here.

    Args:
        magnitude: ``uniform`` (uSF), ``fixed`` (frSF) or ``batch`` (brSF).
        init: ``random`` only (the magnitudes' laws are above; another value is a
            :class:`~tplightning.errors.ConfigError`).

    >>> upper = Dense(3, 2, activation="linear")
    >>> g = SignSymmetry().bind(1, Dense(2, 3), upper)
    >>> torch.allclose(g.B, (2 / 5) ** 0.5 * torch.sign(upper.weight.detach()).T)  # uSF, c = sqrt(2 / (3 + 2))
    True
    """

    MAGNITUDES = ("uniform", "fixed", "batch")

    def __init__(self, magnitude: str = "uniform", init: str = "random"):
        super().__init__(init)
        if magnitude not in self.MAGNITUDES:
            raise ConfigError(f"magnitude must be one of {', '.join(map(repr, self.MAGNITUDES))}, got {magnitude!r}")
        if init != "random":
            raise ConfigError(f"feedback_init must be 'random' for sign-symmetric feedback: its magnitudes have their own law, got {init!r}")
        self.magnitude = magnitude

    def check_layers(self, lower, upper):
        if isinstance(upper, Block):
            self._slots = tuple(feedback_slots(upper, type(self).__name__))
            shapes = [shape for _, shape, _ in self._slots]
        else:
            shapes = [upper.feedback_shape()]
        self.scales, self.bounds = zip(*(sign_feedback_scales(shape) for shape in shapes))
        if self.magnitude != "uniform":
            W = upper.weight
            for k, (shape, bound) in enumerate(zip(shapes, self.bounds)):
                self.register_buffer(self._name("R", k), bound * torch.rand(*shape, dtype=W.dtype, device=W.device))

    def _name(self, base: str, k: int) -> str:
        return f"{base}_{k}" if self._slots else base

    def magnitudes(self) -> list[Tensor]:
        """``|R|`` of each feedback weight (frSF, brSF)."""
        return [getattr(self, self._name("R", k)) for k in range(len(self.bounds))]

    @torch.no_grad()
    def redraw(self, generator: torch.Generator) -> None:
        """Draw the magnitudes ``|R| ~ U(0, a)`` afresh from ``generator`` (a CPU generator: the same numbers on every
        device), a block's submodules in order; for ``magnitude="batch"`` only."""
        if self.magnitude != "batch":
            raise ValueError(f"only brSF's magnitudes are redrawn, this map's are {self.magnitude!r}")
        for R, bound in zip(self.magnitudes(), self.bounds):
            R.copy_(bound * torch.rand(R.shape, generator=generator, dtype=R.dtype))

    def slot_feedback(self, k: int) -> Tensor:
        """``M ⊙ sign(W)`` in feedback shape, at the forward weights' current values (``k``: a block's submodule)."""
        if self._slots:
            owner = self.upper.module.get_submodule(self._slots[k][0])
            signs = transposed_for(owner, torch.sign(owner.weight.detach()))
        else:
            signs = torch.sign(self.upper.adjoint())
        return self.scales[k] * signs if self.magnitude == "uniform" else getattr(self, self._name("R", k)) * signs

    @property
    def B(self) -> Tensor:  # type: ignore[override]
        """``M ⊙ sign(W_{i+1})^T`` (a layer above; a block's are :meth:`slot_feedback`)."""
        return self.slot_feedback(0)


def _require_whole_weight(upper, why: str) -> None:
    """Refuse a layer above without one whole forward weight per weighted module (``why`` says who needs it): a
    :class:`~tplightning.layers.Dense` or :class:`~tplightning.layers.Conv2d` layer or a block, not AO-SDTP's auxiliary layer."""
    if not isinstance(upper, (Dense, Conv2d, Block)) or isinstance(upper, AuxiliaryDense):
        raise ConfigError(f"{why}: it needs a Dense or Conv2d layer or a block there, got {type(upper).__name__}")


class KolenPollack(TrainedFeedback):
    """Kolen–Pollack feedback (Akrout et al. 2019, eqs. 16-17): :class:`FeedbackAlignment`'s target, ``B_i`` a parameter
    that takes ``W_{i+1}``'s own update, transposed:

    ``Delta W_{i+1} = -eta delta_{i+1} h_i^T - lambda W_{i+1}``,  ``Delta B_i = -eta h_i delta_{i+1}^T - lambda B_i``,

    so ``W_{i+1} - B_i^T`` shrinks by ``(1 - lambda)`` at every step whatever the data, and ``B_i -> W_{i+1}^T`` (with
    ``delta`` the FA-style error that ``B`` itself carries). The rule (:class:`~tplightning.rules.alignment.KP`) gives
    :meth:`mirrored_grads` of the forward gradients to ``B`` through the forward optimizer, whose weight decay is the
    ``lambda`` of both. ``B`` starts random, as FA's. Dense (``B`` in ``W^T``'s shape) and convolutional layers above
    (``B`` in the kernel's shape), and blocks (one ``B_k`` per ``Linear`` or convolution); not AO-SDTP's auxiliary layer,
    whose fixed rows get no update to mirror.

    >>> upper = Dense(3, 2)
    >>> g = KolenPollack().bind(1, Dense(2, 3), upper)
    >>> [tuple(t.shape) for t in g.mirrored_grads({upper.weight: torch.ones(2, 3)}).values()]  # W_2's gradient in B_1's shape
    [(3, 2)]
    """

    def check_layers(self, lower, upper):
        _require_whole_weight(upper, f"Kolen-Pollack feedback mirrors the update of layer {self.index + 1}'s whole weight")
        super().check_layers(lower, upper)

    def mirrored_grads(self, grads: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """``{B: gradient}``: the gradient of each forward weight ``W`` (layer ``i + 1``'s, or each weighted submodule's of a
        block) that ``grads`` holds, in its ``B``'s shape (transposed for a dense layer or ``Linear``)."""
        if self._slots:
            owners = [self.upper.module.get_submodule(name) for name, _, _ in self._slots]
            pairs = [(m.weight, m, self.slot_feedback(k)) for k, m in enumerate(owners)]
        else:
            pairs = [(self.upper.weight, self.upper, self.B)]
        return {B: transposed_for(owner, grads[W]) for W, owner, B in pairs if W in grads}


def _mirror_input_shapes(block: Block, names: Sequence[str]) -> list[tuple[int, ...]]:
    """The input shape (without the batch) of each submodule ``names`` of ``block.module``, read by forward hooks on zeros of
    the block's input shape in eval mode (no statistics change)."""
    seen: dict[str, tuple[int, ...]] = {}
    W = block.weight

    def record(name, module, args):
        seen.setdefault(name, tuple(args[0].shape[1:]))

    handles = [block.module.get_submodule(n).register_forward_pre_hook(functools.partial(record, n)) for n in names]
    modes = {m: m.training for m in block.module.modules()}
    block.module.eval()
    try:
        with torch.no_grad():
            block.module(torch.zeros(2, *block.in_shape, dtype=W.dtype, device=W.device))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return [seen[n] for n in names]


def mirror_product(owner: Layer | nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """``mean_b y_b x_b^T`` with ``y = W x`` (no bias, no activation: the linear part of ``owner``, a dense or convolutional
    layer or a ``Linear``/convolution module), in ``weight``'s shape: the vector-Jacobian product of ``W -> W x`` with the
    output ``y`` itself, over the batch size. For a convolution it is the correlation of ``y`` with ``x``, averaged over
    the output positions too, so that its mean is ``sigma^2 W`` for noise of std ``sigma``, as for a dense layer (up to
    the padding's border).

    >>> W, x = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0], [1.0, 1.0]])  # y = W x = (1, 3)
    >>> mirror_product(nn.Linear(2, 1), x, W)  # (1 (3, -1) + 3 (1, 1)) / 2
    tensor([[3., 1.]])
    """
    with torch.enable_grad():
        W = weight.detach().requires_grad_(True)
        if isinstance(owner, Dense):
            y = nnf.linear(x, W)
        elif isinstance(owner, Conv2d):
            y = nnf.conv2d(x, W, None, owner.stride, owner.padding)
        else:
            y = _input_map(owner, x, W)
        positions = y[0, 0].numel() if y.dim() > 2 else 1
        return torch.autograd.grad(y, W, grad_outputs=y.detach())[0] / (x.shape[0] * positions)


class WeightMirror(FeedbackAlignment):
    """Weight-mirror feedback (Akrout et al. 2019, section 3, eq. 7 and the weight decay that follows it):
    :class:`FeedbackAlignment`'s target, with ``B_i`` learned in *mirror mode* so that it aligns with ``W_{i+1}^T``.

    In mirror mode each layer is driven by its own zero-mean noise ``x ~ N(0, sigma^2 I)`` in its input space (not
    propagated from below), sent through its forward weights, ``y = W_{i+1} x``, and the feedback weight takes the
    Hebbian product of the two, with weight decay:

    ``B_i <- B_i + eta_B mean_b x_b y_b^T - lambda B_i``.

    ``E[x y^T] = sigma^2 W_{i+1}^T``, so ``B_i -> (eta_B sigma^2 / lambda) W_{i+1}^T`` in the mean (``lambda = eta_B
    sigma^2`` gives ``W^T`` itself; without decay ``B`` grows along ``W^T`` and the random start fades). Choices where the
    sources differ or are silent: ``y`` is the linear part ``W x`` without bias or activation (the paper's derivation;
    the authors' fully connected code runs ``x`` through ``sigmoid(W x + b)``), ``x`` is Gaussian (their code:
    uniform), the product is averaged over the mirror batch (their code sums it) and the decay acts in the same step.
    :meth:`mirror_step` does one step; the rule (:class:`~tplightning.rules.alignment.WM`) decides when.

    Dense layers above (``B`` in ``W^T``'s shape), this library's convolutional layers (``B`` in the kernel's shape; the
    mirror runs the convolution only, not the pooling) and blocks: one ``B_k`` per ``Linear`` or zero-padded convolution,
    each mirrored with noise of that submodule's input shape through that submodule alone. For a convolution the product
    is averaged over output positions as well (:func:`mirror_product`), so ``B`` tends to the kernel itself up to border
    effects of the padding (the sum over positions would make it the kernel times their number). Not AO-SDTP's
    auxiliary layer (its fixed rows are no forward weight to mirror). ``B`` starts random, as FA's (a buffer, in
    checkpoints).

    >>> upper = Dense(3, 2, activation="linear")
    >>> g = WeightMirror().bind(1, Dense(2, 3), upper)
    >>> gen = torch.Generator().manual_seed(0)
    >>> for _ in range(300):
    ...     g.mirror_step(lambda shape: torch.randn(shape, generator=gen), lr=0.1, sigma=1.0, decay=0.1, batch_size=64)
    >>> bool(torch.allclose(g.B, upper.weight.detach().T, atol=0.15))  # lambda = eta_B sigma^2: B -> W^T
    True
    """

    def check_layers(self, lower, upper):
        _require_whole_weight(upper, f"the weight mirror sends noise through layer {self.index + 1}'s whole weight")
        super().check_layers(lower, upper)
        if self._slots:
            names = [name for name, _, _ in self._slots]
            self._mirror_shapes = tuple(_mirror_input_shapes(upper, names))
        else:
            self._mirror_shapes = (tuple(upper.in_shape) if isinstance(upper, Conv2d) else (upper.in_features,),)

    def mirrored(self) -> list[tuple[Layer | nn.Module, Tensor, Tensor, tuple[int, ...]]]:
        """``[(owner, W, B, input shape)]``: each forward weight above (a block's weighted submodules in order) with its
        feedback weight and the shape of the noise it is mirrored with."""
        if self._slots:
            owners = [self.upper.module.get_submodule(name) for name, _, _ in self._slots]
            return [(m, m.weight, self.slot_feedback(k), shape) for k, (m, shape) in enumerate(zip(owners, self._mirror_shapes))]
        return [(self.upper, self.upper.weight, self.B, self._mirror_shapes[0])]

    @torch.no_grad()
    def mirror_step(self, noise: Callable[[tuple[int, ...]], Tensor], lr: float, sigma: float, decay: float, batch_size: int) -> None:
        """One mirror step on every feedback weight of this map: ``B <- (1 - decay) B + lr mean_b x_b y_b^T`` with
        ``x = sigma * noise((batch_size, *input shape))`` and ``y = W x`` (:func:`mirror_product`).

        Args:
            noise: returns standard normal draws of a shape (on any device; moved to the weights').
            lr: ``eta_B``.
            sigma: the noise's standard deviation.
            decay: ``lambda``.
            batch_size: noise samples per step.
        """
        for owner, W, B, shape in self.mirrored():
            x = sigma * noise((batch_size, *shape)).to(dtype=W.dtype, device=W.device)
            B.mul_(1.0 - decay).add_(transposed_for(owner, mirror_product(owner, x, W)), alpha=lr)


class DirectFeedback(_FixedFeedback):
    """Direct feedback alignment (Noekland 2016; thesis eq. 3.21): every hidden layer hears the output error directly.

    ``h^_i = h_i + B~_i (D_{s_L} (h^_L - h_L))``, ``B~_i`` fixed and random of shape ``(n_i, n_L)``. The target does not depend
    on ``h^_{i+1}``, so the diagnostics count it as set directly (``direct``).

    Args:
        output: the network's output layer (``f_L``), whose derivative scales the output error.
        init: the law of ``B~_i`` (see :class:`_FixedFeedback`; fans ``n_i`` and ``n_L`` for the Xavier laws).

    Any layer below may be a :class:`~tplightning.blocks.Block` (``B~_i`` maps to its flattened output); an output block must
    end with its last ``Linear`` or convolution (no activation: ``D_{s_L} = I``).

    >>> layers = [Dense(2, 3), Dense(3, 3), Dense(3, 1, activation="linear")]
    >>> DirectFeedback(layers[-1]).bind(1, layers[0], layers[1]).B.shape
    torch.Size([3, 1])
    """

    direct = True

    def __init__(self, output: Layer, init: str = "random"):
        super().__init__(init)
        self._output = (output,)

    def check_layers(self, lower, upper):
        out = self._output[0]
        if isinstance(out, Block) and out.activation.name != "linear":
            raise ConfigError(
                f"DFA sends the output layer's pre-activation error D_s_L (h^_L - h_L) to every layer; the output {out.describe()} "
                f"ends with {out.activation!r} and has no pre-activation: end the model with its last Linear (logits)"
            )
        self._draw((lower.out_features, out.out_features), out.out_features, out.weight)

    def target(self, h_hat_next, step):
        if step.output_target is None:
            raise ValueError("DirectFeedback needs the step's output target h^_L")
        out, error = self._output[0], step.output_target - step.hs[-1]
        delta = error if isinstance(out, Block) else out.derivative(step.pre[-1], step.hs[-1]) * error  # a block: linear output
        return step.hs[self.index] + self._shape(delta.flatten(1) @ self.B.T)

    difference_target = target


class Difference(TargetMap):
    """Difference target propagation (eq. 4.101) on any map: ``h^_i = h_i + g_i(h^_{i+1}) - g_i(h_{i+1})``.

    The correction ``h_i - g_i(h_{i+1})`` cancels the map's reconstruction error; with an exact inverse it vanishes up
    to float error (``g_i(h_{i+1}) = h_i``).

    >>> lower, upper = Dense(2, 2, activation="linear"), Dense(2, 2, activation="linear")
    >>> g = Difference(OriginalInverse(init="random")).bind(1, lower, upper)
    >>> hs = [torch.zeros(1, 2), torch.ones(1, 2), torch.full((1, 2), 3.0)]
    >>> torch.allclose(g.target(hs[2], Step(hs, [hs[1], hs[2]])), hs[1])  # h^_2 = h_2 gives h^_1 = h_1
    True
    """

    def __init__(self, inner: TargetMap):
        super().__init__()
        if isinstance(inner, Difference):
            raise ValueError("Difference(Difference(map)) is the same as Difference(map); wrap the map once")
        self.inner = inner

    def bind(self, index, lower, upper):
        self.inner.bind(index, lower, upper)
        return super().bind(index, lower, upper)

    @property
    def base(self):
        return self.inner

    @property
    def direct(self):  # type: ignore[override]
        return self.inner.direct

    @property
    def keeps_upper_weight(self):  # type: ignore[override]
        return self.inner.keeps_upper_weight

    def forward(self, h_next):
        return self.inner(h_next)

    def target(self, h_hat_next, step):
        return self.inner.difference_target(h_hat_next, step)

    def denormalised(self, t, step, mu, sigma):
        """Under batch normalisation the difference ``g_i(h^_{i+1}) - g_i(h_{i+1})`` lives in the normalised space of
        layer ``i``'s output, and the activation it corrects is the normalised ``(h_i - mu) / sigma``: de-normalised,
        ``h_i + sigma (g_i(h^_{i+1}) - g_i(h_{i+1}))``. (Applying ``sigma t + mu`` to ``t = h_i + ...`` would scale
        and shift ``h_i`` itself, and the target would not vanish with the output error; the thesis combines batch
        normalisation only with plain targets, Alg. A.1, so this is our reading.)"""
        h = step.hs[self.index]
        return h + sigma * (t - h)

    def feedback_grads(self, step, noise):
        return self.inner.feedback_grads(step, noise)

    def on_weights_changed(self):
        self.inner.on_weights_changed()


def plain(m: TargetMap) -> TargetMap:
    """Plain target propagation ``h^_i = g_i(h^_{i+1})``: the map itself (the counterpart of :class:`Difference`).

    >>> m = OriginalInverse()
    >>> plain(m) is m
    True
    """
    return m


def forward_from(layers: Sequence[Layer], i: int, h: Tensor) -> Tensor:
    """``f_{i,L}(h) = f_L(...f_{i+1}(h))``: an activation of layer ``i`` run up to the output (``layers = [f_1..f_L]``).

    >>> layers = [Dense(2, 2, activation="linear"), Dense(2, 1, activation="linear")]
    >>> forward_from(layers, 1, torch.zeros(3, 2)).shape
    torch.Size([3, 1])
    """
    for layer in layers[i:]:
        h = layer(h)
    return h


def _check_noise(noise_std: float, name: str) -> None:
    if not noise_std > 0:
        raise ConfigError(f"feedback_noise_std must be > 0 for {name}: its feedback loss compares noise-corrupted activations, got {noise_std}")


class DifferenceReconstruction(OriginalInverse):
    """``g_i(h) = s_i(Q_i h)`` trained by the difference reconstruction loss (DRL; Meulemans et al. 2020, section 4).

    Use it inside :class:`Difference` (the DRL trains the *difference* map). For layer ``i`` with ``eps ~ N(0, I)``:

    ``L_i = mean_b 1/(2 sigma^2) ||g_i(h~_{i+1}) - g_i(h_{i+1}) - sigma eps||^2``,

    where ``h~_{i+1}`` is ``h_i + sigma eps`` run forward to the output, ``f_{i,L}(h_i + sigma eps)``, and propagated back
    to layer ``i + 1`` by the rule's difference maps ``g^diff_{L-1}, ..., g^diff_{i+1}`` (held fixed). That is the paper's
    ``1/sigma^2 ||g^diff_{L,i}(f_{i,L}(h_i + sigma eps), h_L) - (h_i + sigma eps)||^2`` with
    ``g^diff_i(h^) = h_i + g_i(h^) - g_i(h_{i+1})`` (the ``h_i`` cancel), with the factor 1/2 and the batch mean of this
    library's losses (a constant the learning rate absorbs). Only ``Q_i`` learns from ``L_i``, as in the authors' code
    (the gradient does not flow into the maps above). Minimised over all maps, the DRL makes the Jacobian of
    ``g^diff_{L,i}`` the pseudo-inverse of ``J_{f_{i,L}}`` (the paper's section 4 with damping ``lambda = 0``): difference targets
    become Gauss-Newton targets. The paper's second, damping term ``lambda/sigma^2 ||g^diff_{L,i}(h_L + sigma eps_2) - h_i||^2``
    is replaced by weight decay on ``Q_i`` (``weight_decay``), as in the authors' experiments.

    The other arguments are those of :class:`OriginalInverse` (``bias``: ``g_i(h) = s_i(Q_i h + d_i)``).

    Args:
        noise_std: ``sigma`` (> 0; the paper's MNIST search chose about 0.06).

    >>> g = DifferenceReconstruction(noise_std=0.1).bind(1, Dense(2, 3), Dense(3, 3))
    >>> g.Q.shape
    torch.Size([3, 3])
    """

    def __init__(self, noise_std: float = 0.05, weight_decay: float = 0.0, init: str = "pinv", bias: bool = False):
        _check_noise(noise_std, "the DRL")
        super().__init__(noise_std, weight_decay, init, bias)

    def reconstruction(self, step: Step, h: Tensor) -> Tensor:
        """``h`` (an activation of layer ``i``) run up to the output and back down to layer ``i + 1`` by the maps above."""
        i, L = self.index, len(step.hs) - 1
        h = forward_from(step.layers, i, h)
        for k in range(L - 1, i, -1):
            h = step.maps[k - 1].target(h, step)
        return h

    def feedback_grads(self, step, noise):
        i, sigma = self.index, self.noise_std
        h_next = step.hs[i + 1]
        eps = sigma * noise(tuple(step.hs[i].shape))
        h_rec = self.reconstruction(step, step.hs[i] + eps)
        rec, own = self.evaluate(h_rec), self.own_evaluation(step)
        r = (rec[1] - own[1] - eps) / (sigma**2 * eps.shape[0])  # dL/dg_i(h~_{i+1})
        step.report_loss(lambda: 0.5 * (rec[1] - own[1] - eps).pow(2).sum() / (sigma**2 * eps.shape[0]))
        return self._decayed(self.q_grad([(h_rec, r, rec), (h_next, -r, own)]))


class LocalDifferenceReconstruction(OriginalInverse):
    """``g_i(h) = s_i(Q_i h)`` trained by the local difference reconstruction loss (L-DRL; Ernoult et al. 2022, section 4).

    Use it inside :class:`Difference`. With ``eps, eta ~ N(0, sigma^2 I)`` in the spaces of layers ``i`` and ``i + 1``:

    ``L_i = mean_b [ -2 eps^T (g_i(f_{i+1}(h_i + eps)) - g_i(h_{i+1})) + ||g_i(h_{i+1} + eta) - g_i(h_{i+1})||^2 ]``.

    To second order in ``sigma`` this is ``sigma^2 (-2 tr(J_g J_f) + ||J_g||_F^2)``, minimised by ``J_{g_i} = J_{f_{i+1}}^T``:
    the difference targets become backprop's gradient targets, and each layer's loss needs only its own layer (no path to
    the output). Written as in the authors' code (scalingDTP, ``target_prop/feedback_loss.py``: no ``1/sigma^2``, no
    factor 1/2; one noise sample per iteration).
    The paper trains ``Q`` for many iterations per batch (20-55 per layer on CIFAR-10, ``feedback_iterations``) with
    per-layer noise 0.4-0.08; here ``sigma`` is one number for all layers.

    ``activation="linear"`` drops ``s_i``: ``g_i(h) = Q_i h``, the paper's feedback, whose blocks end with the transposed
    layer (scalingDTP's feedback networks); ``"lower"`` (default) keeps the original form. With a ReLU ``s_i`` the original
    form can die: the loss's term ``||g_i(h_{i+1} + eta) - g_i(h_{i+1})||^2`` is smallest where ``Q_i h`` is negative
    everywhere, and there the targets of layer ``i`` stop moving.

    The other arguments are those of :class:`OriginalInverse` (``bias``: ``g_i(h) = s_i(Q_i h + d_i)``).

    Args:
        noise_std: ``sigma`` (> 0).
        activation: ``"lower"`` (``s_i``) or ``"linear"`` (none).

    >>> g = LocalDifferenceReconstruction(noise_std=0.1).bind(1, Dense(2, 3), Dense(3, 3))
    >>> g.Q.shape
    torch.Size([3, 3])
    >>> lin = LocalDifferenceReconstruction(activation="linear").bind(1, Dense(2, 3, activation="relu"), Dense(3, 3))
    >>> torch.allclose(lin(-torch.ones(1, 3)), -torch.ones(1, 3) @ lin.Q.T)  # Q h, no ReLU
    True
    """

    ACTIVATIONS = ("lower", "linear")

    def __init__(self, noise_std: float = 0.1, weight_decay: float = 0.0, init: str = "pinv", bias: bool = False, activation: str = "lower"):
        _check_noise(noise_std, "the L-DRL")
        if activation not in self.ACTIVATIONS:
            raise ConfigError(f"feedback_activation must be one of {', '.join(map(repr, self.ACTIVATIONS))}, got {activation!r}")
        super().__init__(noise_std, weight_decay, init, bias)
        self.activation = activation

    @property
    def feedback_activation(self):
        """``s_i``, or the identity with ``activation="linear"``."""
        return _IDENTITY if self.activation == "linear" else self.lower.activation

    def feedback_grads(self, step, noise):
        i, sigma = self.index, self.noise_std
        h, h_next = step.hs[i], step.hs[i + 1]
        B = h.shape[0]
        dx = sigma * noise(tuple(h.shape))
        dy = sigma * noise(tuple(h_next.shape))
        h_x, h_y = self.upper(h + dx), h_next + dy
        own, at_y = self.own_evaluation(step), self.evaluate(h_y)
        dr_y = at_y[1] - own[1]
        step.report_loss(lambda: (-2 * (dx * (self.evaluate(h_x)[1] - own[1])).sum() + dr_y.pow(2).sum()) / B)
        return self._decayed(self.q_grad([(h_x, -2 * dx / B), (h_y, 2 * dr_y / B, at_y), (h_next, 2 * (dx - dr_y) / B, own)]))


class DirectLinear(_LearnedMap):
    """Direct linear feedback from the output (DDTP-linear; Meulemans et al. 2020, section 5, fig. 3):
    ``h^_i = h_i + Q_i (h^_L - h_L)``, ``Q_i`` of shape ``(n_i, n_L)``, trained by the DRL.

    The map is ``g_i(h_L) = Q_i h_L`` with the difference correction; the target does not depend on ``h^_{i+1}``
    (``direct``). Its DRL (section 4's loss with the direct connections of section 5) is, with ``eps ~ N(0, I)``,

    ``L_i = mean_b 1/(2 sigma^2) ||Q_i (f_{i,L}(h_i + sigma eps) - h_L) - sigma eps||^2``.

    The paper's damping term ``lambda/sigma^2 ||Q_i sigma eps_2||^2`` has expectation ``lambda ||Q_i||_F^2``, so it is weight
    decay on ``Q_i`` (``weight_decay = lambda``, both terms halved here; the authors' experiments also use weight decay).
    For a linear network the minimiser is ``J^T (J J^T + lambda I)^{-1}`` with ``J = W_L ... W_{i+1}`` (section 4: damped
    Gauss-Newton targets; the pseudo-inverse ``J^dagger`` for ``lambda = 0`` and ``n_L <= n_i``).

    Args:
        layers: the network's layers ``[f_1..f_L]``.
        noise_std: ``sigma`` (> 0; the paper's MNIST search chose about 0.09).
        weight_decay: see above.
        init: ``pinv`` (``Q_i = (W_L ... W_{i+1})^dagger``, the linearised network's Gauss-Newton map; dense layers),
            ``regularised`` (``J^T (J J^T + lambda I)^{-1}``, the minimiser above) or a random draw: ``random`` (Gaussian,
            std ``1/sqrt(n_L)``), ``xavier_normal`` (std ``sqrt(2 / (n_i + n_L))``, the authors' ``xavier_normal``) or
            ``xavier_uniform``.

    >>> layers = [Dense(2, 3), Dense(3, 3), Dense(3, 1, activation="linear")]
    >>> DirectLinear(layers).bind(1, layers[0], layers[1]).Q.shape  # Q_1: (n_1, n_L)
    torch.Size([3, 1])
    """

    direct = True

    def __init__(self, layers: Sequence[Layer], noise_std: float = 0.1, weight_decay: float = 0.0, init: str = "pinv"):
        _check_noise(noise_std, "DDTP-linear")
        super().__init__(noise_std, weight_decay, init)
        self._net_layers = tuple(layers)  # a tuple: the layers belong to the network, not to the map

    def check_layers(self, lower, upper):
        out = self._net_layers[-1]
        self.Q = nn.Parameter(random_feedback((lower.out_features, out.out_features), out.out_features, self.law, like=out.weight))
        if self.inverts:
            self.init_pinv()

    def jacobian_product(self) -> Tensor:
        """``W_L ... W_{i+1}``: the Jacobian of ``f_{i,L}`` of the linearised network, ``(n_L, n_i)``."""
        above = self._net_layers[self.index:]
        if not all(isinstance(layer, (Dense, Block)) for layer in above):
            raise ValueError("DirectLinear's feedback_init 'pinv'/'regularised' needs dense layers above; use feedback_init: random")
        return F.weight_product([layer.full_weight().detach().double() for layer in above])  # a block: ConfigError unless one Linear

    @torch.no_grad()
    def init_pinv(self):
        gamma = self.weight_decay if self.init == "regularised" else 0.0
        self.Q.copy_(F.regularised_inverse(self.jacobian_product(), gamma).to(self.Q.dtype))

    def has_closed_form(self):
        return all(isinstance(layer, Dense) for layer in self._net_layers[self.index:])

    @torch.no_grad()
    def set_closed_form(self):
        """``Q_i = J^T (J J^T + lambda I)^{-1}`` with ``J = W_L ... W_{i+1}`` (:meth:`jacobian_product`): the minimiser of
        the DRL for a linear network (``J^dagger`` for ``lambda = 0``), the linearised network's for a nonlinear one.

        >>> layers = [Dense(2, 3), Dense(3, 3), Dense(3, 2, activation="linear")]
        >>> g = DirectLinear(layers, init="random").bind(1, layers[0], layers[1])
        >>> g.set_closed_form()
        >>> J = layers[2].weight.detach() @ layers[1].weight.detach()
        >>> torch.allclose(g.Q, torch.linalg.pinv(J), atol=1e-5)
        True
        """
        self.Q.copy_(F.regularised_inverse(self.jacobian_product(), self.weight_decay).to(self.Q.dtype))

    def target(self, h_hat_next, step):
        if step.output_target is None:
            raise ValueError("DirectLinear needs the step's output target h^_L")
        return step.hs[self.index] + self._shape((step.output_target - step.hs[-1]).flatten(1) @ self.Q.T)

    difference_target = target

    def forward(self, h_L):
        return self._shape(h_L.flatten(1) @ self.Q.T)

    def feedback_grads(self, step, noise):
        i, sigma = self.index, self.noise_std
        eps = sigma * noise(tuple(step.hs[i].shape))
        d = (forward_from(step.layers, i, step.hs[i] + eps) - step.hs[-1]).flatten(1)  # (B, n_L)
        r = (d @ self.Q.T - eps.flatten(1)) / (sigma**2 * d.shape[0])
        step.report_loss(lambda: 0.5 * (d @ self.Q.T - eps.flatten(1)).pow(2).sum() / (sigma**2 * d.shape[0]))
        return self._decayed(r.T @ d)


class FixedInverse(OriginalInverse):
    """``g_i(h) = s_i(B_i h)`` with ``B_i`` fixed and random, never trained: the feedback map of fixed-weight DTP (FW-DTP,
    Shibuya et al. 2023), used inside :class:`Difference`.

    ``B_i`` has the shape of ``f_{i+1}``'s transpose and is drawn Gaussian with std ``scale / sqrt(fan-in)`` from torch's global
    generator when the map is bound (``seed_everything`` sets it); it is a buffer (kept in checkpoints, never given to an
    optimizer) under the name ``Q`` that the original form's map reads. Above a
    :class:`~tplightning.blocks.Block`, ``B_i`` is the block's mirror feedback module drawn the same way, its parameters
    scaled and frozen (``requires_grad`` off, so no optimizer gets them). The map has no feedback loss.

    Args:
        scale: multiplies the std of ``B_i`` (> 0). The authors' code draws ``B`` uniform in ``[-1e-3, 1e-3]`` and runs its
            batch-normalised variant, which removes the scale; without batch normalisation the scale sets how large the
            propagated target differences are, and ``1 / sqrt(fan-in)`` (the library's fixed feedback, as feedback
            alignment's) keeps them of the order of the output's (our choice).

    >>> g = FixedInverse().bind(1, Dense(3, 4, activation="tanh"), Dense(4, 2))
    >>> g.B.shape, g.feedback_parameters()
    (torch.Size([4, 2]), [])
    """

    def __init__(self, scale: float = 1.0):
        if not scale > 0:
            raise ConfigError(f"feedback_scale must be > 0, got {scale}")
        super().__init__(noise_std=0.0, weight_decay=0.0, init="random")
        self.scale = scale

    def check_layers(self, lower, upper):
        super().check_layers(lower, upper)  # draws Q as a parameter, or a block's feedback module
        if "Q" not in self._parameters:  # a block above: its mirror module, scaled and frozen
            with torch.no_grad():
                for p in self.feedback_module.parameters():
                    p.mul_(self.scale).requires_grad_(False)
            return
        B = self.Q.detach() * self.scale
        del self.Q
        self.register_buffer("Q", B)

    @property
    def operator(self) -> Tensor | nn.Module:
        return self.feedback_module if "feedback_module" in self._modules else self.Q

    @property
    def B(self) -> Tensor | nn.Module:
        """The fixed feedback matrix (the buffer ``Q``), or above a block its frozen feedback module."""
        return self.operator

    def feedback_grads(self, step, noise):
        return {}
