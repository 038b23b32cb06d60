"""Error backpropagation baselines: ``BP`` (Alg. A.7) and ``BPFixed`` (only the output layer learns)."""
from __future__ import annotations

from ..errors import ConfigError
from .base import LearningRule

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

    def __init__(self, *args, **kwargs):
        layers = kwargs.pop("train_layers", None)  # saved in checkpoints' hyper-parameters as [-1]
        if layers not in (None, [-1], (-1,)):
            raise ConfigError(f"BPFixed always trains only the output layer; got train_layers={layers}")
        super().__init__(*args, train_layers=[-1], **kwargs)
