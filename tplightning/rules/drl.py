"""The successors of the thesis' DTP: DRL and DDTP-linear (Meulemans et al. 2020, "A theoretical framework for target
propagation", NeurIPS) and L-DRL (Ernoult et al. 2022, "Towards scaling difference target propagation by learning
backprop targets", ICML).

All three keep DTP's forward targets (output target ``h^_L = h_L - eta^ dl/dh_L``, eq. 4.4; difference targets, eq. 4.101)
and change how the feedback weights learn; the losses live in :mod:`tplightning.target_maps`
(:class:`~tplightning.target_maps.DifferenceReconstruction`, :class:`~tplightning.target_maps.DirectLinear`,
:class:`~tplightning.target_maps.LocalDifferenceReconstruction`). ``feedback_iterations`` feedback updates follow every
forward update (:class:`~tplightning.rules.learned.LearnedInverseRule`), after it by default or, with ``feedback_first``,
before it on the same forward pass (the authors' order); ``feedback_schedule``
(:class:`~tplightning.schedules.FeedbackSchedule`) spends them on fewer batches. The papers' epoch schedule is two options of
:class:`~tplightning.rules.learned.LearnedInverseRule`: ``feedback_pretrain_epochs`` trains only the feedback weights first
(Meulemans et al. pre-train them for 6 epochs on MNIST; none of the shipped configs does) and ``feedback_extra_epochs``
follows every forward epoch with feedback-only epochs (theirs: 1 for DRL on MNIST).

Sources: the papers' abstracts and summaries, the authors' code (github.com/meulemansalex/theoretical_framework_for_target_propagation,
``lib/dtpdrl_layers.py``, ``final_configs/mnist_*.py``; github.com/ernoult/scalingDTP, ``target_prop/feedback_loss.py``) and
the derivations in the docstrings. Equation and theorem numbers are not cited: the text we could read does not give them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .._lightning import OptimizerCallable
from ..adaptive import Adaptive
from ..schedules import FeedbackSchedule
from ..layers import Layer
from ..target_maps import DifferenceReconstruction, DirectLinear, LocalDifferenceReconstruction
from .arguments import arguments_for
from .learned import LearnedInverseRule, OriginalDTP
from .base import NORM_GUARD

__all__ = ["DRL", "DDTPLinear", "LDRL"]


class _FreshFeedbackPass(LearnedInverseRule):
    """The feedback losses below compare corrupted activations run through the *current* layers with the clean ones, so
    they read a fresh forward pass after the forward update (the step's ``hs`` are from before it; their offset from the
    updated layers would otherwise enter the losses divided by ``sigma``). One extra forward pass per batch.

    ``feedback_first`` (an argument of the presets below) runs the feedback updates before the forward update instead,
    on the step's own forward pass, with the targets already computed from the feedback weights before those updates:
    the order of the authors' ``train_parallel`` (``lib/train.py``: forward gradients, feedback step, forward optimizer
    step). No extra forward pass then."""

    feedback_first: bool = False

    def update_forward(self, layers, hs, pre, targets):
        if self.feedback_first:
            LearnedInverseRule.update_feedback(self, hs, pre)
        super().update_forward(layers, hs, pre, targets)

    def update_feedback(self, hs, pre):
        if self.feedback_first and self.trains_forward(self.current_epoch):
            return  # done before the forward update, on this step's pass
        if self._planned == 0 or (self.feedback_schedule is not None and self.feedback_schedule.closed_form):
            return super().update_feedback(hs, pre)  # no feedback loss to compute: no fresh pass
        if self.feedback_layers:
            hs, pre = self.forward_pass(hs[0], update_state=False)
        super().update_feedback(hs, pre)


class DRL(_FreshFeedbackPass, OriginalDTP):
    """DTP with the difference reconstruction loss (DTP-DRL, Meulemans et al. 2020, section 4).

    ``g_i(h) = s_i(Q_i h)`` with difference targets, as :class:`~tplightning.rules.learned.OriginalDTP` (the authors' DTP-DRL
    uses the same form, with tanh feedback activations); ``Q_i`` minimises the DRL, which runs ``h_i + sigma eps`` up to the
    output and back through the difference maps above, so that difference targets approach Gauss-Newton targets
    (:class:`~tplightning.target_maps.DifferenceReconstruction`). Run: ``python train.py --config drl.yaml``.

    It takes every argument of :class:`~tplightning.rules.learned.LearnedInverseRule` too.

    Args:
        feedback_noise_std: ``sigma`` of the DRL (the authors' MNIST search: 0.057).
        feedback_first: the feedback updates before the forward update, on the step's forward pass (the authors'
            order; default: after it, on a fresh pass).
        feedback_extra_epochs: feedback-only epochs after every forward epoch (the authors: 1 on MNIST, with
            ``feedback_pretrain_epochs`` 6; see :class:`~tplightning.rules.learned.LearnedInverseRule`).

    >>> rule = DRL(sizes=[3, 4, 4, 2])
    >>> type(rule.maps[0].inner).__name__, rule.maps[0].inner.noise_std
    ('DifferenceReconstruction', 0.05)
    """

    feedback_map = DifferenceReconstruction

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
        network: Sequence[Layer | nn.Module] | nn.Module | None = None,
        norm_guard: float | None = NORM_GUARD,
        *,
        target_stepsize: float = 0.1,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        feedback_optimizer: OptimizerCallable = torch.optim.SGD,
        feedback_noise_std: float = 0.05,
        feedback_weight_decay: float = 0.0,
        feedback_iterations: int = 1,
        feedback_batch_size: int | None = None,
        feedback_pretrain_epochs: int = 0,
        feedback_init: Literal["pinv", "regularised", "random", "xavier_normal", "xavier_uniform"] = "pinv",
        feedback_bias: bool = False,
        feedback_seed: int = 0,
        feedback_only: bool = False,
        feedback_extra_epochs: int = 0,
        feedback_first: bool = False,
        adaptive: Adaptive | None = None,
        feedback_schedule: FeedbackSchedule | None = None,
    ):
        super().__init__(**arguments_for(super().__init__, locals()))
        self.feedback_first = bool(feedback_first)


class LDRL(_FreshFeedbackPass, OriginalDTP):
    """DTP with the local difference reconstruction loss (L-DRL, Ernoult et al. 2022, section 4).

    ``g_i(h) = s_i(Q_i h)`` with difference targets; ``Q_i`` minimises a loss of layer ``i + 1`` alone whose minimum makes
    ``J_{g_i} = J_{f_{i+1}}^T``, so that the difference targets approach backprop's gradient targets
    (:class:`~tplightning.target_maps.LocalDifferenceReconstruction`). The paper's feedback map inverts each block with a
    transposed layer after the activation; this library's original form ``s_i(Q_i h)`` is used by default (our choice, so
    that DTP, DRL and L-DRL differ only in the feedback loss) and ``feedback_activation="linear"`` gives the paper's
    ``Q_i h`` (LeNet-5's config uses it). Run: ``python train.py --config ldrl.yaml``.

    It takes every argument of :class:`~tplightning.rules.learned.LearnedInverseRule` too.

    Args:
        feedback_noise_std: ``sigma`` (the paper: 0.4-0.08 per layer on CIFAR-10; one value here).
        feedback_iterations: feedback updates per batch (the paper: 20-55 per layer on CIFAR-10).
        feedback_first: as for :class:`DRL`.
        feedback_extra_epochs: as for :class:`DRL`.
        feedback_activation: ``"lower"`` keeps ``s_i`` in ``g_i(h) = s_i(Q_i h)``; ``"linear"`` drops it,
            ``g_i(h) = Q_i h``, as the paper's feedback blocks (ending with the transposed layer) do. With ReLU layers
            below (LeNet-5's blocks) the original form's feedback can die (see
            :class:`~tplightning.target_maps.LocalDifferenceReconstruction`).

    >>> rule = LDRL(sizes=[3, 4, 4, 2])
    >>> type(rule.maps[0].inner).__name__, rule.feedback_iterations
    ('LocalDifferenceReconstruction', 20)
    """

    feedback_map = LocalDifferenceReconstruction

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
        network: Sequence[Layer | nn.Module] | nn.Module | None = None,
        norm_guard: float | None = NORM_GUARD,
        *,
        target_stepsize: float = 0.1,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        feedback_optimizer: OptimizerCallable = torch.optim.SGD,
        feedback_noise_std: float = 0.1,
        feedback_weight_decay: float = 0.0,
        feedback_iterations: int = 20,
        feedback_batch_size: int | None = None,
        feedback_pretrain_epochs: int = 0,
        feedback_init: Literal["pinv", "regularised", "random", "xavier_normal", "xavier_uniform"] = "pinv",
        feedback_bias: bool = False,
        feedback_seed: int = 0,
        feedback_only: bool = False,
        feedback_extra_epochs: int = 0,
        feedback_first: bool = False,
        adaptive: Adaptive | None = None,
        feedback_schedule: FeedbackSchedule | None = None,
        feedback_activation: Literal["lower", "linear"] = "lower",
    ):
        super().__init__(**arguments_for(super().__init__, locals()))
        self.feedback_first = bool(feedback_first)

    @property
    def feedback_options(self) -> dict:
        """The learned maps' options, with ``activation`` (``feedback_activation``)."""
        return {**super().feedback_options, "activation": self.hparams.get("feedback_activation", "lower")}


class DDTPLinear(_FreshFeedbackPass):
    """Direct DTP with linear feedback from the output (DDTP-linear, Meulemans et al. 2020, section 5).

    Every hidden layer hears the output directly: ``h^_i = h_i + Q_i (h^_L - h_L)`` with ``Q_i`` of shape ``(n_i, n_L)``
    (:attr:`feedback_weights`), trained by the DRL to approximate the (damped) pseudo-inverse of ``J_{f_{i,L}}``
    (:class:`~tplightning.target_maps.DirectLinear`). Run: ``python train.py --config ddtp_linear.yaml``.

    It takes every argument of :class:`~tplightning.rules.learned.LearnedInverseRule` too.

    Args:
        feedback_noise_std: ``sigma`` of the DRL (the authors' MNIST search: 0.091).
        feedback_first: as for :class:`DRL`.
        feedback_extra_epochs: as for :class:`DRL`.

    >>> [tuple(Q.shape) for Q in DDTPLinear(sizes=[3, 4, 4, 2]).feedback_weights]
    [(4, 2), (4, 2)]
    """

    feedback_map = DirectLinear  # no thesis-form noise batch: the DRL corrupts the batch's own activations

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
        network: Sequence[Layer | nn.Module] | nn.Module | None = None,
        norm_guard: float | None = NORM_GUARD,
        *,
        target_stepsize: float = 0.1,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        feedback_optimizer: OptimizerCallable = torch.optim.SGD,
        feedback_noise_std: float = 0.1,
        feedback_weight_decay: float = 0.0,
        feedback_iterations: int = 1,
        feedback_batch_size: int | None = None,
        feedback_pretrain_epochs: int = 0,
        feedback_init: Literal["pinv", "regularised", "random", "xavier_normal", "xavier_uniform"] = "pinv",
        feedback_bias: bool = False,
        feedback_seed: int = 0,
        feedback_only: bool = False,
        feedback_extra_epochs: int = 0,
        feedback_first: bool = False,
        adaptive: Adaptive | None = None,
        feedback_schedule: FeedbackSchedule | None = None,
    ):
        super().__init__(**arguments_for(super().__init__, locals()))
        self.feedback_first = bool(feedback_first)

    def make_maps(self):
        return [DirectLinear(self.net.layers, **self.feedback_options) for _ in range(self.num_layers - 1)]
