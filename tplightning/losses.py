"""The output loss as a value, and the two flavours of the local update.

A rule's output loss ``l(h_L, y)`` (thesis eq. 4.3) knows everything the rules ask of it: the per-sample loss, the
output error ``e_L = dl/dh_L`` (eq. 4.5), the output target ``h^_L = h_L - eta^ e_L`` (eq. 4.4), the labels in output
space and the evaluation metric that goes with it. :class:`MSE` is ``1/2 ||h_L - y||^2`` (regression),
:class:`CrossEntropy` the cross-entropy of logits ``h_L`` with integer labels (classification). Configs and
checkpoints name a loss by its :attr:`Loss.name`; :func:`get_loss` turns the name into the value.

The local update of layer ``i`` scales the target difference ``h_i - h^_i`` by ``D_i`` (eq. 4.12, :data:`D`) or, in the
modified rules (Alg. A.1, A.6), by ``D_i^{-1}`` (:data:`D_INVERSE`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torchmetrics
from torch import Tensor

from .errors import ConfigError

__all__ = ["Loss", "MSE", "CrossEntropy", "get_loss", "loss_for_task", "LocalScaling", "D", "D_INVERSE", "pairing_mse", "class_similarity"]


class Loss(ABC):
    """Base of the output losses: subclasses give :meth:`per_sample`, :meth:`error`, :meth:`labels` and :meth:`metric`.

    >>> loss = get_loss("mse")
    >>> h, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]])
    >>> loss.output_target(h, y, 0.5)
    tensor([[0.5000, 2.0000]])
    """

    #: the name configs, hyper-parameters and checkpoints use
    name: str = ""
    #: the data modules' ``task`` this loss serves
    task: str = ""

    @abstractmethod
    def per_sample(self, h_L: Tensor, y: Tensor) -> Tensor:
        """The per-sample loss ``l(h_L, y)``, shape ``(B,)``."""

    @abstractmethod
    def error(self, h_L: Tensor, y: Tensor) -> Tensor:
        """``e_L = dl/dh_L`` (eq. 4.5), shape ``(B, n_L)``."""

    def output_target(self, h_L: Tensor, y: Tensor, target_stepsize: float) -> Tensor:
        """``h^_L = h_L - eta^ e_L`` (eq. 4.4): a gradient step of size ``eta^`` on the output."""
        return h_L - target_stepsize * self.error(h_L, y)

    @abstractmethod
    def labels(self, y: Tensor, n_out: int, dtype: torch.dtype | None = None) -> Tensor:
        """The labels in output space (``n_out`` units), as a target activation ``h_L = y``."""

    @abstractmethod
    def metric(self, num_outputs: int) -> dict[str, torchmetrics.Metric]:
        """The evaluation metric of this loss, by its log name (``val/<name>``, ``test/<name>``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MSE(Loss):
    """``l = 1/2 ||h_L - y||^2`` with ``e_L = h_L - y``; evaluated by the mean squared error.

    >>> MSE().per_sample(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]))
    tensor([2.5000])
    >>> MSE().error(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]))
    tensor([[1., 2.]])
    """

    name, task = "mse", "regression"

    def per_sample(self, h_L, y):
        return 0.5 * ((h_L - y) ** 2).sum(-1)

    def error(self, h_L, y):
        return h_L - y

    def labels(self, y, n_out, dtype=None):
        """``y`` itself (cast to ``dtype`` when given).

        >>> MSE().labels(torch.tensor([[1, 2]]), 2, torch.float64)
        tensor([[1., 2.]], dtype=torch.float64)
        """
        return y if dtype is None else y.to(dtype)

    def metric(self, num_outputs):
        return {"mse": torchmetrics.MeanSquaredError()}


class CrossEntropy(Loss):
    """Cross-entropy of logits ``h_L`` with integer labels ``y``: ``l = -log softmax(h_L)_y``,
    ``e_L = softmax(h_L) - onehot(y)``; evaluated by accuracy.

    >>> CrossEntropy().error(torch.zeros(1, 2), torch.tensor([1]))
    tensor([[ 0.5000, -0.5000]])
    """

    name, task = "cross_entropy", "classification"

    def per_sample(self, h_L, y):
        return torch.nn.functional.cross_entropy(h_L, y.long(), reduction="none")

    def error(self, h_L, y):
        p = torch.softmax(h_L, dim=-1)
        return p - self.labels(y, h_L.shape[-1], p.dtype)

    def labels(self, y, n_out, dtype=None):
        """``onehot(y)`` with ``n_out`` classes.

        A label outside ``[0, n_out)`` gets a row of zeros (checking would read the labels back from the device, as
        ``torch.nn.functional.one_hot`` does); the rules compute the batch's loss first, whose cross-entropy refuses it.

        >>> CrossEntropy().labels(torch.tensor([2, 0]), 3)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
        """
        return (y.long().unsqueeze(-1) == torch.arange(n_out, device=y.device)).to(dtype or torch.get_default_dtype())

    def metric(self, num_outputs):
        return {"acc": torchmetrics.Accuracy(task="multiclass", num_classes=num_outputs)}


_LOSSES = {cls.name: cls for cls in (MSE, CrossEntropy)}


def get_loss(loss: str | Loss) -> Loss:
    """The loss named ``loss`` (``mse`` or ``cross_entropy``); a :class:`Loss` is returned as it is.

    >>> get_loss("cross_entropy")
    CrossEntropy()
    """
    if isinstance(loss, Loss):
        return loss
    if loss not in _LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; expected 'mse' or 'cross_entropy'")
    return _LOSSES[loss]()


def loss_for_task(task: str | None) -> Loss | None:
    """The loss that serves a data module's ``task`` (``regression``, ``classification``); ``None`` for another task.

    >>> loss_for_task("classification")
    CrossEntropy()
    """
    return next((cls() for cls in _LOSSES.values() if cls.task == task), None)


class LocalScaling(ABC):
    """How the local update scales the target difference: ``D_i (h_i - h^_i)`` (:data:`D`, eq. 4.12) or
    ``D_i^{-1} (h_i - h^_i)`` (:data:`D_INVERSE`, the modified rules, Alg. A.1, A.6).

    >>> d, h, h_hat = torch.tensor([[0.5]]), torch.tensor([[1.0]]), torch.tensor([[0.0]])
    >>> D.delta(d, h, h_hat), D_INVERSE.delta(d, h, h_hat)
    (tensor([[0.5000]]), tensor([[2.]]))
    """

    #: divides by ``D`` (needs an invertible activation and dense layers)
    inverse: bool = False

    @abstractmethod
    def delta(self, d: Tensor, h: Tensor, h_hat: Tensor) -> Tensor:
        """The per-sample scaled difference, ``d`` the diagonal of ``D`` per sample."""

    def __repr__(self) -> str:
        return "D_INVERSE" if self.inverse else "D"


class _Derivative(LocalScaling):
    def delta(self, d, h, h_hat):
        return d * (h - h_hat)


class _InverseDerivative(LocalScaling):
    inverse = True

    def delta(self, d, h, h_hat):
        return (h - h_hat) / d


#: the update of the TP and DTP rules: ``D_i (h_i - h^_i)``
D: LocalScaling = _Derivative()
#: the update of the modified rules: ``D_i^{-1} (h_i - h^_i)``
D_INVERSE: LocalScaling = _InverseDerivative()


# --------------------------------------------------------------------------------------------- pairing losses
def pairing_mse(h: Tensor, c: Tensor, scale: float = 1.0) -> Tensor:
    """The counter-current pairing loss of a layer's forward activation ``h`` and feedback signal ``c`` (Kao & Hariharan
    2024, the dual networks' layer-wise loss; their autoencoder code, ``utils/loss.py``: ``F.mse_loss(A, B)``):
    ``scale * mean_{b,j} (h_bj - c_bj)^2``, both of shape ``(B, n)``.

    >>> pairing_mse(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]), scale=2.0)
    tensor(5.)
    """
    return scale * (h - c).pow(2).mean()


def class_similarity(h: Tensor, codes: Tensor, onehot: Tensor, scale: float = 1.0) -> Tensor:
    """The counter-current pairing loss for classification (Kao & Hariharan 2024; their MLP code, ``utils/loss.py``,
    ``compute_scl_loss_classification``): every sample's forward activation ``h_b`` (``h``: ``(B, n)``) against the
    feedback signal ``c_k`` of every class (``codes``: ``(K, n)``, the one-hot code of class ``k`` run down the feedback
    network), whose inner product should be 1 for the sample's class and 0 for the others (``onehot``: ``(B, K)``):

    ``scale / n * mean_{b,k} (h_b . c_k - onehot_bk)^2``.

    The authors' code writes ``mse_loss(A B^T, I) / n * loss_scale_C * 256`` with ``loss_scale_C = 0.5``: ``scale = 128``.

    >>> h, codes = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> class_similarity(h, codes, torch.tensor([[0.0, 1.0]]))  # (1 - 0)^2 and (0 - 1)^2, mean 1, over n = 2
    tensor(0.5000)
    """
    return scale / h.shape[-1] * (h.flatten(1) @ codes.flatten(1).T - onehot).pow(2).mean()
