"""LightningModules that train with the chapter-6 dynamics: one batch = run the phases to equilibrium,
then apply the weight dynamics as one discrete step (``W <- W - eta G`` for ``dW/dt = -eta G``).

* :class:`DynamicalTP`: the single-phase mixture network (eq. 6.1) with exact (eq. 6.4) or learned
  (eq. 6.23) inverses; forward weights by eq. 6.17, learned ``Q_i`` by eq. 6.26 at the same equilibrium.
* :class:`TwoPhaseDTP`: section 6.6; forward weights by eq. 6.35, ``Q_i`` by eq. 6.37 (free phase).
* :class:`MultiplexingDTP`: section 6.9.2; forward weights by eq. 6.58, ``Q_i`` by our free-phase rule
  (:class:`~tplightning.dynamics.models.MultiplexingNetwork`).

The network's prediction (validation, test, the logged training loss) is the feed-forward pass,
which is the free-phase equilibrium of every model with exact inverses or in the multiplexing
network. The output target is eq. 6.10's nudge ``h_L - eta^ dl/dh_L`` of the current output
(:func:`~tplightning.dynamics.models.nudged_target`). Run e.g.
``python train.py --config dynamics/two_phase.yaml``.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from tplightning._lightning import OptimizerCallable
from torch import Tensor, nn

from .. import functional as F
from ..rules.base import DivergenceError, LearningRule, build_optimizer, check_optimizer_factory
from .models import ConvergenceError, MixtureNetwork, MultiplexingNetwork, TwoPhaseNetwork, nudged_target

__all__ = ["DynamicalTP", "TwoPhaseDTP", "MultiplexingDTP"]


class _EquilibriumRule:
    """What the chapter-6 rules share: feedback weights ``Q_1..Q_{L-1}`` (``Q_i`` of shape ``(n_i, n_{i+1})``), their
    optimizer, and the training step that applies :meth:`weight_updates` (``W <- W - eta G``) to a batch.

    Mixed in before :class:`~tplightning.rules.base.LearningRule`. :meth:`weight_updates` casts the batch to float64,
    solves the subclass's :meth:`equilibria` and hands them to its ``_forward_updates`` and ``_feedback_updates``
    (the rule's equations), then casts the updates back to the weights' dtype.
    """

    def _keep_options(self, target_stepsize: float, feedback_optimizer, feedback_weight_decay: float, feedback_init: str) -> None:
        """Check and keep the options every chapter-6 rule takes (called after ``LearningRule.__init__`` built the
        network, so that its biases can be refused)."""
        if self.net.biases is not None:
            raise ValueError("the chapter-6 dynamics have no biases (eqs. 6.2, 6.43); use bias=False")
        if not target_stepsize > 0:
            raise ValueError(f"target_stepsize must be > 0, got {target_stepsize}")
        if feedback_weight_decay < 0:
            raise ValueError(f"feedback_weight_decay must be >= 0, got {feedback_weight_decay}")
        if feedback_init not in ("pinv", "random"):
            raise ValueError(f"feedback_init must be 'pinv' or 'random', got {feedback_init!r}")
        check_optimizer_factory("feedback_optimizer", feedback_optimizer)
        self.target_stepsize, self.feedback_optimizer = target_stepsize, feedback_optimizer
        self.feedback_weight_decay, self.feedback_init = feedback_weight_decay, feedback_init

    def _init_feedback(self, seed: int) -> None:
        """``Q_i`` with entries drawn from ``N(0, 1/n_{i+1})`` (generator seeded with ``seed``), then ``W_{i+1}^dagger``
        when ``feedback_init`` is ``pinv``."""
        sizes = self.net.sizes
        g = torch.Generator().manual_seed(seed)
        self.feedback = nn.ParameterList(
            [nn.Parameter(torch.randn(sizes[i], sizes[i + 1], generator=g) / sizes[i + 1] ** 0.5) for i in range(1, len(sizes) - 1)]
        )
        if self.feedback_init == "pinv":
            self.init_feedback_pinv()

    @torch.no_grad()
    def init_feedback_pinv(self) -> None:
        """``Q_i = W_{i+1}^dagger`` (:meth:`tplightning.layers.Layer.pseudo_inverse`, as the learned target maps)."""
        for i, Q in enumerate(self.feedback, start=1):
            Q.copy_(self.net.layers[i].pseudo_inverse())

    def on_forward_weights_changed(self) -> None:
        if getattr(self, "feedback", None) is not None and self.feedback_init == "pinv":
            self.init_feedback_pinv()

    def feedback_parameters(self) -> list[Tensor]:
        return list(self.feedback) if getattr(self, "feedback", None) is not None else []

    def build_optimizers(self):
        fb = self.feedback_parameters()
        return super().build_optimizers() + ([build_optimizer("feedback_optimizer", self.feedback_optimizer, fb)] if fb else [])

    def equilibria(self, x: Tensor, y: Tensor) -> dict:
        """The rule's phases at equilibrium for float64 ``x, y``: ``{"model": network, phase name: [h_1..h_L], ...}``."""
        raise NotImplementedError

    def _forward_updates(self, x: Tensor, eq: dict) -> list[Tensor]:
        """``[G_W1..G_WL]`` (float64) at the equilibria ``eq`` of :meth:`equilibria`."""
        raise NotImplementedError

    def _feedback_updates(self, eq: dict) -> list[Tensor]:
        """``[G_Q1..G_Q(L-1)]`` (float64) at ``eq``; called only when ``Q`` is learned."""
        raise NotImplementedError

    @torch.no_grad()
    def weight_updates(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``([G_W1..G_WL], [G_Q1..G_Q(L-1)])`` with ``dW/dt = -eta G``: the updates of one batch, unapplied.

        The equilibria and updates are computed in float64 (on ``x.double()``, and ``y.double()`` when ``y`` holds
        values rather than class indices) and returned in the weights' dtype; ``[]`` for ``Q`` when it is not learned.
        """
        x, y = x.double(), (y.double() if y.is_floating_point() else y)
        eq = self.equilibria(x, y)
        gw = self._forward_updates(x, eq)
        gq = self._feedback_updates(eq) if self.feedback_parameters() else []
        dtype = self.net.weights[0].dtype
        return [G.to(dtype) for G in gw], [G.to(dtype) for G in gq]

    def training_step(self, batch, batch_idx):
        """One batch: the loss of the feed-forward pass (logged), then ``G = weight_updates(x, y)`` handed to the
        optimizers (``W <- W - eta G`` with SGD); a network that does not settle is a :class:`DivergenceError`."""
        x, y = batch
        with torch.no_grad():
            hs, _ = self.net.forward_all(x)
            loss = self.loss_from_output(hs[-1], y)
            self.check_finite(loss, hs)
            try:
                gw, gq = self.weight_updates(x, y)
            except ConvergenceError as err:
                raise DivergenceError(
                    f"training diverged at batch {self.batches_seen} (epoch {self.current_epoch}): the network did not settle: {err}"
                ) from None
            opts = self.optimizer_list()
            self.apply_gradients(opts[0], {self.net.weights[i - 1]: gw[i - 1] for i in self.train_layers})
            if gq:
                self.apply_gradients(opts[1], dict(zip(self.feedback, gq)))
        self.log_train(loss, x.shape[0])
        return loss


def _double(params) -> list[Tensor]:
    """float64 copies: the equilibria are solved in double precision (Newton's default tolerance there is 1e-10)."""
    return [p.detach().double() for p in params]


class DynamicalTP(_EquilibriumRule, LearningRule):
    """Single-phase dynamical target propagation with segregated dendrites (sections 6.3-6.5).

    Args:
        mu: mixing coefficient in (0, 1) (the thesis: (0, 0.5)).
        target_stepsize: ``eta^`` of the output target (eq. 6.10).
        inverses: ``exact`` (``g_i = f_{i+1}^{-1}``, eq. 6.4; square layers) or ``learned``
            (``g_i = Q_i s_{i+1}^{-1}``, eq. 6.23, ``Q`` by eq. 6.26 / 6.37).
        depth_compensation: multiply layer ``i``'s update by ``((1-mu)/mu)^{L+1-i}``, the layer-specific
            learning rate that undoes the decay of eq. 6.19 (off: the plain eq. 6.17).
        feedback_optimizer: optimizer of ``Q`` (learned inverses).
        feedback_weight_decay: ``lambda`` of eq. 6.26.
        feedback_init: ``pinv`` (``Q_i = W_{i+1}^dagger`` at the start and when the forward weights
            are replaced) or ``random``.
        feedback_seed: seed of the random ``Q`` initialisation.
        tau: neural time constant (does not change equilibria).
        tol: of :meth:`~tplightning.dynamics.models.MixtureNetwork.equilibrium`.
        max_iter: of :meth:`~tplightning.dynamics.models.MixtureNetwork.equilibrium`.
        **kwargs: the arguments of :class:`~tplightning.rules.base.LearningRule`.

    >>> _ = torch.manual_seed(0)
    >>> rule = DynamicalTP(sizes=[3, 3, 3], mu=0.2)
    >>> gw, gq = rule.weight_updates(torch.randn(4, 3), torch.randn(4, 3))  # G of dW/dt = -eta G, unapplied
    >>> [tuple(G.shape) for G in gw], gq  # exact inverses: no feedback weights to learn
    ([(3, 3), (3, 3)], [])
    """

    network_class: ClassVar[type] = MixtureNetwork

    def __init__(
        self,
        *args,
        mu: float = 0.1,
        target_stepsize: float = 0.1,
        inverses: Literal["exact", "learned"] = "exact",
        depth_compensation: bool = False,
        feedback_optimizer: OptimizerCallable = torch.optim.SGD,
        feedback_weight_decay: float = 0.0,
        feedback_init: Literal["pinv", "random"] = "pinv",
        feedback_seed: int = 0,
        tau: float = 1.0,
        tol: float | None = None,
        max_iter: int = 100,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._keep_options(target_stepsize, feedback_optimizer, feedback_weight_decay, feedback_init)
        if inverses not in ("exact", "learned"):
            raise ValueError(f"inverses must be 'exact' or 'learned', got {inverses!r}")
        self.mu, self.inverses = mu, inverses
        self.depth_compensation, self.tau, self.tol, self.max_iter = depth_compensation, tau, tol, max_iter
        self.feedback = None
        if inverses == "learned":
            self._init_feedback(feedback_seed)
        self.network()  # validates mu, activations and (exact inverses) square layers now

    def network(self) -> MixtureNetwork:
        """The dynamical network with the current weights."""
        return self.network_class(
            _double(self.net.weights), self.net.activations, self.mu,
            feedback=None if self.feedback is None else _double(self.feedback), tau=self.tau,
        )  # fmt: skip

    def weight_is_acceptable(self, i: int, W: Tensor) -> bool:
        if self.inverses == "exact" and i > 1:
            return bool(F.singular_values64(W)[-1] > 1e-3)
        return True

    def _compensate(self, grads: list[Tensor]) -> list[Tensor]:
        if not self.depth_compensation:
            return grads
        r, L = self.mu / (1 - self.mu), len(grads)
        return [G / r ** (L + 1 - i) for i, G in enumerate(grads, start=1)]

    @torch.no_grad()
    def equilibria(self, x: Tensor, y: Tensor) -> dict:
        """The equilibrium (eq. 6.5) under the nudged target (eq. 6.10)."""
        model = self.network()
        return {"model": model, "learn": model.equilibrium(x, nudged_target(y, self.loss, self.target_stepsize), tol=self.tol, max_iter=self.max_iter)}

    def _forward_updates(self, x: Tensor, eq: dict) -> list[Tensor]:
        return self._compensate(eq["model"].forward_update(x, eq["learn"]))  # eq. 6.17

    def _feedback_updates(self, eq: dict) -> list[Tensor]:
        return eq["model"].feedback_update(eq["learn"], self.feedback_weight_decay)  # eq. 6.26


class TwoPhaseDTP(DynamicalTP):
    """Two-phase dynamical (difference) target propagation (section 6.6).

    Free phase (output short-circuited, eq. 6.29) and learning phase (nudged target, eq. 6.10) of
    eq. 6.1; forward weights by eq. 6.35, ``Q`` by eq. 6.37 in the free phase. Arguments as
    :class:`DynamicalTP`; ``inverses`` defaults to ``learned``.

    >>> _ = torch.manual_seed(0)
    >>> rule = TwoPhaseDTP(sizes=[3, 3, 2])
    >>> torch.equal(rule.feedback[0].detach(), rule.net.layers[1].pseudo_inverse())  # Q_1 = W_2^dagger at the start
    True
    >>> gw, gq = rule.weight_updates(torch.randn(4, 3), torch.randn(4, 2))
    >>> [tuple(G.shape) for G in gw], [tuple(G.shape) for G in gq]
    ([(3, 3), (2, 3)], [(3, 2)])
    """

    network_class = TwoPhaseNetwork

    def __init__(self, *args, inverses: Literal["exact", "learned"] = "learned", **kwargs):
        super().__init__(*args, inverses=inverses, **kwargs)

    @torch.no_grad()
    def equilibria(self, x: Tensor, y: Tensor) -> dict:
        model = self.network()
        free, learn = model.equilibrium(x, nudged_target(y, self.loss, self.target_stepsize), tol=self.tol, max_iter=self.max_iter)
        return {"model": model, "free": free, "learn": learn}

    def _forward_updates(self, x: Tensor, eq: dict) -> list[Tensor]:
        return self._compensate(eq["model"].forward_update(x, eq["free"], eq["learn"]))  # eq. 6.35

    def _feedback_updates(self, eq: dict) -> list[Tensor]:
        return eq["model"].feedback_update(eq["free"], self.feedback_weight_decay)  # eq. 6.37


class MultiplexingDTP(_EquilibriumRule, LearningRule):
    """Burst-multiplexing dynamical target propagation (section 6.9.2).

    Args:
        target_stepsize: ``eta^`` (eq. 6.54).
        feedback_activation: ``t_i`` (``None``: ``t_i = s_i``).
        feedback_optimizer: optimizer of ``Q`` (our free-phase rule, see
            :class:`~tplightning.dynamics.models.MultiplexingNetwork`); ``train_feedback=False`` keeps
            ``Q`` fixed, the other option section 6.9.2 names.
        feedback_weight_decay: ``lambda`` of the feedback rule.
        feedback_init: ``pinv`` or ``random`` (as :class:`DynamicalTP`).
        feedback_seed: seed of the random initialisation.
        train_feedback: learn ``Q``.
        tau: time constant (trajectories only).
        **kwargs: the arguments of :class:`~tplightning.rules.base.LearningRule`.

    >>> _ = torch.manual_seed(0)
    >>> rule = MultiplexingDTP(sizes=[3, 3, 2], train_feedback=False)
    >>> gw, gq = rule.weight_updates(torch.randn(4, 3), torch.randn(4, 2))
    >>> [tuple(G.shape) for G in gw], gq  # Q fixed: no feedback update
    ([(3, 3), (2, 3)], [])
    """

    def __init__(
        self,
        *args,
        target_stepsize: float = 0.1,
        feedback_activation: str | None = None,
        feedback_optimizer: OptimizerCallable = torch.optim.SGD,
        feedback_weight_decay: float = 0.0,
        feedback_init: Literal["pinv", "random"] = "pinv",
        feedback_seed: int = 0,
        train_feedback: bool = True,
        tau: float = 1.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._keep_options(target_stepsize, feedback_optimizer, feedback_weight_decay, feedback_init)
        self.feedback_activation, self.tau, self.train_feedback = feedback_activation, tau, train_feedback
        self._init_feedback(feedback_seed)
        if not train_feedback:
            for Q in self.feedback:
                Q.requires_grad_(False)
        self.network()

    def feedback_parameters(self) -> list[Tensor]:
        return list(self.feedback) if self.train_feedback else []

    def network(self) -> MultiplexingNetwork:
        return MultiplexingNetwork(
            _double(self.net.weights), _double(self.feedback), self.net.activations,
            feedback_activation=self.feedback_activation, negative_slope=self.hparams.negative_slope, tau=self.tau,
        )  # fmt: skip

    @torch.no_grad()
    def equilibria(self, x: Tensor, y: Tensor) -> dict:
        model = self.network()
        hs, free, learn = model.phases(x, nudged_target(y, self.loss, self.target_stepsize))
        return {"model": model, "h": hs, "free": free, "learn": learn}

    def _forward_updates(self, x: Tensor, eq: dict) -> list[Tensor]:
        return eq["model"].forward_update(x, eq["h"], eq["free"], eq["learn"])  # eq. 6.58

    def _feedback_updates(self, eq: dict) -> list[Tensor]:
        return eq["model"].feedback_update(eq["h"], eq["free"], self.feedback_weight_decay)  # our free-phase rule
