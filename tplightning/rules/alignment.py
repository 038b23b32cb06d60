"""Feedback alignment presets: FA (thesis 3.2.1, Lillicrap et al. 2016), DFA (3.2.2, Noekland 2016), BDFA (3.2.4, Luo et al. 2017),
and the family biotorch ships beside them: sign symmetry (uSF, brSF, frSF; Liao, Leibo & Poggio 2016), Kolen–Pollack
feedback (KP) and weight mirrors (WM; both Akrout et al. 2019).

FA and DFA are target-propagation rules whose maps carry fixed random feedback matrices
(:class:`~tplightning.target_maps.FeedbackAlignment`, :class:`~tplightning.target_maps.DirectFeedback`): the propagated
"targets" are ``h_i`` plus ``eta^`` times the FA/DFA error signal, and the local update ``D_i (h_i - h^_i) h_{i-1}^T``
is then eq. 3.20's. ``target_stepsize`` defaults to 1 here, so the forward learning rate means what it means for BP.
Bidirectional FA (3.2.4) trains the feedback weights in a second, auto-encoder phase (:class:`BDFA`); broadcast FA
(3.2.3) needs spiking neurons and is not implemented. The sign-symmetric rules and KP are FA with another ``B_i``
(:class:`~tplightning.target_maps.SignSymmetry`, :class:`~tplightning.target_maps.KolenPollack`,
:class:`~tplightning.target_maps.WeightMirror`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .._lightning import OptimizerCallable
from ..errors import ConfigError
from ..layers import FEEDBACK_LAWS, Dense, Layer, random_feedback
from ..target_maps import DirectFeedback, FeedbackAlignment, KolenPollack, SignSymmetry, TrainedFeedback, WeightMirror
from .arguments import arguments_for
from .base import NORM_GUARD, build_optimizer, check_optimizer_factory
from .target_prop import TargetPropRule

__all__ = ["FA", "DFA", "BDFA", "USF", "BRSF", "FRSF", "KP", "WM"]


class FA(TargetPropRule):
    """Feedback alignment: ``delta_i = D_{s_i} B_i delta_{i+1}`` with fixed random ``B_i`` of shape ``(n_i, n_{i+1})`` (eq. 3.18).

    ``B_i`` are drawn with std ``1/sqrt(n_{i+1})`` after the forward weights (``seed_everything`` sets both) and kept in
    the checkpoint. On a converted PyTorch model (:func:`~tplightning.blocks.convert`) each ``Linear`` and convolution of a
    block has its own ``B`` and the error is backpropagated through the block with them in the backward pass only
    (:class:`~tplightning.target_maps.FeedbackAlignment`); so for uSF, brSF, frSF and KP. Run: ``python train.py --config fa.yaml``.

    It takes every argument of :class:`~tplightning.rules.target_prop.TargetPropRule` too.

    Args:
        target_stepsize: ``eta^`` of the output target; 1 makes the update the FA gradient itself.
        feedback_init: the law of the random ``B_i`` (:func:`~tplightning.layers.random_feedback`): ``random`` (Gaussian
            with std ``1/sqrt(fan-in)``, ``1/sqrt(n_{i+1})`` for a dense layer above), ``xavier_normal`` (std
            ``sqrt(2 / (fan_in + fan_out))`` of ``B_i``'s fans, Glorot & Bengio 2010) or ``xavier_uniform``
            (``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``: biotorch's draw). The same for DFA's ``B~_i`` (fans ``n_i``
            and ``n_L``), BDFA's and KP's initial ``B_i``; the sign-symmetric rules (uSF, brSF, frSF) have their own
            magnitudes and take ``random`` only.

    >>> [tuple(B.shape) for B in FA(sizes=[3, 4, 5, 2]).feedback_weights]
    [(4, 5), (5, 2)]
    >>> round(float(FA(sizes=[3, 400, 10], feedback_init="xavier_uniform").feedback_weights[0].abs().max()), 2)  # a = sqrt(6/410)
    0.12
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
        network: Sequence[Layer | nn.Module] | nn.Module | None = None,
        norm_guard: float | None = NORM_GUARD,
        *,
        target_stepsize: float = 1.0,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        feedback_init: Literal["random", "xavier_normal", "xavier_uniform"] = "random",
    ):
        super().__init__(**arguments_for(super().__init__, locals()))

    def make_maps(self):
        return [FeedbackAlignment(self.feedback_law()) for _ in range(self.num_layers - 1)]

    def feedback_law(self) -> str:
        """``feedback_init``, checked: the law of the random feedback weights (:func:`~tplightning.layers.random_feedback`)."""
        law = self.hparams["feedback_init"]
        if law not in FEEDBACK_LAWS:
            raise ConfigError(f"feedback_init must be one of {', '.join(map(repr, FEEDBACK_LAWS))}, got {law!r}")
        return law

    @property
    def feedback_weights(self) -> list[Tensor]:
        """The feedback weights ``[B_1, ..., B_{L-1}]`` (a block above contributes one per weighted submodule, in order)."""
        return [B for m in self.maps for B in m.feedback_tensors()]


class DFA(FA):
    """Direct feedback alignment: ``delta_i = D_{s_i} B~_i delta_L`` with fixed random ``B~_i`` of shape ``(n_i, n_L)`` (eq. 3.21).

    Run: ``python train.py --config dfa.yaml``.

    >>> [tuple(B.shape) for B in DFA(sizes=[3, 4, 5, 2]).feedback_weights]
    [(4, 2), (5, 2)]
    """

    def make_maps(self):
        return [DirectFeedback(self.net.layers[-1], self.feedback_law()) for _ in range(self.num_layers - 1)]


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
        network: Sequence[Layer | nn.Module] | nn.Module | None = None,
        norm_guard: float | None = NORM_GUARD,
        *,
        target_stepsize: float = 1.0,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        feedback_init: Literal["random", "xavier_normal", "xavier_uniform"] = "random",
        feedback_optimizer: OptimizerCallable = torch.optim.SGD,
    ):
        super().__init__(**arguments_for(super().__init__, locals()))
        check_optimizer_factory("feedback_optimizer", feedback_optimizer)
        self.feedback_optimizer = feedback_optimizer
        first = self.net.layers[0]
        if not isinstance(first, Dense):
            raise ConfigError(f"BDFA reconstructs the input through a dense first layer, got {first.describe()}")
        blocks = [f"layer {i} ({layer.describe()})" for i, layer in enumerate(self.net.layers, start=1) if not isinstance(layer, Dense)]
        if blocks:
            raise ConfigError(
                f"BDFA's second phase (eqs. 3.25-3.27) runs the labels down through B_i as matrices and the error forward through "
                f"W_i and D_s_i of dense layers; it cannot serve {', '.join(blocks)}: use FA, DFA, uSF, brSF, frSF or KP there"
            )
        shape = (first.in_features, first.out_features)
        self.input_feedback = nn.Parameter(random_feedback(shape, first.out_features, self.feedback_law(), like=first.weight))

    def make_maps(self):
        return [TrainedFeedback(self.feedback_law()) for _ in range(self.num_layers - 1)]

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


