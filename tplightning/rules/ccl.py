"""Counter-current learning (CCL; Kao & Hariharan, "Counter-Current Learning: A Biologically Plausible Dual Network Approach
for Deep Learning", NeurIPS 2024).

Two anti-parallel networks: the forward network carries the input up, ``h_i = f_i(h_{i-1})``; a feedback network carries
the target down, ``c_L = y`` (one-hot codes for classification), ``c_i = g_i(c_{i+1}) = s_i(Q_i c_{i+1})``. Every hidden
layer ``i`` pairs the two by a local loss ``P_i(h_i, c_i)`` in which both sides are cut from the layers below (forward) and
above (feedback) by stop-gradients, so ``P_i`` trains exactly ``W_i`` and ``Q_i``; the output layer learns from the output
loss alone, its input cut too. No gradient crosses a layer.

Here the feedback network is this library's original-form map ``g_i(h) = s_i(Q_i h)``
(:class:`~tplightning.target_maps.OriginalInverse`) run on the targets instead of on ``h^_{i+1}``, and the forward side is a
target-propagation update: ``W_i`` descends ``P_i`` through the target ``h^_i = h_i - B dP_i/dh_i`` (``B`` the batch), whose
local loss ``mean_b 1/2 ||f_i(h_{i-1}) - h^_i||^2`` (eq. 4.12) has exactly ``P_i``'s gradient in ``W_i``; with
``target_stepsize`` 1 the output layer's update is the output loss's gradient, as in CCL. So :meth:`compute_targets` and the
diagnostics see CCL's targets like any other rule's.

Pairing losses (:mod:`tplightning.losses`): ``mse`` (:func:`~tplightning.losses.pairing_mse`: ``c_L = y`` per sample, as the
paper's autoencoders) and ``similarity`` (:func:`~tplightning.losses.class_similarity`: the code of every class run down,
each sample's ``h_i`` against every class's ``c_i``, as the authors' classification code).

Sources: the paper's abstract and figure 1 (dual networks, layer-wise losses, gradient detaching), and the authors' code
(github.com/IandRover/CCL-NeurIPS24: ``models/layers.py`` (``C2Linear``: ``forward`` and ``reverse`` detach their input),
``models/models.py`` (``LinearModel_MNIST``, 784-256x5-10; ``reverse`` of the ten class codes), ``utils/loss.py``
(``compute_scl_loss_classification``, the pairs ``activations[:-1]``, ``signals[:-1]`` plus cross-entropy on the output),
``main_class_mlp.py`` (SGD, gradient clipping at norm 1 for each network) and ``yaml/mlp/mnist_ccl.yaml`` (lr 1 for both,
batch 256, 100 epochs, ELU both ways)). The paper's equation numbers could not be read here. Choices: the pair of the input
with ``c_0 = Q_0 c_1`` (the code's first pair) trains only a feedback matrix that no forward weight or prediction depends on,
so it is left out (it matters for the paper's autoencoders, not for classification); the feedback network uses the forward
network's activation ``s_i`` (the code: ELU both ways; this library has no ELU, the configs use tanh).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .._lightning import OptimizerCallable
from ..errors import ConfigError
from ..layers import Layer
from ..losses import class_similarity, pairing_mse
from ..target_maps import OriginalInverse
from .arguments import arguments_for
from .base import NORM_GUARD, build_optimizer, check_optimizer_factory
from .target_prop import TargetPropRule

__all__ = ["CCL", "clip_total_norm"]


def clip_total_norm(grads: dict[Tensor, Tensor], max_norm: float | None) -> dict[Tensor, Tensor]:
    """``grads`` scaled by ``min(1, max_norm / (||grads|| + 1e-6))``, ``||.||`` the norm of all of them together (what
    ``torch.nn.utils.clip_grad_norm_`` does to ``.grad``); unchanged for ``max_norm=None``.

    >>> g = {torch.zeros(1): torch.tensor([3.0]), torch.zeros(1): torch.tensor([4.0])}
    >>> [round(float(v), 4) for v in clip_total_norm(g, 1.0).values()]
    [0.6, 0.8]
    """
    if max_norm is None or not grads:
        return grads
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {p: g * factor for p, g in grads.items()}


class CCL(TargetPropRule):
    """Counter-current learning: a forward and a feedback network trained pairwise, layer by layer (Kao & Hariharan 2024).

    ``c_L`` is the label (``pairing='mse'``: ``y`` per sample, in output space) or the code of every class
    (``pairing='similarity'``), ``c_i = s_i(Q_i c_{i+1})`` for ``i = L-1, ..., 1``, and each hidden layer's loss is
    ``P_i = pairing_mse(h_i, c_i)`` or ``class_similarity(h_i, [c_i^k]_k, onehot(y))``. ``W_i`` and ``Q_i`` descend ``P_i``
    (gradients taken at the same step, before either changes); the output layer descends the output loss (target step 1).
    Run: ``python train.py --config ccl.yaml``.

    It takes every argument of :class:`~tplightning.rules.target_prop.TargetPropRule` too (``batch_norm`` is refused).

    Args:
        target_stepsize: ``eta^`` of the output target; 1 makes the output layer's update the output loss's gradient.
        feedback_optimizer: optimizer of ``Q_1, ..., Q_{L-1}`` (the authors: SGD, lr 1).
        feedback_init: ``random`` (Gaussian ``Q_i``, std ``1/sqrt(n_{i+1})``: an independent network, as the paper) or
            ``pinv`` (``Q_i = W_{i+1}^dagger`` at the start).
        pairing: ``mse`` or ``similarity`` (needs ``loss: cross_entropy``).
        pairing_scale: the factor of every ``P_i`` (the authors' classification code: 128).
        grad_clip: the forward gradients (all layers together) and the feedback gradients are each clipped to this total
            norm (the authors: 1); ``None``: no clipping.

    >>> rule = CCL(sizes=[3, 4, 4, 2])
    >>> [tuple(Q.shape) for Q in rule.feedback_parameters()]
    [(4, 4), (4, 2)]
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
        init: Literal["gaussian", "orthogonal"] = "gaussian",
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
        feedback_init: Literal["random", "pinv"] = "random",
        pairing: Literal["mse", "similarity"] = "mse",
        pairing_scale: float = 1.0,
        grad_clip: float | None = None,
    ):
        if batch_norm:
            raise ConfigError("CCL has no batch-normalised form here: set batch_norm: false")
        if feedback_init not in ("random", "pinv"):
            raise ConfigError(f"feedback_init must be 'random' or 'pinv' for CCL, got {feedback_init!r}")
        if pairing not in ("mse", "similarity"):
            raise ConfigError(f"pairing must be 'mse' or 'similarity', got {pairing!r}")
        if pairing == "similarity" and loss != "cross_entropy":
            raise ConfigError(f"pairing 'similarity' pairs each sample with every class's code: it needs loss: cross_entropy, got {loss!r}")
        if not pairing_scale > 0:
            raise ConfigError(f"pairing_scale must be > 0, got {pairing_scale}")
        if grad_clip is not None and not grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 (or null for no clipping), got {grad_clip}")
        super().__init__(**arguments_for(super().__init__, locals()))
        check_optimizer_factory("feedback_optimizer", feedback_optimizer)
        self.feedback_optimizer = feedback_optimizer
        self.pairing, self.pairing_scale, self.grad_clip = pairing, pairing_scale, grad_clip

    # ----------------------------------------------------------------------------- pieces
    def make_maps(self):
        """The feedback network: one original-form map ``g_i(h) = s_i(Q_i h)`` per hidden layer, trained here by the pairing
        losses (no noise, no reconstruction loss of its own)."""
        return [OriginalInverse(noise_std=0.0, init=self.hparams["feedback_init"]) for _ in range(self.num_layers - 1)]

    def feedback_parameters(self) -> list[Tensor]:
        return [m.Q for m in self.maps]

    @property
    def feedback_weights(self) -> list[Tensor]:
        """The feedback network's matrices ``[Q_1, ..., Q_{L-1}]``, ``Q_i`` of shape ``(n_i, n_{i+1})``."""
        return self.feedback_parameters()

    def build_optimizers(self):
        return super().build_optimizers() + [build_optimizer("feedback_optimizer", self.feedback_optimizer, self.feedback_parameters())]

    # ----------------------------------------------------------------------------- the counter-current pass
    def top_signal(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """``c_L``: the labels in output space (``mse``), or the one-hot code of every class, ``(K, n_L)`` (``similarity``)."""
        n = self.output_dim
        if self.pairing == "similarity":
            return self.loss.labels(torch.arange(n, device=y.device), n, dtype)
        return self.loss.labels(y, n, dtype)

    def signals(self, y: Tensor, dtype: torch.dtype) -> list[Tensor | None]:
        """``[None, c_1, ..., c_L]``: the target run down the feedback network (no gradient)."""
        L = self.num_layers
        cs: list[Tensor | None] = [None] * (L + 1)
        cs[L] = self.top_signal(y, dtype)
        for i in range(L - 1, 0, -1):
            cs[i] = self.maps[i - 1](cs[i + 1])
        return cs

    def pairing_loss(self, h: Tensor, c: Tensor, y: Tensor) -> Tensor:
        """``P_i(h_i, c_i)`` (:func:`~tplightning.losses.pairing_mse` or :func:`~tplightning.losses.class_similarity`)."""
        h = h.flatten(1)
        if self.pairing == "similarity":
            return class_similarity(h, c.flatten(1), self.loss.labels(y, c.shape[0], h.dtype), self.pairing_scale)
        return pairing_mse(h, c.flatten(1), self.pairing_scale)

    def counter_current(self, hs: list[Tensor], y: Tensor, down_to: int = 1) -> tuple[list[Tensor | None], dict[Tensor, Tensor]]:
        """``([h^_1, ..., h^_{L-1}] with None below down_to, {Q_i: dP_i/dQ_i})`` of one batch, from the same weights."""
        L = self.num_layers
        cs = self.signals(y, hs[-1].dtype)
        targets: list[Tensor | None] = [None] * (L - 1)
        grads: dict[Tensor, Tensor] = {}
        for i in range(down_to, L):
            with torch.enable_grad():
                h = hs[i].detach().requires_grad_(True)
                c = cs[i].detach().requires_grad_(True)
                dh, dc = torch.autograd.grad(self.pairing_loss(h, c, y), (h, c))
            targets[i - 1] = hs[i] - hs[i].shape[0] * dh
            grads[self.maps[i - 1].Q] = self.maps[i - 1].q_grad([(cs[i + 1], dc)])
        return targets, grads

    def targets_from(self, hs, pre, y, down_to=1):
        """``[h^_1, ..., h^_L]``: CCL's targets ``h^_i = h_i - B dP_i/dh_i`` under the output target ``h^_L`` (eq. 4.4)."""
        targets, _ = self.counter_current(hs, y, down_to)
        return [*targets, self.output_target(hs[-1], y)]

    # ----------------------------------------------------------------------------- updates
    def update_forward(self, layers, hs, pre, targets) -> None:
        """The optimizer on the local gradients of ``layers``, clipped together to ``grad_clip``."""
        grads = clip_total_norm(self.forward_grads(layers, hs, pre, targets), self.grad_clip)
        self.apply_gradients(self.optimizer_list()[0], grads)

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            hs, pre = self.forward_pass(x)
            loss = self.loss_from_output(hs[-1], y)
            self.check_finite(loss, hs)
            layers = self.selection(self.train_layers)
            self.last_layer = self.selection.drawn(layers)
            hidden, fb = self.counter_current(hs, y, 1)
            targets = [*hidden, self.output_target(hs[-1], y)]
            self.update_forward(layers, hs, pre, targets)
            self.apply_gradients(self.optimizer_list()[1], clip_total_norm(fb, self.grad_clip))
        self.log_train(loss, x.shape[0])
        return loss
