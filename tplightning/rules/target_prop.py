"""One target-propagation rule assembled from pieces (thesis chapter 4, appendix A).

A rule is a network (:mod:`tplightning.layers`), one target map per hidden layer
(:mod:`tplightning.target_maps`), a layer selection (:mod:`tplightning.selection`), an update flavour
(``D_i`` or, for the modified rules, ``D_i^{-1}``) and optionally batch-normalised layer inputs
(:mod:`tplightning.normalization`). One training step:

forward pass -> output target ``h^_L = h_L - eta^ dl/dh_L`` (eq. 4.4) -> ``h^_i`` from ``h^_{i+1}`` through each
layer's map, top down -> forward update of the selected layers, the optimizer on the closed-form (or
autograd) gradients of ``mean_b 1/2 ||f_i(h_{i-1}) - h^_i||^2`` (eq. 4.12, Alg. A.10), or the exact-inverse
map's robust rank update where a map keeps ``W_{i+1}^{-1}`` -> feedback update (rules with learned maps).

The thesis' names are presets that choose the pieces (``rules/exact.py``, ``rules/learned.py``).
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .._lightning import OptimizerCallable
from ..errors import ConfigError
from ..layers import Dense, Layer
from ..losses import D, LocalScaling
from ..normalization import InputNormalization
from ..selection import AllLayers, LayerSelection
from ..target_maps import Step, TargetMap, plain
from .arguments import arguments_for
from .base import NORM_GUARD, LearningRule

__all__ = ["TargetPropRule"]


class TargetPropRule(LearningRule):
    """Base of the target-propagation rules; presets choose the pieces.

    A preset (a subclass) chooses its pieces as values: :meth:`make_maps` builds the target maps from the network and
    the constructor's arguments (``self.hparams``, recorded before any piece is built), and the class attributes
    below hold the rest. Building this class itself is a :class:`~tplightning.errors.ConfigError` (it is abstract).

    Attributes:
        selection_class: the :class:`~tplightning.selection.LayerSelection` built with ``layer_seed``:
            :class:`~tplightning.selection.AllLayers` (default) or :class:`~tplightning.selection.RandomLayer`
            (the randomized rules, Alg. A.2).
        scaling: the local update's :data:`~tplightning.losses.D` (default) or :data:`~tplightning.losses.D_INVERSE`
            (the modified rules, Alg. A.1, A.6).
        propagation: how targets go through a map: :func:`~tplightning.target_maps.plain` (``h^_i = g_i(h^_{i+1})``,
            default) or :class:`~tplightning.target_maps.Difference` (eq. 4.101); maps that set the target directly
            are never wrapped.

    It takes every argument of :class:`~tplightning.rules.base.LearningRule` too.

    Args:
        target_stepsize: output target step size ``eta^`` (eq. 4.4; thesis 0.1).
        layer_seed: seed of the generator that draws the layer of randomized rules. It is the same
            on every DDP replica, so all replicas update the same layer (a choice, not a reduction:
            replicas must stay identical and the draw carries no data).
        batch_norm: Alg. A.1's batch normalisation of every layer's input with de-normalised targets
            (:class:`~tplightning.normalization.InputNormalization`). Needs batches of at least two samples
            (the thesis' RMTP-EI at batch size 1 runs without it, section 5.1.3) and dense layers.
        bn_momentum: momentum of the running mean/variance.
        bn_eps: added to the variance.

    >>> import tplightning as tp
    >>> rule = tp.DTPAI(sizes=[3, 4, 4, 2])
    >>> hs, targets = rule.compute_targets(torch.randn(5, 3), torch.randn(5, 2))
    >>> [tuple(t.shape) for t in targets]
    [(5, 4), (5, 4), (5, 2)]
    """

    selection_class: ClassVar[type[LayerSelection]] = AllLayers
    scaling: ClassVar[LocalScaling] = D
    propagation: ClassVar[Callable[[TargetMap], TargetMap]] = staticmethod(plain)

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
        network: Sequence[Layer | nn.Module] | nn.Module | None = None,
        norm_guard: float | None = NORM_GUARD,
        *,
        target_stepsize: float = 0.1,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ):
        super().__init__(**arguments_for(super().__init__, locals()))
        if not target_stepsize > 0:
            raise ConfigError(f"target_stepsize must be > 0, got {target_stepsize}")
        self.target_stepsize = target_stepsize
        self.layer_seed = layer_seed
        self.selection = self.selection_class(layer_seed)
        self.last_layer = 0  # layer updated by the last randomized step (0: all)
        layers = list(self.net.layers)
        inverse = self.scaling.inverse
        if (inverse or batch_norm) and not all(isinstance(layer, Dense) for layer in layers):
            kinds = sorted({type(layer).__name__ if layer.matrix_structure else f"layer {i}, a {layer.describe()}"
                            for i, layer in enumerate(layers, start=1) if not isinstance(layer, Dense)})  # fmt: skip
            raise ConfigError(f"{'modified rules (D^-1)' if inverse else 'batch_norm'} need dense layers, got {', '.join(kinds)}")
        self.batch_norm, self.bn_momentum, self.bn_eps = batch_norm, bn_momentum, bn_eps
        self.normalization = InputNormalization(self.net.sizes[:-1], bn_momentum, bn_eps) if batch_norm else None
        self._bn_stats: list[tuple[Tensor, Tensor]] = []  # (mu, sigma) of each layer's input, last pass
        self._bn_inputs: list[Tensor] = []  # the normalised inputs of the last pass
        if inverse:
            for i, act in enumerate(self.net.activations, start=1):
                if not act.invertible:
                    raise ConfigError(f"modified rules divide by D_{i}; layer {i} activation {act!r} has no inverse")
        maps = [m if m.direct else self.propagation(m) for m in self.make_maps()]
        if len(maps) != len(layers) - 1:
            raise ValueError(f"{type(self).__name__} made {len(maps)} target maps for {len(layers) - 1} hidden layers")
        self.maps = nn.ModuleList([m.bind(i, layers[i - 1], layers[i]) for i, m in enumerate(maps, start=1)])
        self._keepers = {m.index + 1: m.base for m in self.maps if m.keeps_upper_weight}

    # ----------------------------------------------------------------------------- pieces
    @abstractmethod
    def make_maps(self) -> list[TargetMap]:
        """The target maps ``g_1, ..., g_{L-1}`` (unbound, before :attr:`propagation` wraps them), built from
        ``self.net`` and the constructor's arguments ``self.hparams``."""

    def propagate(self, i: int, h_hat_next: Tensor, hs: list[Tensor], pre: list[Tensor], step: Step | None = None) -> Tensor:
        """``h^_i`` from ``h^_{i+1}`` through layer ``i``'s map (before batch-norm de-normalisation); ``step``: the
        training step's :class:`~tplightning.target_maps.Step` (one without labels by default)."""
        return self.maps[i - 1].target(h_hat_next, step if step is not None else Step(hs, pre, self.target_stepsize))

    def g(self, i: int, h_next: Tensor) -> Tensor:
        """The feedback map ``g_i`` applied to a batch of layer-``(i+1)`` activations."""
        return self.maps[i - 1](h_next)

    def on_forward_weights_changed(self) -> None:
        for m in self.maps:
            m.on_weights_changed()

    def weight_is_acceptable(self, i: int, W: Tensor) -> bool:
        keeper = self._keepers.get(i)
        return keeper is None or keeper.accepts(W)

    # ----------------------------------------------------------------------------- targets
    def output_target(self, h_L: Tensor, y: Tensor) -> Tensor:
        """``h^_L = h_L - eta^ dl/dh_L`` on the model's outputs (eq. 4.4); auxiliary units keep their values."""
        o_hat = self.loss.output_target(self.net.model_output(h_L), y, self.target_stepsize)
        last = self.net.layers[-1]
        return last.output_target(o_hat, h_L) if hasattr(last, "output_target") else o_hat

    def targets_from(self, hs: list[Tensor], pre: list[Tensor], y: Tensor, down_to: int = 1) -> list[Tensor | None]:
        """``[h^_1, ..., h^_L]`` with entries below ``down_to`` left ``None`` (not computed): :meth:`propagate` down
        from the output target, each target de-normalised with ``batch_norm``."""
        L = self.num_layers
        step = Step(hs, pre, self.target_stepsize, lambda: self.loss.error(hs[-1], y))
        targets: list[Tensor | None] = [None] * L
        targets[L - 1] = step.output_target = self.output_target(hs[-1], y)
        for i in range(L - 1, down_to - 1, -1):
            t = self.propagate(i, targets[i], hs, pre, step)
            if self.normalization is not None:  # g_i targets the normalised input of layer i + 1
                t = self.maps[i - 1].denormalised(t, step, *self._bn_stats[i])
            targets[i - 1] = t
        return targets

    def forward_pass(self, x: Tensor, update_state: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        """``([h_0..h_L], [a_1..a_L])`` of a training batch; with ``batch_norm`` the layer inputs are
        normalised and, if ``update_state``, the running statistics updated."""
        if self.normalization is None:
            if update_state:
                return self.net.forward_all(x)
            with self.net.frozen_state():
                return self.net.forward_all(x)
        hs, pre, self._bn_inputs, self._bn_stats = self.normalization.forward_all(self.net, x, self.training, update_state)
        return hs, pre

    def forward(self, x: Tensor) -> Tensor:
        if self.normalization is None:
            return super().forward(x)
        hs = self.normalization.forward_all(self.net, x, train=False, update=False)[0]
        return self.net.model_output(hs[-1]).contiguous()

    def layer_input(self, i: int, hs: list[Tensor]) -> Tensor:
        """The input that layer ``i`` received in :meth:`forward_pass` (``h_{i-1}``, or normalised)."""
        return self._bn_inputs[i - 1] if self.normalization is not None else hs[i - 1]

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
        return self.selection(self.train_layers)[0]

    def forward_grads(self, layers: list[int], hs, pre, targets) -> dict[Tensor, Tensor]:
        """``{parameter: gradient}`` of the local losses of ``layers`` (eq. 4.12, scaled by :attr:`scaling`),
        each layer's :meth:`~tplightning.layers.Layer.local_grads` at the input it received."""
        grads = {}
        for i in layers:
            grads.update(self.net.layers[i - 1].local_grads(self.layer_input(i, hs), pre[i - 1], hs[i], targets[i - 1], self.scaling))
        return grads

    def update_forward(self, layers: list[int], hs, pre, targets) -> None:
        """Forward update of ``layers``: the optimizer on :meth:`forward_grads`, except for weights an exact-inverse
        map keeps, which take its robust rank update (``Delta W = U V^T``, the SGD step, ``U = -lr/B D (h - h^)``,
        ``V = h_{i-1}``; their biases still go through the optimizer)."""
        opt = self.optimizer_list()[0]
        grads = self.forward_grads([i for i in layers if i not in self._keepers], hs, pre, targets)
        kept = {}
        for i in (i for i in layers if i in self._keepers):
            layer = self.net.layers[i - 1]
            kept[i] = delta = layer.delta(pre[i - 1], hs[i], targets[i - 1], self.scaling)  # (B, n)
            if layer.bias is not None:
                grads[layer.bias] = delta.mean(0)
        self.apply_gradients(opt, grads)  # also with no gradients (a no-op): Lightning counts one step per batch
        if kept:
            lr = opt.param_groups[0]["lr"]
            world = self.trainer.world_size if self._trainer is not None else 1
            for i, delta in kept.items():
                U = (-lr / (delta.shape[0] * world)) * delta.T  # (n, B): Delta W = U V^T is the SGD step
                V = self.layer_input(i, hs).T  # (n, B)
                if world > 1:  # the same rank-(world*B) update on every replica
                    U, V = (torch.cat(list(self.all_gather(M)), dim=1) for M in (U, V))
                self._keepers[i].rank_update(U, V)

    def update_feedback(self, hs: list[Tensor], pre: list[Tensor]) -> None:
        """Hook for rules with learned feedback weights (Alg. A.8 / A.9); nothing by default."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            hs, pre = self.forward_pass(x)  # the batch's one pass that updates running statistics (blocks with batch norm)
            loss = self.loss_from_output(hs[-1], y)
            self.check_finite(loss, hs)
            layers = self.selection(self.train_layers)
            self.last_layer = self.selection.drawn(layers)
            with self.net.frozen_state():
                targets = self.targets_from(hs, pre, y, down_to=min(layers))
                self.update_forward(layers, hs, pre, targets)
                self.update_feedback(hs, pre)
        self.log_train(loss, x.shape[0])
        return loss

    # ----------------------------------------------------------------------------- checkpoints
    def extra_state(self) -> dict:
        return {**super().extra_state(), **self.selection.state()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.selection.load_state(state)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        _legacy_rule_keys(self, checkpoint.get("state_dict", {}))


def _legacy_rule_keys(rule: TargetPropRule, sd: dict) -> None:
    """Rename the keys of tplightning 0.1 checkpoints (``feedback.k``, ``W_inv_i``, ``running_mean_j``) in place."""
    feedback = [name for m_name, m in rule.maps.named_children() for name in [f"maps.{m_name}.{n}" for n, _ in m.named_parameters()]]
    for k, name in enumerate(feedback):
        if f"feedback.{k}" in sd:
            sd[name] = sd.pop(f"feedback.{k}")
    for i in rule._keepers:
        if f"W_inv_{i}" in sd:
            prefix = "inner." if rule.maps[i - 2] is not rule._keepers[i] else ""
            sd[f"maps.{i - 2}.{prefix}W_inv"] = sd.pop(f"W_inv_{i}")
    for key in [k for k in sd if k.startswith(("running_mean_", "running_var_"))]:
        sd[f"normalization.{key}"] = sd.pop(key)

