"""Fixed-weight difference target propagation (FW-DTP; Shibuya, Inoue, Kawakami & Sato, "Fixed-Weight Difference Target
Propagation", AAAI 2023).

DTP's difference targets through feedback maps whose weights are random and never trained: no feedback loss, no
feedback optimizer, no feedback iterations. The paper's point is that layer-wise autoencoders (feedback weights trained to
invert the forward layers) are not needed for target propagation to train; the targets

``h^_L = h_L - eta^ dl/dh_L`` (the output target, eq. 4.4 of the thesis),
``h^_i = h_i + g_i(h^_{i+1}) - g_i(h_{i+1})``, ``g_i(h) = s_i(B_i h)``, ``B_i`` fixed (the difference correction, eq. 4.101),

still carry information, and each layer descends ``mean_b 1/2 ||f_i(h_{i-1}) - h^_i||^2`` (eq. 4.12).

Sources: the paper's abstract and the authors' code (github.com/TatsukichiShibuya/Fixed-Weight-Difference-Target-Propagation,
``code/Main.py`` (the ``FWDTP`` settings: a ``random`` feedback function with ``tanh``, a ``difference`` correction),
``code/models/my_functions.py`` (``random_function``: weights drawn once, no update; ``difference_function``:
``input + original - g(f(original))``) and ``code/models/tp_net.py`` (``compute_target``, ``update_weights``)). The paper's
equation numbers could not be read here, so the thesis' are cited for the pieces it shares. Choices where the code leaves a
detail open or differs: the scale of ``B_i`` (see :class:`~tplightning.target_maps.FixedInverse`), and this library's
batch-mean local loss with the factor 1/2 (the code sums squared errors and divides the learning rate by the batch size:
a factor 2 the learning rate absorbs). The code's ``FWDTP-BN`` variant (batch-normalised feedback) is not built here.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .._lightning import OptimizerCallable
from ..layers import Layer
from ..target_maps import Difference, FixedInverse
from .arguments import arguments_for
from .base import NORM_GUARD
from .target_prop import TargetPropRule

__all__ = ["FWDTP"]


class FWDTP(TargetPropRule):
    """FW-DTP: difference targets through fixed random feedback maps ``g_i(h) = s_i(B_i h)`` (Shibuya et al. 2023).

    :class:`~tplightning.rules.learned.OriginalDTP` without feedback training: each map is a
    :class:`~tplightning.target_maps.FixedInverse` inside :class:`~tplightning.target_maps.Difference`. ``B_i`` (shape
    ``(n_i, n_{i+1})``) are drawn after the forward weights (``seed_everything`` sets both) and kept in the checkpoint.
    Run: ``python train.py --config fw_dtp.yaml``.

    It takes every argument of :class:`~tplightning.rules.target_prop.TargetPropRule` too.

    Args:
        feedback_scale: the std of ``B_i`` is ``feedback_scale / sqrt(n_{i+1})``.

    >>> rule = FWDTP(sizes=[3, 4, 4, 2])
    >>> [tuple(B.shape) for B in rule.feedback_weights], rule.feedback_parameters()
    ([(4, 4), (4, 2)], [])
    """

    propagation = Difference

    def __init__(
        self,
        sizes: Sequence[int] = (6, 6, 6),
        activation: str = "leaky_relu",
        output_activation: str = "linear",
        negative_slope: float = 0.35,
        bias: bool = False,
        loss: Literal["mse", "cross_entropy"] = "mse",
        init_std: float | None = None,
        init: Literal["gaussian", "orthogonal"] = "gaussian",
        forward_optimizer: OptimizerCallable = torch.optim.SGD,
        lr_final_factor: float = 0.2,
        train_layers: Sequence[int] | None = None,
        network: Sequence[Layer] | None = None,
        norm_guard: float | None = NORM_GUARD,
        *,
        target_stepsize: float = 0.1,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        feedback_scale: float = 1.0,
    ):
        super().__init__(**arguments_for(super().__init__, locals()))
        self.feedback_scale = feedback_scale

    def make_maps(self):
        """One :class:`~tplightning.target_maps.FixedInverse` per hidden layer (``feedback_scale`` from ``self.hparams``)."""
        return [FixedInverse(self.hparams["feedback_scale"]) for _ in range(self.num_layers - 1)]

    @property
    def feedback_weights(self) -> list[Tensor]:
        """The fixed feedback matrices ``[B_1, ..., B_{L-1}]``."""
        return [m.base.B for m in self.maps]
