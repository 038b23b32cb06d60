"""Feedback alignment presets: FA (thesis 3.2.1, Lillicrap et al. 2016), DFA (3.2.2, Noekland 2016), BDFA (3.2.4, Luo et al. 2017).

Both are target-propagation rules whose maps carry fixed random feedback matrices
(:class:`~tplightning.target_maps.FeedbackAlignment`, :class:`~tplightning.target_maps.DirectFeedback`): the propagated
"targets" are ``h_i`` plus ``eta^`` times the FA/DFA error signal, and the local update ``D_i (h_i - h^_i) h_{i-1}^T``
is then eq. 3.20's. ``target_stepsize`` defaults to 1 here, so the forward learning rate means what it means for BP.
Bidirectional FA (3.2.4) trains the feedback weights in a second, auto-encoder phase (:class:`BDFA`); broadcast FA
(3.2.3) needs spiking neurons and is not implemented.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .._lightning import OptimizerCallable
from ..errors import ConfigError
from ..layers import Dense, Layer
from ..target_maps import DirectFeedback, FeedbackAlignment, TrainedFeedback
from .arguments import arguments_for
from .base import NORM_GUARD, build_optimizer, check_optimizer_factory
from .target_prop import TargetPropRule

__all__ = ["FA", "DFA", "BDFA"]


class FA(TargetPropRule):
    """Feedback alignment: ``delta_i = D_{s_i} B_i delta_{i+1}`` with fixed random ``B_i`` of shape ``(n_i, n_{i+1})`` (eq. 3.18).

    ``B_i`` are drawn with std ``1/sqrt(n_{i+1})`` after the forward weights (``seed_everything`` sets both) and kept in
    the checkpoint. Run: ``python train.py --config fa.yaml``.

    It takes every argument of :class:`~tplightning.rules.target_prop.TargetPropRule` too.

    Args:
        target_stepsize: ``eta^`` of the output target; 1 makes the update the FA gradient itself.

    >>> [tuple(B.shape) for B in FA(sizes=[3, 4, 5, 2]).feedback_weights]
    [(4, 5), (5, 2)]
    """

    def __init__(
        self,
        sizes: Sequence[int] = (6, 6, 6),
        activation: str = "leaky_relu",
        output_activation: str = "linear",
        negative_slope: float = 0.35,
        bias: bool = False,
        loss: Literal["mse", "cross_entropy"] = "mse",
        init_std: float | None = None,
        init: Literal["gaussian", "orthogonal", "xavier_normal"] = "gaussian",
        forward_optimizer: OptimizerCallable = torch.optim.SGD,
        lr_final_factor: float = 0.2,
        train_layers: Sequence[int] | None = None,
        network: Sequence[Layer] | None = None,
        norm_guard: float | None = NORM_GUARD,
        *,
        target_stepsize: float = 1.0,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ):
        super().__init__(**arguments_for(super().__init__, locals()))

    def make_maps(self):
        return [FeedbackAlignment() for _ in range(self.num_layers - 1)]

    @property
    def feedback_weights(self) -> list[Tensor]:
        """The fixed feedback matrices ``[B_1, ..., B_{L-1}]``."""
        return [m.B for m in self.maps]


class DFA(FA):
    """Direct feedback alignment: ``delta_i = D_{s_i} B~_i delta_L`` with fixed random ``B~_i`` of shape ``(n_i, n_L)`` (eq. 3.21).

    Run: ``python train.py --config dfa.yaml``.

    >>> [tuple(B.shape) for B in DFA(sizes=[3, 4, 5, 2]).feedback_weights]
    [(4, 2), (5, 2)]
    """

    def make_maps(self):
        return [DirectFeedback(self.net.layers[-1]) for _ in range(self.num_layers - 1)]


class BDFA(FA):
    """Bidirectional feedback alignment (Luo et al. 2017; thesis 3.2.4, eqs. 3.22-3.27): FA whose ``B_i`` learn.

    Phase one is FA (eqs. 3.22-3.24, the forward update). Phase two trains the feedback weights as a decoder: the output
    target ``h^b_L = y`` (one-hot labels for classification) is run down ``h^b_i = s_i(B_i h^b_{i+1})`` (eq. 3.25) to a
    reconstructed input ``x^ = a^b_0 = B_0 h^b_1`` (the thesis names ``a^b_0``; we take ``s_0`` as the identity), the
    auto-encoder loss ``L^b = ||x - x^||^2`` gives ``delta^b_0 = dL^b/da^b_0 = 2 (x^ - x)``, which feedback alignment
    carries *forward* through the forward weights: ``delta^b_i = D^b_{s_i} W_i delta^b_{i-1}`` (eq. 3.26), and
    ``B_i`` descends ``delta^b_i (h^b_{i+1})^T`` (eq. 3.27), averaged over the batch, by ``feedback_optimizer``.
    ``B_0`` (:attr:`input_feedback`, shape ``(n_0, n_1)``) exists for phase two only. Needs a dense first layer.
    Run: ``python train.py --config bdfa.yaml``.

    It takes every argument of :class:`FA` too.

    Args:
        feedback_optimizer: optimizer of ``B_0, ..., B_{L-1}`` (SGD).

    >>> rule = BDFA(sizes=[3, 4, 2])
    >>> [tuple(B.shape) for B in rule.feedback_parameters()]  # B_0, B_1
    [(3, 4), (4, 2)]
    """

    def __init__(
        self,
        sizes: Sequence[int] = (6, 6, 6),
        activation: str = "leaky_relu",
        output_activation: str = "linear",
        negative_slope: float = 0.35,
        bias: bool = False,
        loss: Literal["mse", "cross_entropy"] = "mse",
        init_std: float | None = None,
        init: Literal["gaussian", "orthogonal", "xavier_normal"] = "gaussian",
        forward_optimizer: OptimizerCallable = torch.optim.SGD,
        lr_final_factor: float = 0.2,
        train_layers: Sequence[int] | None = None,
        network: Sequence[Layer] | None = None,
        norm_guard: float | None = NORM_GUARD,
        *,
        target_stepsize: float = 1.0,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        feedback_optimizer: OptimizerCallable = torch.optim.SGD,
    ):
        super().__init__(**arguments_for(super().__init__, locals()))
        check_optimizer_factory("feedback_optimizer", feedback_optimizer)
        self.feedback_optimizer = feedback_optimizer
        first = self.net.layers[0]
        if not isinstance(first, Dense):
            raise ConfigError(f"BDFA reconstructs the input through a dense first layer, got {type(first).__name__}")
        W = first.weight
        self.input_feedback = nn.Parameter(torch.randn(first.in_features, first.out_features, dtype=W.dtype, device=W.device) / first.out_features**0.5)

    def make_maps(self):
        return [TrainedFeedback() for _ in range(self.num_layers - 1)]

    def feedback_parameters(self) -> list[Tensor]:
        return [self.input_feedback, *self.feedback_weights]

    def build_optimizers(self):
        return super().build_optimizers() + [build_optimizer("feedback_optimizer", self.feedback_optimizer, self.feedback_parameters())]

    def feedback_grads(self, x: Tensor, y: Tensor) -> dict[Tensor, Tensor]:
        """``{B_i: mean_b delta^b_i (h^b_{i+1})^T}`` of phase two (eqs. 3.25-3.27) for a batch ``(x, y)``."""
        L, layers = self.num_layers, self.net.layers
        h = self.loss.labels(y, self.output_dim, self.dtype)  # h^b_L = y
        Bs = self.feedback_parameters()  # B_0, ..., B_{L-1}
        hb, ab = [None] * (L + 1), [None] * L
        hb[L] = h
        for i in range(L - 1, -1, -1):
            ab[i] = hb[i + 1] @ Bs[i].T  # a^b_i = B_i h^b_{i+1}
            hb[i] = ab[i] if i == 0 else layers[i - 1].activation(ab[i])
        delta = 2 * (hb[0] - x.flatten(1))  # dL^b/da^b_0, s_0 the identity
        B = delta.shape[0]
        grads = {Bs[0]: delta.T @ hb[1] / B}
        for i in range(1, L):
            delta = layers[i - 1].activation.derivative(ab[i], hb[i]) * (delta @ layers[i - 1].weight.T)  # D^b_i W_i delta_{i-1}
            grads[Bs[i]] = delta.T @ hb[i + 1] / B
        return grads

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)  # phase one: FA
        with torch.no_grad():
            self.apply_gradients(self.optimizer_list()[1], self.feedback_grads(*batch))
        return loss