class USF(FA):
    """Uniform sign-concordant feedback (uSF; Liao, Leibo & Poggio 2016): FA with ``B_i = c sign(W_{i+1})^T``, the signs read
    from the current forward weights at every step and ``c = sqrt(2 / (fan_in + fan_out))`` as in biotorch
    (:class:`~tplightning.target_maps.SignSymmetry`, ``magnitude="uniform"``). Run: ``python train.py --config usf.yaml``.

    It takes every argument of :class:`FA`.

    >>> rule = USF(sizes=[3, 4, 2])
    >>> torch.equal(torch.sign(rule.feedback_weights[0]), torch.sign(rule.net.weights[1].detach()).T)
    True
    """

    def make_maps(self):
        return [SignSymmetry("uniform", self.feedback_law()) for _ in range(self.num_layers - 1)]


class FRSF(FA):
    """Fixed random-magnitude sign-concordant feedback (frSF; Liao, Leibo & Poggio 2016): FA with
    ``B_i = |R_i| ⊙ sign(W_{i+1})^T``, ``R_i ~ U(-a, a)`` (Xavier's bound, as biotorch) drawn once after the forward weights
    (``seed_everything`` sets both) and kept in the checkpoint (:class:`~tplightning.target_maps.SignSymmetry`,
    ``magnitude="fixed"``). Run: ``python train.py --config frsf.yaml``.

    It takes every argument of :class:`FA`.

    >>> rule = FRSF(sizes=[3, 4, 2])
    >>> torch.equal(rule.feedback_weights[0].abs(), rule.maps[0].R)
    True
    """

    def make_maps(self):
        return [SignSymmetry("fixed", self.feedback_law()) for _ in range(self.num_layers - 1)]


