"""The target-propagation core shared by every TP rule (thesis chapter 4, appendix A).

One training step: forward pass -> output target ``h^_L = h_L - eta^ dl/dh_L`` (eq. 4.4) ->
targets down the network through the rule's map ``g`` -> forward update, SGD (or any forward
optimizer) on ``mean_b 1/2 ||h_i - h^_i||^2`` with ``h^_i`` and ``h_{i-1}`` fixed (eq. 4.12,
Alg. A.10) -> feedback update (rules with learned inverses). Randomized rules (Alg. A.2) update
one layer ``k`` drawn uniformly per batch; modified rules (Alg. A.1) use ``D_i^{-1}`` for ``D_i``
and, with ``batch_norm``, normalise every layer's input over the batch and de-normalise the
targets (Alg. A.1, A.3).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .. import functional as F
from .base import LearningRule

__all__ = ["TargetPropRule"]


class TargetPropRule(LearningRule):
    """Base of the target-propagation rules; subclasses define the target map :meth:`propagate`.

    Args:
        target_stepsize: output target step size ``eta^`` (eq. 4.4; thesis 0.1).
        layer_seed: seed of the generator that draws the layer of randomized rules. It is the same
            on every DDP replica, so all replicas update the same layer (a choice, not a reduction:
            replicas must stay identical and the draw carries no data).
        batch_norm: Alg. A.1's batch normalisation: layer ``i`` receives
            ``h~_{i-1} = (h_{i-1} - mu) / sigma`` (per unit, over the batch; running statistics
            with momentum ``bn_momentum`` at evaluation); ``g_i`` inverts ``f_{i+1}`` onto ``h~_i``
            and the target is de-normalised, ``h^_i = sigma * g_i(h^_{i+1}) + mu``. Where Alg. A.1
            writes ``h_{k-1}`` in the update we use the normalised input ``h~_{k-1}`` the layer
            received: the local loss depends on ``W_k`` through ``f_k(h~_{k-1})``, so this is its
            gradient. Needs batches of at least two samples (the thesis' RMTP-EI at batch size 1
            runs without it, section 5.1.3).
        bn_momentum: momentum of the running mean/variance.
        bn_eps: added to the variance.
        **kwargs: the arguments of :class:`~tplightning.rules.base.LearningRule`.
    """

    randomized: ClassVar[bool] = False
    modified: ClassVar[bool] = False

    def __init__(
        self,
        *args,
        target_stepsize: float = 0.1,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if not target_stepsize > 0:
            raise ValueError(f"target_stepsize must be > 0, got {target_stepsize}")
        self.target_stepsize = target_stepsize
        self.layer_seed = layer_seed
        self.layer_generator = torch.Generator().manual_seed(layer_seed)
        self.last_layer = 0  # layer updated by the last randomized step (0: all)
        self.batch_norm, self.bn_momentum, self.bn_eps = batch_norm, bn_momentum, bn_eps
        if batch_norm:
            for j, n in enumerate(self.net.sizes[:-1]):
                self.register_buffer(f"running_mean_{j}", torch.zeros(n))
                self.register_buffer(f"running_var_{j}", torch.ones(n))
        self._bn_stats: list[tuple[Tensor, Tensor]] = []  # (mu, sigma) of each layer's input, last pass
        self._bn_inputs: list[Tensor] = []  # the normalised inputs of the last pass
        if self.modified:
            for i, act in enumerate(self.net.activations, start=1):
                if not act.invertible:
                    raise ValueError(f"modified rules divide by D_{i}; layer {i} activation {act!r} has no inverse")

    # ----------------------------------------------------------------------------- targets
    def propagate(self, i: int, h_hat_next: Tensor, hs: list[Tensor], pre: list[Tensor]) -> Tensor:
        """``h^_i`` from ``h^_{i+1}``, for ``i = L-1, ..., 1``; ``hs = [h_0..h_L]``, ``pre = [a_1..a_L]``."""
        raise NotImplementedError

    def output_target(self, h_L: Tensor, y: Tensor) -> Tensor:
        return F.output_target(h_L, y, self.loss_name, self.target_stepsize)

    def top_targets(self, hs: list[Tensor], pre: list[Tensor], y: Tensor) -> dict[int, Tensor]:
        """Targets that do not come from :meth:`propagate`: ``{L: h^_L}`` (rules may add more)."""
        return {self.num_layers: self.output_target(hs[-1], y)}

    def targets_from(self, hs: list[Tensor], pre: list[Tensor], y: Tensor, down_to: int = 1) -> list[Tensor | None]:
        """``[h^_1, ..., h^_L]`` with entries below ``down_to`` left ``None`` (not computed)."""
        L = self.num_layers
        targets: list[Tensor | None] = [None] * L
        for i, t in self.top_targets(hs, pre, y).items():
            targets[i - 1] = t
        for i in range(L - 1, down_to - 1, -1):
            if targets[i - 1] is None:
                t = self.propagate(i, targets[i], hs, pre)
                if self.batch_norm:  # g_i targets the normalised input of layer i + 1
                    mu, sigma = self._bn_stats[i]
                    t = sigma * t + mu
                targets[i - 1] = t
        return targets

    def forward_pass(self, x: Tensor, update_state: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        """``([h_0..h_L], [a_1..a_L])`` of a training batch; with ``batch_norm`` the layer inputs are
        normalised and, if ``update_state``, the running statistics updated."""
        if not self.batch_norm:
            return self.net.forward_all(x)
        return self._normalised_pass(x, train=self.training, update=update_state)

    def forward(self, x: Tensor) -> Tensor:
        if not self.batch_norm:
            return super().forward(x)
        h = self._normalised_pass(x, train=False, update=False)[0][-1]
        return h if h.shape[-1] == self.output_dim else h[..., : self.output_dim].contiguous()

    def layer_input(self, i: int, hs: list[Tensor]) -> Tensor:
        """The input that layer ``i`` received in :meth:`forward_pass` (``h_{i-1}``, or normalised)."""
        return self._bn_inputs[i - 1] if self.batch_norm else hs[i - 1]

    def _normalised_pass(self, x: Tensor, train: bool, update: bool) -> tuple[list[Tensor], list[Tensor]]:
        hs, pre, self._bn_stats, self._bn_inputs = [x], [], [], []
        for i in range(1, self.num_layers + 1):
            h = hs[-1]
            mean, var = getattr(self, f"running_mean_{i - 1}"), getattr(self, f"running_var_{i - 1}")
            if train:
                if h.shape[0] < 2:
                    raise ValueError(f"batch_norm normalises over the batch and needs batches of at least 2 samples, got {h.shape[0]}")
                mu = h.mean(0)
                centred = h - mu
                v = (centred * centred).mean(0)  # biased variance; reuses h - mu (torch.var's column reduction is slow on CPU)
                if update:
                    mean.lerp_(mu, self.bn_momentum)
                    var.lerp_(v, self.bn_momentum)
            else:
                mu, v = mean, var
                centred = h - mu
            sigma = (v + self.bn_eps).sqrt()
            self._bn_stats.append((mu, sigma))
            self._bn_inputs.append(centred / sigma)
            a, h = self.net.layer(i, self._bn_inputs[-1])
            pre.append(a)
            hs.append(h)
        return hs, pre

    @torch.no_grad()
    def compute_targets(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Forward pass and targets of every layer; changes no weight.

        Returns:
            ``([h_0, ..., h_L], [h^_1, ..., h^_L])`` with ``h^_L`` the output target.
        """
        hs, pre = self.forward_pass(x, update_state=False)
        return hs, self.targets_from(hs, pre, y, 1)

    # ----------------------------------------------------------------------------- updates
    def draw_layer(self) -> int:
        """Uniform draw from the trainable layers (Alg. A.2) with the seeded layer generator."""
        j = int(torch.randint(len(self.train_layers), (1,), generator=self.layer_generator))
        return self.train_layers[j]

    def layer_delta(self, i: int, hs, pre, targets) -> Tensor:
        """``D_i (h_i - h^_i)`` (``D_i^{-1}`` for modified rules), ``(B, n_i)``."""
        d = self.net.activations[i - 1].derivative(pre[i - 1], hs[i])
        return F.local_delta(d, hs[i], targets[i - 1], self.modified)

    def forward_grads(self, layers: list[int], hs, pre, targets) -> dict[Tensor, Tensor]:
        """Closed-form gradients of the local losses (eq. 4.12, :func:`~tplightning.functional.local_update`)."""
        grads = {}
        for i in layers:
            delta = self.layer_delta(i, hs, pre, targets)
            grads[self.net.weights[i - 1]] = (delta / delta.shape[0]).T @ self.layer_input(i, hs)
            if self.net.biases is not None:
                grads[self.net.biases[i - 1]] = delta.mean(0)
        return grads

    def update_forward(self, layers: list[int], hs, pre, targets) -> None:
        """Apply the forward update to ``layers`` through the forward optimizer."""
        self.apply_gradients(self.optimizer_list()[0], self.forward_grads(layers, hs, pre, targets))

    def update_feedback(self, hs: list[Tensor], pre: list[Tensor]) -> None:
        """Hook for rules with learned feedback weights (Alg. A.8 / A.9); nothing by default."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            hs, pre = self.forward_pass(x)
            loss = self.loss_from_output(hs[-1], y)
            self.check_finite(loss, hs)
            layers = [self.draw_layer()] if self.randomized else self.train_layers
            self.last_layer = layers[0] if self.randomized else 0
            targets = self.targets_from(hs, pre, y, down_to=min(layers))
            self.update_forward(layers, hs, pre, targets)
            self.update_feedback(hs, pre)
        self.log_train(loss, x.shape[0])
        return loss

    # ----------------------------------------------------------------------------- checkpoints
    def extra_state(self) -> dict:
        return {**super().extra_state(), "layer_generator": self.layer_generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if "layer_generator" in state:
            self.layer_generator.set_state(state["layer_generator"])
