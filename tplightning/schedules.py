"""Feedback schedules: how many feedback-weight updates a rule with learned feedback runs at each training batch.

The rules that learn their feedback weights (:class:`~tplightning.rules.learned.LearnedInverseRule` and its presets:
DTP-AI, OriginalDTP, LeeDTP, DRL, L-DRL, DDTP-linear, ...) run ``feedback_iterations`` updates after every forward
update. Most of a DTP epoch goes there (Ernoult et al. 2022 count 20-55 feedback iterations per batch and layer). A
:class:`FeedbackSchedule`, the rule's option ``feedback_schedule``, spends them where they pay:

* ``every = k``: feedback updates on every ``k``-th batch of an epoch only (batch index ``b`` with ``b mod k = 0``);
* a decreasing count: ``iterations`` updates per updating batch at the start, moving to ``final_iterations`` (the floor)
  over ``decay_epochs`` epochs, linearly or geometrically (:meth:`FeedbackSchedule.rate`); a fractional count ``r``
  spreads over the updating batches of the epoch: the ``j``-th of them runs ``floor((j + 1) r) - floor(j r)`` updates
  (``r`` taken as the nearest fraction with a denominator up to 10^6, so that rounding never loses an update);
* a stopping rule on the feedback loss: every update computes the batch's feedback loss ``F`` anyway (the sum over the
  layers of each map's loss, averaged over DDP replicas, so every replica takes the same decision). Before the update
  is applied, it is skipped, with the rest of the batch's updates and the updates of the next ``rest`` batches, when
  ``F < threshold`` (the maps are good enough) or when ``F <= (1 + plateau) m``, ``m`` the running mean (exponential,
  ``momentum``) of the losses of the updates *taken*: the loss is no higher than the level that training holds it at,
  so training no longer improves it. The mean ignores skipped measurements, so a loss that rises as the forward
  weights move away from the maps brings training back. After a rest the next planned update measures again. (The
  updates are taken at the higher losses, so that mean sits above the typical loss and, with ``plateau = 0``, most
  measurements are skipped.)
  A skipped measurement still costs its feedback loss: the saving is in the ``rest``;
* ``closed_form``: instead of training, the maps are set to the minimiser of their feedback loss on every
  ``every``-th batch: ``Q_i = W_{i+1}^T (W_{i+1} W_{i+1}^T + lambda/sigma^2 I)^{-1}`` for the thesis-form maps of the
  DTP-AI family (theorem 4.7; ``W_{i+1}^dagger`` for ``lambda = 0``), ``Q_i = J^T (J J^T + lambda I)^{-1}`` with
  ``J = W_L ... W_{i+1}`` for DDTP-linear on dense layers (the minimiser of its DRL for a linear network). Noise-free:
  no samples are drawn. Rules whose maps have no such closed form (DRL, L-DRL, the original form) refuse it.

The schedule applies in every epoch, the feedback-only ones (``feedback_pretrain_epochs``, ``feedback_extra_epochs``)
included. The decisions depend on the epoch, the batch index and the loss only; the running mean and the rest count are kept
in checkpoints (:meth:`LearnedInverseRule.extra_state <tplightning.rules.learned.LearnedInverseRule.extra_state>`), so a
resumed run continues the schedule exactly. No schedule (``None``, the default) is every rule's plain behaviour.

In a config (``model.init_args``)::

    feedback_schedule:
      class_path: tplightning.FeedbackSchedule
      init_args: {every: 4}
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

from .errors import ConfigError

__all__ = ["FeedbackSchedule"]


class FeedbackSchedule:
    """When and how often a rule trains its feedback weights (see the module's text for each option).

    Args:
        every: feedback work on batches ``b`` (0-based index in the epoch) with ``b mod every = 0`` only.
        iterations: updates per updating batch at the start (``None``: the rule's ``feedback_iterations``); may be
            fractional (0.5: one update every second updating batch).
        final_iterations: the count after ``decay_epochs`` epochs, and its floor (``None``: no decay); ``0`` ends the
            feedback training.
        decay_epochs: epochs over which the count moves from ``iterations`` to ``final_iterations``.
        decay: ``linear`` or ``geometric`` (``iterations * (final / iterations)^(epoch / decay_epochs)``; needs
            ``final_iterations > 0``).
        threshold: skip while the batch's feedback loss is below it (``None``: no threshold).
        plateau: skip while the loss is at most ``(1 + plateau)`` times the running mean of the losses of the updates
            taken (``None``: off; ``0``: skip whenever the loss is not above that mean).
        momentum: of the running mean, ``m <- momentum m + (1 - momentum) F`` (the first loss starts it).
        rest: batches without any feedback work after a skip.
        closed_form: set the maps to their loss's minimiser on every ``every``-th batch instead of training them.

    >>> s = FeedbackSchedule(every=2, iterations=4, final_iterations=1, decay_epochs=3)
    >>> [s.rate(e, 1) for e in range(5)], [s.updates(0, b, 1) for b in range(4)]
    ([4.0, 3.0, 2.0, 1.0, 1.0], [4, 0, 4, 0])
    """

    def __init__(
        self,
        every: int = 1,
        iterations: float | None = None,
        final_iterations: float | None = None,
        decay_epochs: int = 10,
        decay: Literal["linear", "geometric"] = "linear",
        threshold: float | None = None,
        plateau: float | None = None,
        momentum: float = 0.9,
        rest: int = 0,
        closed_form: bool = False,
    ):
        def bad(option: str, expected: str, value) -> ConfigError:
            return ConfigError(f"FeedbackSchedule {option} must be {expected}, got {value!r}")

        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise bad("every", "an integer >= 1", every)
        if iterations is not None and not iterations > 0:
            raise bad("iterations", "> 0 (or None for the rule's feedback_iterations)", iterations)
        if final_iterations is not None and not final_iterations >= 0:
            raise bad("final_iterations", ">= 0 (or None for no decay)", final_iterations)
        if isinstance(decay_epochs, bool) or not isinstance(decay_epochs, int) or decay_epochs < 1:
            raise bad("decay_epochs", "an integer >= 1", decay_epochs)
        if decay not in ("linear", "geometric"):
            raise bad("decay", "'linear' or 'geometric'", decay)
        if decay == "geometric" and final_iterations is not None and not final_iterations > 0:
            raise bad("final_iterations", "> 0 for decay 'geometric'", final_iterations)
        if threshold is not None and not threshold >= 0:
            raise bad("threshold", ">= 0 (or None)", threshold)
        if plateau is not None and not plateau >= 0:
            raise bad("plateau", ">= 0 (or None)", plateau)
        if not 0 <= momentum < 1:
            raise bad("momentum", "in [0, 1)", momentum)
        if isinstance(rest, bool) or not isinstance(rest, int) or rest < 0:
            raise bad("rest", "an integer >= 0", rest)
        if closed_form and (iterations is not None or final_iterations is not None or threshold is not None or plateau is not None):
            raise ConfigError("FeedbackSchedule closed_form sets the maps every `every` batches; it takes no iterations, "
                              "final_iterations, threshold or plateau")  # fmt: skip
        self.every, self.iterations, self.final_iterations = every, iterations, final_iterations
        self.decay_epochs, self.decay = decay_epochs, decay
        self.threshold, self.plateau, self.momentum, self.rest = threshold, plateau, momentum, rest
        self.closed_form = bool(closed_form)

    # ------------------------------------------------------------------------------------------------ counts
    def rate(self, epoch: int, base: int) -> float:
        """Updates per updating batch in epoch ``epoch`` (0-based); ``base``: the rule's ``feedback_iterations``."""
        start = float(self.iterations if self.iterations is not None else base)
        if self.final_iterations is None:
            return start
        t = min(1.0, epoch / self.decay_epochs)
        final = float(self.final_iterations)
        if self.decay == "geometric":
            return max(final, start * (final / start) ** t)
        return start + (final - start) * t

    def updates(self, epoch: int, batch_idx: int, base: int) -> int:
        """Feedback updates at batch ``batch_idx`` of epoch ``epoch`` before the stopping rule (0 for batches the
        schedule skips; the closed form counts as one)."""
        if batch_idx % self.every:
            return 0
        if self.closed_form:
            return 1
        r, j = Fraction(self.rate(epoch, base)).limit_denominator(10**6), batch_idx // self.every  # exact: 4 * 0.25 = 1
        return math.floor((j + 1) * r) - math.floor(j * r)

    # ------------------------------------------------------------------------------------------------ stopping rule
    @property
    def stops(self) -> bool:
        """Whether the stopping rule is on (``threshold`` or ``plateau`` set): the feedback loss is then measured."""
        return self.threshold is not None or self.plateau is not None

    def initial_state(self) -> dict:
        """The state a run starts with: ``mean`` (running mean of the losses of the updates taken; NaN before the
        first) and ``resting`` (planned batches left without feedback work)."""
        return {"mean": math.nan, "resting": 0}

    def skip(self, loss: float, state: dict) -> bool:
        """Whether the update measured at ``loss`` is skipped; updates ``state``: the rest after a skip, the running
        mean after an update taken.

        >>> s, state = FeedbackSchedule(threshold=0.5, rest=2), FeedbackSchedule().initial_state()
        >>> s.skip(0.4, state), state["resting"], s.skip(0.6, state), state["mean"]
        (True, 2, False, 0.6)
        """
        mean = state["mean"]
        low = self.threshold is not None and loss < self.threshold
        level = self.plateau is not None and not math.isnan(mean) and loss <= (1 + self.plateau) * mean
        if low or level:
            state["resting"] = self.rest
            return True
        state["mean"] = loss if math.isnan(mean) else self.momentum * mean + (1 - self.momentum) * loss
        return False

    # ------------------------------------------------------------------------------------------------ plain data
    def spec(self) -> dict:
        """The arguments as plain data (what the hyper-parameters and checkpoints keep; ``FeedbackSchedule(**spec)``)."""
        return {"every": self.every, "iterations": self.iterations, "final_iterations": self.final_iterations,
                "decay_epochs": self.decay_epochs, "decay": self.decay, "threshold": self.threshold, "plateau": self.plateau,
                "momentum": self.momentum, "rest": self.rest, "closed_form": self.closed_form}  # fmt: skip

    @classmethod
    def build(cls, value: "FeedbackSchedule | dict | None") -> "FeedbackSchedule | None":
        """``value`` itself, or the schedule its :meth:`spec` describes (a checkpoint's hyper-parameters)."""
        if isinstance(value, dict):
            return cls(**value)
        if value is not None and not isinstance(value, cls):
            raise ConfigError(f"feedback_schedule must be a tplightning.FeedbackSchedule (or None), got {type(value).__name__}")
        return value

    def __repr__(self) -> str:
        return "FeedbackSchedule(" + ", ".join(f"{k}={v!r}" for k, v in self.spec().items()) + ")"
