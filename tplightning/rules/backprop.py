"""Error backpropagation baselines: ``BP`` (Alg. A.7) and ``BPFixed`` (only the output layer learns)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .._lightning import OptimizerCallable
from ..errors import ConfigError
from ..layers import Layer
from .arguments import arguments_for
from .base import NORM_GUARD, LearningRule

__all__ = ["BP", "BPFixed"]


class BP(LearningRule):
    """Error backpropagation with the forward optimizer (plain SGD in the thesis, Alg. A.7).

    Run: ``python train.py --config bp.yaml``. Takes every argument of
    :class:`~tplightning.rules.base.LearningRule`.

    >>> import torch
    >>> rule = BP(sizes=[3, 4, 2], loss="cross_entropy")
    >>> rule.loss, rule(torch.zeros(1, 3)).shape
    (CrossEntropy(), torch.Size([1, 2]))
    """

    def training_step(self, batch, batch_idx):
        x, y = batch
        (opt,) = self.optimizer_list()
        hs, _ = self.net.forward_all(x)
        loss = self.loss_from_output(hs[-1], y)
        self.check_finite(loss, hs)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        self.log_train(loss.detach(), x.shape[0])
        return loss.detach()


class BPFixed(BP):
    """Backprop that trains only the output layer: the control of thesis sections 5.1.3 and 5.2.2.

    A rule that beats BPFixed sends useful learning signals to its hidden layers.

    >>> BPFixed(sizes=[3, 4, 2]).train_layers
    [2]
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
        train_layers: Sequence[int] | None = (-1,),
        network: Sequence[Layer | nn.Module] | nn.Module | None = None,
        norm_guard: float | None = NORM_GUARD,
    ):
        if train_layers not in (None, [-1], (-1,)):
            raise ConfigError(f"BPFixed always trains only the output layer; got train_layers={train_layers}")
        train_layers = [-1]  # recorded so in the hyper-parameters (read from this frame), as checkpoints hold it
        super().__init__(**arguments_for(super().__init__, locals()))
