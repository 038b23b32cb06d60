"""Target propagation with learned (approximate) inverses (thesis 4.3, 5.2; Alg. A.8-A.17).

Two forms of the feedback map ``g_i`` (``Q_i`` of shape ``(n_i, n_{i+1})``):

* thesis form ``g_i(h) = Q_i s_{i+1}^{-1}(h)`` (eq. 4.90 / 5.51), trained by Alg. A.8 on fresh
  white noise ``h_i ~ N(0, sigma^2 I)`` with the regularised inverse loss (eq. 4.97): its
  minimiser is ``W^T (W W^T + lambda/sigma^2 I)^{-1}`` (theorem 4.7), ``W^{-1}`` / ``W^dagger``
  for ``lambda -> 0`` (theorem 4.6);
* original form ``g_i(h) = s_i(Q_i h)`` (eq. 5.54; Bengio 2014, Lee et al. 2015), trained by
  Alg. A.9 on the current activations, optionally with noise injection (eq. 3.13).

Targets propagate plainly ``h^_i = g_i(h^_{i+1})`` or by difference
``h^_i = h_i + g_i(h^_{i+1}) - g_i(h_{i+1})`` (eq. 4.101), which cancels reconstruction errors.

DDP: the forward and feedback updates are gradients averaged over replicas before the optimizer
step, so all replicas stay identical. The noise of Alg. A.8 / eq. 3.13 is drawn per replica
(seeded ``feedback_seed + rank``): averaging the replicas' feedback gradients then uses
``world_size`` times more noise samples, which is what a larger batch would do. The layer
drawn by randomized rules is identical on every replica (same seed, no data involved).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .._lightning import OptimizerCallable
from ..adaptive import Adaptive, AdaptiveTargetProp
from ..errors import ConfigError
from ..layers import Layer
from ..losses import D_INVERSE
from ..schedules import FeedbackSchedule
from ..selection import RandomLayer
from ..target_maps import Difference, GradientTarget, OriginalInverse, Step, TargetMap, ThesisInverse, check_feedback_options
from .arguments import arguments_for
from .base import NORM_GUARD, build_optimizer, check_optimizer_factory
from .target_prop import TargetPropRule

__all__ = [
    "LearnedInverseRule",
    "TPAI",
    "RTPAI",
    "DTPAI",
    "RDTPAI",
    "OriginalTP",
    "OriginalRTP",
    "OriginalDTP",
    "OriginalRDTP",
    "LeeDTP",
    "AOSDTP",
    "MTP",
]


class LearnedInverseRule(AdaptiveTargetProp, TargetPropRule):
    """Shared machinery of the rules whose feedback weights ``Q_i`` are learned.

    It takes every argument of :class:`~tplightning.rules.target_prop.TargetPropRule` too.

    Args:
        feedback_optimizer: optimizer of the feedback weights ``Q_i`` (SGD in the thesis).
        feedback_noise_std: ``sigma`` of the white-noise inputs of Alg. A.8 (thesis form) or of the
            noise injection of eq. 3.13 (original form; 0 disables it).
        feedback_weight_decay: ``lambda`` of the regularised inverse loss (eq. 4.97): the update is
            ``Q <- (1 - eta_b lambda) Q - eta_b grad`` for SGD.
        feedback_iterations: feedback updates per training batch.
        feedback_batch_size: noise samples per feedback update (thesis form); ``None``: the
            training batch size.
        feedback_pretrain_epochs: epochs at the start of training that update only ``Q`` (Meulemans et al. 2020
            pre-train DRL's and DDTP's feedback for 6 epochs on MNIST; their ``epochs_fb``).
        feedback_init: ``pinv`` sets ``Q_i = W_{i+1}^dagger`` at the start and whenever the forward
            weights are replaced (what the thesis' experiments do, section 5.2.2); ``regularised``
            sets the regularised inverse of theorem 4.7, ``W^T (W W^T + lambda/sigma^2 I)^{-1}`` with
            ``lambda = feedback_weight_decay`` (> 0) and ``sigma = feedback_noise_std``, the fixed
            point of the feedback training (:func:`tplightning.functional.regularised_inverse`); ``random``
            draws Gaussian ``Q_i`` with std ``1/sqrt(n_{i+1})``, ``xavier_normal`` and ``xavier_uniform`` draw them under
            Glorot & Bengio (2010)'s laws with ``Q_i``'s fans (:func:`~tplightning.layers.random_feedback`;
            ``xavier_normal`` is Meulemans et al. 2020's). A block's automatic feedback module draws its weights the same way.
        feedback_bias: a feedback bias inside the nonlinearity, ``g_i(h) = s_i(Q_i h + d_i)``, ``d_i`` starting at 0 and
            trained by the same feedback loss (Meulemans et al. 2020's code;
            :class:`~tplightning.target_maps.OriginalInverse`). The original form on dense layers only (DTP, DRL,
            L-DRL, ...); the thesis form ``Q s^{-1}`` and DDTP-linear refuse it (DDTP-linear's linear direct map
            ``Q_i h_L + d_i`` enters its targets and its loss only as ``g_i(h^_L) - g_i(h_L)``, where ``d_i`` cancels).
        feedback_seed: seed of the feedback noise (offset by the DDP rank).
        feedback_only: train only the feedback weights ``Q_i`` in every epoch (as in the pre-training epochs): the
            forward weights stay as they are and the learning rates keep their initial values. The CLI refuses a forward
            learning rate of 0 unless this is set (a run that would learn nothing).
        feedback_extra_epochs: after the pre-training, every epoch that trains the forward weights is followed by this
            many epochs that train only ``Q`` (Meulemans et al. 2020's ``extra_fb_epochs``: 1 for DRL on MNIST). Epochs
            count in ``max_epochs``; which kind an epoch is follows from its number alone (:meth:`trains_forward`), so a
            resumed run continues the schedule exactly. The learning-rate schedule moves on forward epochs only.
        adaptive: local adaptive damping and step sizes (:class:`~tplightning.adaptive.Adaptive`; thesis 4.2.3);
            ``None``: fixed ``eta^`` and the decaying learning rate.
        feedback_schedule: on which batches and how often ``Q`` learns (:class:`~tplightning.schedules.FeedbackSchedule`:
            every ``k``-th batch, a decreasing count, a stopping rule on the feedback loss, or the closed form for the
            maps that have one); ``None``: ``feedback_iterations`` updates on every batch.

    Attributes:
        feedback_map: the class of the learned maps, built with :attr:`feedback_options`:
            :class:`~tplightning.target_maps.ThesisInverse` (default, the thesis form) or
            :class:`~tplightning.target_maps.OriginalInverse` and its subclasses (the original form).

    A preset such as :class:`DTPAI` is built; the options reach its maps:

    >>> rule = DTPAI(sizes=[3, 4, 2], feedback_noise_std=0.5)
    >>> rule.maps[0].inner.noise_std, rule.feedback_options["batch_size"]
    (0.5, None)
    """

    feedback_map: ClassVar[type[TargetMap]] = ThesisInverse

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
        feedback_noise_std: float = 1.0,
        feedback_weight_decay: float = 0.0,
        feedback_iterations: int = 1,
        feedback_batch_size: int | None = None,
        feedback_pretrain_epochs: int = 0,
        feedback_init: Literal["pinv", "regularised", "random", "xavier_normal", "xavier_uniform"] = "pinv",
        feedback_bias: bool = False,
        feedback_seed: int = 0,
        feedback_only: bool = False,
        feedback_extra_epochs: int = 0,
        adaptive: Adaptive | None = None,
        feedback_schedule: FeedbackSchedule | None = None,
    ):
        if feedback_iterations < 1 or feedback_pretrain_epochs < 0:
            raise ConfigError(
                f"feedback_iterations must be >= 1 and feedback_pretrain_epochs >= 0, got {feedback_iterations} and {feedback_pretrain_epochs}"
            )
        check_feedback_options(feedback_noise_std, feedback_weight_decay, feedback_init)
        if feedback_bias and not issubclass(self.feedback_map, OriginalInverse):
            raise ConfigError(
                f"feedback_bias needs the original form g_i(h) = s_i(Q_i h + d_i); {type(self).__name__}'s "
                f"{self.feedback_map.__name__} has no place for it" + (": d_i would cancel in g_i(h^_L) - g_i(h_L)" if self.feedback_map.direct else "")
            )
        if feedback_batch_size is not None and feedback_batch_size < 1:
            raise ConfigError(f"feedback_batch_size must be >= 1 (or None for the training batch size), got {feedback_batch_size}")
        super().__init__(**arguments_for(super().__init__, locals()))
        check_optimizer_factory("feedback_optimizer", feedback_optimizer)
        self.feedback_optimizer = feedback_optimizer
        self.feedback_noise_std, self.feedback_weight_decay = feedback_noise_std, feedback_weight_decay
        self.feedback_iterations, self.feedback_batch_size = feedback_iterations, feedback_batch_size
        self.feedback_pretrain_epochs, self.feedback_init, self.feedback_seed = feedback_pretrain_epochs, feedback_init, feedback_seed
        self.feedback_only = bool(feedback_only)
        if feedback_extra_epochs < 0:
            raise ConfigError(f"feedback_extra_epochs must be >= 0, got {feedback_extra_epochs}")
        self.feedback_extra_epochs = int(feedback_extra_epochs)
        self._noise_gen: torch.Generator | None = None
        self._noise_states: list[Tensor] | None = None  # per-rank states a checkpoint restored, not yet applied
        self.init_adaptive(adaptive)
        self.init_feedback_schedule(feedback_schedule)

    # ----------------------------------------------------------------------------- pieces
    @property
    def feedback_options(self) -> dict:
        """The options of the learned maps, from the constructor's arguments: ``noise_std``, ``weight_decay``, ``init``,
        ``bias`` when ``feedback_bias`` is on and, for maps that draw their own inputs
        (:class:`~tplightning.target_maps.ThesisInverse`), ``batch_size``."""
        h = self.hparams
        options = {"noise_std": h["feedback_noise_std"], "weight_decay": h["feedback_weight_decay"], "init": h["feedback_init"]}
        if issubclass(self.feedback_map, ThesisInverse):
            options["batch_size"] = h["feedback_batch_size"]
        if h.get("feedback_bias"):  # absent from checkpoints written before the option
            options["bias"] = True
        return options

    def make_maps(self):
        """One learned map per hidden layer (:meth:`learned_map`)."""
        return [self.learned_map(i) for i in range(1, self.num_layers)]

    def learned_map(self, i: int) -> TargetMap:
        """Layer ``i``'s map before :attr:`propagation` wraps it: a :attr:`feedback_map`."""
        return self.feedback_map(**self.feedback_options)

    @property
    def feedback_layers(self) -> list[int]:
        """Indices ``i`` of the feedback maps ``g_i`` this rule learns."""
        return [m.index for m in self.maps if m.feedback_parameters()]

    def Q(self, i: int) -> Tensor:
        """``Q_i``, or the feedback module of a map whose upper layer is a block."""
        base = self.maps[i - 1].base
        return base.operator if hasattr(type(base), "operator") else base.Q

    @property
    def feedback_weights(self) -> list[Tensor]:
        """The live feedback tensors ``[Q_1, ..., Q_{L-1}]``, ``Q_i`` of shape ``(n_i, n_{i+1})`` (a feedback module for a
        map above which a block lies)."""
        return [self.Q(i) for i in self.feedback_layers]

    def feedback_parameters(self) -> list[Tensor]:
        return [p for m in self.maps for p in m.feedback_parameters()]

    @torch.no_grad()
    def init_feedback_pinv(self) -> None:
        """``Q_i = W_{i+1}^dagger`` for every feedback layer (theorem 4.7's regularised inverse for ``feedback_init='regularised'``)."""
        for i in self.feedback_layers:
            self.maps[i - 1].base.init_pinv()

    def build_optimizers(self):
        """The forward optimizer, then ``feedback_optimizer`` on the feedback weights (none when there are none to train,
        or when a ``feedback_schedule`` sets them in closed form)."""
        closed = self.feedback_schedule is not None and self.feedback_schedule.closed_form
        fb = [] if closed else self.feedback_parameters()
        return super().build_optimizers() + ([build_optimizer("feedback_optimizer", self.feedback_optimizer, fb)] if fb else [])

    # ----------------------------------------------------------------------------- feedback training
    def noise(self, shape: tuple[int, ...]) -> Tensor:
        """Gaussian noise from the rule's seeded generator on the rule's device.

        The generator is seeded ``feedback_seed + rank``; after a resume, rank ``r`` continues from entry ``r`` of the
        checkpoint's states (:meth:`load_extra_state`), and a rank the checkpoint has no state for starts afresh from
        ``feedback_seed + rank``.

        >>> import tplightning as tp
        >>> rule = tp.DTPAI(sizes=[3, 4, 2], feedback_seed=7)
        >>> torch.equal(rule.noise((2, 3)), torch.randn(2, 3, generator=torch.Generator().manual_seed(7)))
        True
        """
        if self._noise_gen is None or self._noise_gen.device != self.device:
            rank = self._rank()
            self._noise_gen = torch.Generator(self.device).manual_seed(self.feedback_seed + rank)
            if self._noise_states is not None:
                if rank < len(self._noise_states):
                    self._noise_gen.set_state(self._noise_states[rank])
                self._noise_states = None
        return torch.randn(shape, generator=self._noise_gen, device=self.device, dtype=self.dtype)

    def _rank(self) -> int:
        return self.global_rank if self._trainer is not None else 0

    def _own_noise_state(self) -> Tensor | None:
        """This rank's generator state as :meth:`noise` would continue from it; ``None`` before any draw or restore."""
        if self._noise_gen is not None:
            return self._noise_gen.get_state()
        if self._noise_states is None:
            return None
        rank = self._rank()
        if rank < len(self._noise_states):
            return self._noise_states[rank]
        return torch.Generator(self.device).manual_seed(self.feedback_seed + rank).get_state()

    def feedback_grads(self, hs: list[Tensor], pre: list[Tensor] | None = None, losses: list[Tensor] | None = None) -> dict[Tensor, Tensor]:
        """Gradients of every map's (regularised) inverse loss (Alg. A.8 / A.9); with a list ``losses``, each map also
        appends its loss's value there (the data term, without the weight decay)."""
        step = Step(hs, pre or [], self.target_stepsize, layers=list(self.net.layers), maps=list(self.maps), feedback_losses=losses)
        grads: dict[Tensor, Tensor] = {}
        for m in self.maps:
            grads.update(m.feedback_grads(step, self.noise))
        return grads

    def update_feedback(self, hs, pre) -> None:
        if not self.feedback_layers:
            return
        if self.feedback_schedule is not None:
            return self.scheduled_feedback(hs, pre)
        opt = self.optimizer_list()[1]
        for _ in range(self.feedback_iterations):
            self.apply_gradients(opt, self.feedback_grads(hs, pre))

    # ----------------------------------------------------------------------------- feedback schedule
    def init_feedback_schedule(self, schedule: FeedbackSchedule | dict | None) -> None:
        """Check the option ``feedback_schedule`` against the rule and create its state; the hyper-parameters keep it as
        plain data (:meth:`~tplightning.schedules.FeedbackSchedule.spec`), so checkpoints load without unpickling it."""
        self.feedback_schedule = schedule = FeedbackSchedule.build(schedule)
        self._planned: int | None = None  # feedback updates planned for the current batch (None: no plan made)
        if schedule is None:
            return
        if schedule.closed_form:
            lacking = [m for m in self.maps if m.feedback_parameters() and not m.base.has_closed_form()]
            if lacking:
                raise ConfigError(
                    f"feedback_schedule closed_form needs maps whose feedback loss has a closed-form minimiser (thesis-form "
                    f"maps of the DTP-AI family, DDTP-linear) on dense layers; {type(self).__name__} has "
                    f"{', '.join(sorted({type(m.base).__name__ for m in lacking}))}"
                )
        self.hparams["feedback_schedule"] = schedule.spec()
        self.schedule_state = schedule.initial_state()

    def plan_feedback(self, batch_idx: int) -> int:
        """The feedback updates of batch ``batch_idx`` of the current epoch (before the stopping rule), counting down a
        rest the stopping rule ordered; called once per training batch."""
        s = self.feedback_schedule
        if s is None:
            return self.feedback_iterations
        n = s.updates(self.current_epoch, batch_idx, self.feedback_iterations)
        if n and self.schedule_state["resting"] > 0:
            self.schedule_state["resting"] -= 1
            return 0
        return n

    def scheduled_feedback(self, hs, pre) -> None:
        """The feedback updates :meth:`plan_feedback` planned for this batch, each skipped by the stopping rule when the
        batch's feedback loss (summed over the layers, averaged over DDP replicas) says so; or the closed form."""
        s = self.feedback_schedule
        planned = self._planned if self._planned is not None else self.plan_feedback(0)
        if s.closed_form:
            if planned:
                self.set_feedback_closed_form()
            return
        opt = self.optimizer_list()[1] if planned else None
        for _ in range(planned):
            losses: list[Tensor] | None = [] if s.stops else None
            grads = self.feedback_grads(hs, pre, losses)
            if losses is not None:
                loss = float(self._mean_over_replicas(torch.stack(losses).sum().double().reshape(1)))
                if self._trainer is not None:
                    self.log("feedback/loss", loss, on_step=True, on_epoch=False, batch_size=1)
                if s.skip(loss, self.schedule_state):
                    return
            self.apply_gradients(opt, grads)

    @torch.no_grad()
    def set_feedback_closed_form(self) -> None:
        """Every learned map at the minimiser of its feedback loss (:meth:`~tplightning.target_maps.ThesisInverse.set_closed_form`)."""
        for i in self.feedback_layers:
            self.maps[i - 1].base.set_closed_form()

    def trains_forward(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) trains the forward weights: not with ``feedback_only``, not in the
        ``feedback_pretrain_epochs`` pre-training epochs, and after them the first of every ``1 + feedback_extra_epochs``.

        >>> rule = DTPAI(sizes=[3, 4, 2], feedback_pretrain_epochs=2, feedback_extra_epochs=1)
        >>> [rule.trains_forward(e) for e in range(6)]
        [False, False, True, False, True, False]
        """
        after = epoch - self.feedback_pretrain_epochs
        return not self.feedback_only and after >= 0 and after % (1 + self.feedback_extra_epochs) == 0

    def training_step(self, batch, batch_idx):
        self._planned = self.plan_feedback(batch_idx) if self.feedback_schedule is not None else None
        if self.trains_forward(self.current_epoch):
            return super().training_step(batch, batch_idx)
        x, y = batch  # feedback pre-training: only Q learns
        with torch.no_grad():
            hs, pre = self.forward_pass(x)
            loss = self.loss_from_output(hs[-1], y)
            self.check_finite(loss, hs)
            with self.net.frozen_state():
                self.update_feedback(hs, pre)
        self.log_train(loss, x.shape[0])
        return loss

    def step_schedulers(self) -> None:
        if self.trains_forward(self.current_epoch):  # it starts with forward training
            super().step_schedulers()

    # ----------------------------------------------------------------------------- checkpoints
    def extra_state(self) -> dict:
        """Adds the noise generator: ``noise_generator`` (this process's state; rank 0's under DDP) and, under DDP,
        ``noise_generators``, every rank's state in rank order, gathered from all ranks (Lightning calls
        ``on_save_checkpoint`` on every rank and rank 0 writes the file); with a ``feedback_schedule``, its state
        ``feedback_schedule`` (running mean of the feedback loss and rest, the same on every rank)."""
        state = super().extra_state()
        if self.feedback_schedule is not None:
            state["feedback_schedule"] = dict(self.schedule_state)
        own = self._own_noise_state()
        if own is None:
            return state
        if self._trainer is not None and self.trainer.world_size > 1:
            gathered = self.all_gather(own.to(self.device))  # (world_size, state bytes), uint8
            state["noise_generators"] = [g.cpu().clone() for g in gathered]  # own storage each: set_state and torch.save want it
            own = state["noise_generators"][0]
        state["noise_generator"] = own
        return state

    def load_extra_state(self, state: dict) -> None:
        """Restores the noise generators: rank ``r`` takes entry ``r`` of ``noise_generators``; a checkpoint with one
        state (``noise_generator`` alone: a single-process run, or a file written before per-rank states were kept)
        restores rank 0, and every other rank starts afresh from ``feedback_seed + rank``, so ranks keep drawing
        different noise (their streams restart rather than continue). The state is applied at the next draw
        (:meth:`noise`), when the rank and device are known."""
        super().load_extra_state(state)
        if self.feedback_schedule is not None and "feedback_schedule" in state:
            self.schedule_state = dict(state["feedback_schedule"])
        if "noise_generators" in state:
            self._noise_gen, self._noise_states = None, list(state["noise_generators"])
        elif "noise_generator" in state:
            self._noise_gen, self._noise_states = None, [state["noise_generator"]]


class TPAI(LearnedInverseRule):
    """TP-AI: plain targets through ``g_i = Q_i s_{i+1}^{-1}``, ``Q`` by Alg. A.8 (Alg. A.10).

    >>> type(TPAI(sizes=[3, 4, 2]).maps[0]).__name__
    'ThesisInverse'
    """


class RTPAI(TPAI):
    """RTP-AI: randomized TP-AI, one forward layer per batch, every ``Q_i`` trained (Alg. A.11).

    >>> type(RTPAI(sizes=[3, 4, 2]).selection).__name__
    'RandomLayer'
    """

    selection_class = RandomLayer


class DTPAI(LearnedInverseRule):
    """DTP-AI: difference targets (eq. 4.101) through ``g_i = Q_i s_{i+1}^{-1}`` (Alg. A.12).

    The thesis' flagship: theorem 4.9 shows it approximates block-diagonal Gauss-Newton targets.
    Run: ``python train.py --config dtp.yaml``.

    >>> rule = DTPAI(sizes=[3, 4, 2])
    >>> [tuple(Q.shape) for Q in rule.feedback_weights]
    [(4, 2)]
    """

    propagation = Difference


class RDTPAI(DTPAI):
    """RDTP-AI: randomized DTP-AI (Alg. A.13).

    >>> type(RDTPAI(sizes=[3, 4, 2]).selection).__name__
    'RandomLayer'
    """

    selection_class = RandomLayer


class OriginalTP(LearnedInverseRule):
    """Original TP (Bengio 2014): ``g_i = s_i(Q_i h)``, ``Q`` by Alg. A.9 (Alg. A.14).

    >>> type(OriginalTP(sizes=[3, 4, 2]).maps[0]).__name__
    'OriginalInverse'
    """

    feedback_map = OriginalInverse


class OriginalRTP(OriginalTP):
    """Randomized original TP (Alg. A.15).

    >>> type(OriginalRTP(sizes=[3, 4, 2]).selection).__name__
    'RandomLayer'
    """

    selection_class = RandomLayer


class OriginalDTP(OriginalTP):
    """Original DTP without the penultimate gradient step, i.e. simplified DTP (SDTP; Alg. A.16).

    >>> type(OriginalDTP(sizes=[3, 4, 2]).maps[0].inner).__name__
    'OriginalInverse'
    """

    propagation = Difference


class OriginalRDTP(OriginalDTP):
    """Randomized original DTP (Alg. A.17).

    >>> type(OriginalRDTP(sizes=[3, 4, 2]).selection).__name__
    'RandomLayer'
    """

    selection_class = RandomLayer


class LeeDTP(OriginalDTP):
    """DTP as Lee et al. (2015) ran it (thesis 3.1.2): the penultimate layer's target is a gradient step.

    ``h^_{L-1} = h_{L-1} - eta^ dl/dh_{L-1}`` (:class:`~tplightning.target_maps.GradientTarget`) replaces the feedback
    map between the last two layers (so an output layer narrower than the one below is no obstacle); lower layers use
    the original-form difference targets; ``Q_1..Q_{L-2}`` are trained by Alg. A.9 with noise injection.

    >>> [type(m).__name__ for m in LeeDTP(sizes=[3, 4, 4, 2]).maps]
    ['Difference', 'GradientTarget']
    """

    def make_maps(self):
        if self.num_layers < 2:
            raise ConfigError(f"LeeDTP needs a hidden layer (its target is a gradient step), got sizes {self.net.sizes}")
        return super().make_maps()

    def learned_map(self, i):
        return GradientTarget() if i == self.num_layers - 1 else super().learned_map(i)


class AOSDTP(OriginalDTP):
    """Auxiliary-output SDTP (thesis 3.1.2, eq. 3.16; Bartunov et al. 2018).

    The output layer is ``h_L = [o, z]``: ``o`` the model's outputs (logits), ``z = s_L(W~ h_{L-1})``
    auxiliary units whose fixed weights ``W~`` are the extra rows of ``W_L``. The output target
    is ``[o^, z]`` (``z`` has no target, so ``W~`` never changes) and the penultimate target
    ``h^_{L-1} = h_{L-1} + g_{L-1}(o^, z) - g_{L-1}(o, z)``: ``z`` carries sample-specific
    information through the otherwise narrow inverse of the output layer. Lower layers use SDTP.

    It takes every argument of :class:`LearnedInverseRule` too.

    Args:
        aux_units: number of auxiliary outputs; ``None`` makes the output block as wide as the
            layer below (``n_{L-1} - n_L`` units), so ``Q_{L-1}`` inverts a square map.

    >>> rule = AOSDTP(sizes=[3, 5, 2])
    >>> rule.aux_units, rule(torch.zeros(1, 3)).shape
    (3, torch.Size([1, 2]))
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
        target_stepsize: float = 0.1,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        feedback_optimizer: OptimizerCallable = torch.optim.SGD,
        feedback_noise_std: float = 1.0,
        feedback_weight_decay: float = 0.0,
        feedback_iterations: int = 1,
        feedback_batch_size: int | None = None,
        feedback_pretrain_epochs: int = 0,
        feedback_init: Literal["pinv", "regularised", "random", "xavier_normal", "xavier_uniform"] = "pinv",
        feedback_bias: bool = False,
        feedback_seed: int = 0,
        feedback_only: bool = False,
        feedback_extra_epochs: int = 0,
        adaptive: Adaptive | None = None,
        feedback_schedule: FeedbackSchedule | None = None,
        aux_units: int | None = None,
    ):
        super().__init__(**arguments_for(super().__init__, locals()))  # aux_units reaches make_network as a recorded argument (self.hparams)
        self.aux_units = self.net.layers[-1].aux_units

    def make_network(self, **options):
        """The MLP of ``sizes`` with an :class:`~tplightning.layers.AuxiliaryDense` output of ``aux_units`` (the
        constructor's argument, ``self.hparams``) auxiliary units."""
        sizes, given = list(options["sizes"]), self.hparams["aux_units"]
        aux = given if given is not None else sizes[-2] - sizes[-1]
        if options.get("network") is not None:
            raise ConfigError("AOSDTP builds its auxiliary output layer from sizes; with your own network use an AuxiliaryDense output layer and OriginalDTP")
        if aux < 1:
            raise ConfigError(
                f"AOSDTP needs at least one auxiliary output unit, got aux_units={given} for sizes {sizes} "
                "(the default adds n_{L-1} - n_L units, which needs a penultimate layer wider than the output)"
            )
        return super().make_network(**options, aux_units=aux)


class MTP(TPAI):
    """Modified TP on learned inverses with batch-normalised layer inputs (thesis 5.1.1, Alg. A.1).

    ``D_i^{-1}`` replaces ``D_i`` in the update and every layer's input is normalised over the
    batch with the targets de-normalised (``batch_norm`` of
    :class:`~tplightning.rules.target_prop.TargetPropRule`, on by default here). The thesis
    reports this rule unstable (section 5.2.2); it is here for completeness.

    It takes every argument of :class:`LearnedInverseRule` too.

    Args:
        batch_norm: normalise layer inputs over the batch (Alg. A.1).

    >>> rule = MTP(sizes=[3, 4, 2])
    >>> rule.scaling, rule.batch_norm
    (D_INVERSE, True)
    """

    scaling = D_INVERSE

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
        batch_norm: bool = True,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        feedback_optimizer: OptimizerCallable = torch.optim.SGD,
        feedback_noise_std: float = 1.0,
        feedback_weight_decay: float = 0.0,
        feedback_iterations: int = 1,
        feedback_batch_size: int | None = None,
        feedback_pretrain_epochs: int = 0,
        feedback_init: Literal["pinv", "regularised", "random", "xavier_normal", "xavier_uniform"] = "pinv",
        feedback_bias: bool = False,
        feedback_seed: int = 0,
        feedback_only: bool = False,
        feedback_extra_epochs: int = 0,
        adaptive: Adaptive | None = None,
        feedback_schedule: FeedbackSchedule | None = None,
    ):
        super().__init__(**arguments_for(super().__init__, locals()))