class BRSF(FA):
    """Batchwise random-magnitude sign-concordant feedback (brSF; Liao, Leibo & Poggio 2016): FA with
    ``B_i = |R_i| ⊙ sign(W_{i+1})^T`` and ``R_i ~ U(-a, a)`` drawn afresh for every training batch
    (:class:`~tplightning.target_maps.SignSymmetry`, ``magnitude="batch"``), as biotorch redraws it at every forward pass.

    The magnitudes a batch uses are drawn at the end of the batch before (the first batch's when the maps are bound, from
    torch's global generator as frSF's), so the rule's buffers always hold the next batch's ``R`` (what
    :meth:`~tplightning.rules.target_prop.TargetPropRule.compute_targets` and the diagnostics see). The draws come from a CPU
    generator seeded ``feedback_seed``, the same on every DDP replica (the draw carries no data, so replicas stay
    identical, as with ``layer_seed``); its state and ``R`` are in the checkpoint, so a resumed run draws what the
    uninterrupted one would. Run: ``python train.py --config brsf.yaml``.

    It takes every argument of :class:`FA` too.

    Args:
        feedback_seed: seed of the magnitudes' generator.

    >>> rule = BRSF(sizes=[3, 4, 2], feedback_seed=1)
    >>> rule.redraw_feedback()
    >>> g = torch.Generator().manual_seed(1)
    >>> torch.equal(rule.maps[0].R, rule.maps[0].bounds[0] * torch.rand(4, 2, generator=g))
    True
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
        network: Sequence[Layer | nn.Module] | nn.Module | None = None,
        norm_guard: float | None = NORM_GUARD,
        *,
        target_stepsize: float = 1.0,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        feedback_init: Literal["random"] = "random",
        feedback_seed: int = 0,
    ):
        super().__init__(**arguments_for(super().__init__, locals()))
        self.feedback_seed = feedback_seed
        self._feedback_gen: torch.Generator | None = None

    def make_maps(self):
        return [SignSymmetry("batch", self.feedback_law()) for _ in range(self.num_layers - 1)]

    def feedback_generator(self) -> torch.Generator:
        """The magnitudes' CPU generator (seeded ``feedback_seed`` on first use, or restored from a checkpoint)."""
        if self._feedback_gen is None:
            self._feedback_gen = torch.Generator().manual_seed(self.feedback_seed)
        return self._feedback_gen

    def redraw_feedback(self) -> None:
        """Draw every ``|R_i|`` afresh (layer 1's first)."""
        g = self.feedback_generator()
        for m in self.maps:
            m.redraw(g)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.redraw_feedback()  # the next batch's magnitudes
        return loss

    def extra_state(self) -> dict:
        """Adds ``feedback_generator``, the magnitudes' generator state."""
        return {**super().extra_state(), "feedback_generator": self.feedback_generator().get_state()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if "feedback_generator" in state:
            self.feedback_generator().set_state(state["feedback_generator"])


class KP(FA):
    """Kolen–Pollack feedback (Akrout et al. 2019, eqs. 16-17): FA whose ``B_i`` take ``W_{i+1}``'s update transposed, with
    weight decay on both, so that ``W_{i+1} - B_i^T`` shrinks by ``(1 - eta lambda)`` at each step and ``B_i -> W_{i+1}^T``
    (:class:`~tplightning.target_maps.KolenPollack`).

    ``B_i`` of the trained layers ``i + 1`` are a second parameter group of the forward optimizer: same learning rate,
    schedule, momentum and weight decay ``lambda`` (the optimizer's ``weight_decay``; without it ``W - B^T`` stays as it
    started). The shrinking is exact for SGD (with or without momentum) and for decoupled weight decay (AdamW), where the
    moments of ``B`` are those of ``W`` transposed; with Adam's coupled decay it holds only approximately. Akrout et al.'s
    code writes the decay as the factor ``(1 - lambda)`` on both weights. Run: ``python train.py --config kp.yaml``.

    It takes every argument of :class:`FA`.

    >>> [tuple(B.shape) for B in KP(sizes=[3, 4, 5, 2]).feedback_parameters()]
    [(4, 5), (5, 2)]
    """

    def make_maps(self):
        return [KolenPollack(self.feedback_law()) for _ in range(self.num_layers - 1)]

    def feedback_parameters(self) -> list[Tensor]:
        """The ``B_i`` whose layer above is trained (the others keep their initial values, as FA's); a block above has one per
        weighted submodule."""
        return [B for m in self.maps if m.index + 1 in self.train_layers for B in m.feedback_tensors()]

    def build_optimizers(self):
        optimizers = super().build_optimizers()
        optimizers[0].add_param_group({"params": self.feedback_parameters()})
        return optimizers

    def forward_grads(self, layers, hs, pre, targets):
        """FA's gradients, and for each ``B_i`` whose ``W_{i+1}`` has one, that gradient in ``B_i``'s shape."""
        grads = super().forward_grads(layers, hs, pre, targets)
        for m in self.maps:
            grads.update(m.mirrored_grads(grads))
        return grads


class WM(FA):
    """Weight mirrors (Akrout et al. 2019, section 3, eq. 7 with weight decay): FA whose ``B_i`` learn in *mirror mode*,
    ``B_i <- B_i + eta_B mean_b x_b (W_{i+1} x_b)^T - lambda B_i`` with fresh noise ``x ~ N(0, sigma^2 I)`` in each layer's
    input space, so that ``B_i`` aligns with ``W_{i+1}^T`` (:class:`~tplightning.target_maps.WeightMirror`).

    As in the authors' code, mirror mode runs ``mirror_initial_steps`` times before the first training batch (they mirror
    over as many noise batches as the training set has batches) and ``mirror_steps`` times after every forward update.
    The noise comes from a CPU generator seeded ``feedback_seed``, the same on every DDP replica (it carries no data, so
    replicas stay identical); its state is in the checkpoint, so a resumed run draws what the uninterrupted one would.
    With ``mirror_weight_decay = mirror_lr * mirror_noise_std**2`` the mean ``B`` is ``W^T`` itself (the default).
    Run: ``python train.py --config wm.yaml``.

    It takes every argument of :class:`FA` too.

    Args:
        mirror_lr: ``eta_B``.
        mirror_noise_std: ``sigma`` of the mirror noise.
        mirror_weight_decay: ``lambda``; ``None``: ``eta_B sigma^2``.
        mirror_batch_size: noise samples per mirror step.
        mirror_steps: mirror steps after each forward update.
        mirror_initial_steps: mirror steps before the first training batch.
        feedback_init: the law of the random initial ``B_i``, as :class:`FA`'s.
        feedback_seed: seed of the noise's generator.

    >>> rule = WM(sizes=[3, 4, 2], mirror_initial_steps=300)
    >>> rule.mirror(rule.mirror_initial_steps)
    >>> bool(torch.allclose(rule.feedback_weights[0], rule.net.weights[1].detach().T, atol=0.2))
    True
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
        network: Sequence[Layer | nn.Module] | nn.Module | None = None,
        norm_guard: float | None = NORM_GUARD,
        *,
        target_stepsize: float = 1.0,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        feedback_init: Literal["random", "xavier_normal", "xavier_uniform"] = "random",
        mirror_lr: float = 0.1,
        mirror_noise_std: float = 1.0,
        mirror_weight_decay: float | None = None,
        mirror_batch_size: int = 64,
        mirror_steps: int = 1,
        mirror_initial_steps: int = 0,
        feedback_seed: int = 0,
    ):
        super().__init__(**arguments_for(super().__init__, locals()))
        for name, value in (("mirror_lr", mirror_lr), ("mirror_noise_std", mirror_noise_std)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name} must be a number > 0, got {value!r}")
        if mirror_weight_decay is not None and (isinstance(mirror_weight_decay, bool) or not isinstance(mirror_weight_decay, (int, float))
                                                or not 0 <= mirror_weight_decay < 1):  # fmt: skip
            raise ConfigError(f"mirror_weight_decay must be a number in [0, 1) or null (mirror_lr * mirror_noise_std**2), got {mirror_weight_decay!r}")
        for name, value, low in (("mirror_batch_size", mirror_batch_size, 1), ("mirror_steps", mirror_steps, 0),
                                 ("mirror_initial_steps", mirror_initial_steps, 0)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        decay = mirror_lr * mirror_noise_std**2 if mirror_weight_decay is None else mirror_weight_decay
        if not decay < 1:
            raise ConfigError(f"mirror_weight_decay = mirror_lr * mirror_noise_std**2 = {decay:g} must be < 1: give a smaller mirror_lr or mirror_noise_std, or mirror_weight_decay")
        self.mirror_lr, self.mirror_noise_std, self.mirror_decay = float(mirror_lr), float(mirror_noise_std), float(decay)
        self.mirror_batch_size, self.mirror_steps, self.mirror_initial_steps = mirror_batch_size, mirror_steps, mirror_initial_steps
        self.feedback_seed = feedback_seed
        self._feedback_gen: torch.Generator | None = None

    def make_maps(self):
        return [WeightMirror(self.feedback_law()) for _ in range(self.num_layers - 1)]

    def feedback_generator(self) -> torch.Generator:
        """The mirror noise's CPU generator (seeded ``feedback_seed`` on first use, or restored from a checkpoint)."""
        if self._feedback_gen is None:
            self._feedback_gen = torch.Generator().manual_seed(self.feedback_seed)
        return self._feedback_gen

    def mirror(self, steps: int) -> None:
        """``steps`` mirror steps of every feedback weight (layer 1's map first in each step)."""
        g = self.feedback_generator()
        for _ in range(steps):
            for m in self.maps:
                m.mirror_step(lambda shape: torch.randn(shape, generator=g), self.mirror_lr, self.mirror_noise_std, self.mirror_decay,
                              self.mirror_batch_size)  # fmt: skip

    def training_step(self, batch, batch_idx):
        if self.global_step == 0 and batch_idx == 0 and self.mirror_initial_steps:
            self.mirror(self.mirror_initial_steps)
        loss = super().training_step(batch, batch_idx)
        self.mirror(self.mirror_steps)
        return loss

    def extra_state(self) -> dict:
        """Adds ``feedback_generator``, the mirror noise's generator state."""
        return {**super().extra_state(), "feedback_generator": self.feedback_generator().get_state()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if "feedback_generator" in state:
            self.feedback_generator().set_state(state["feedback_generator"])
