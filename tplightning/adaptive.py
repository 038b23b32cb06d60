"""Local adaptive step sizes and damping for target propagation (thesis 4.2.3, "Training parameters for target
propagation"; the open question of sections 5.1.3 and 7).

The thesis shows that target propagation computes block-diagonal Gauss-Newton targets (theorem 4.3) but trains with
a fixed, decaying output step ``eta^`` and learning rate ``eta``; Gauss-Newton takes an adaptive step (the minimum of
its parabola, eq. 4.65) and adapts its Levenberg-Marquardt damping from the reduction ratio ``rho`` (eq. 4.66).
Section 4.2.3 asks for versions that use only what a layer knows. The pieces here are such versions; a rule takes
them bundled in an :class:`Adaptive` (the option ``adaptive`` of the exact- and learned-inverse rules):

* :class:`LayerDamping`: each hidden layer's damping ``lambda_i``, adapted by :class:`TrustRegion` from ``rho_i``, the
  ratio of the actual to the predicted decrease of the layer's own local loss ``L_i = 1/2 mean_b ||h_i - h^_i||^2``
  (eq. 4.60) over its weight step. It enters the layer's target map: for an exact inverse the target becomes the LM
  step of eq. 4.72 restricted to one layer, ``h^_i = h_i + (W^T W + lambda_i I)^{-1} W^T (s^{-1}(h^_{i+1}) - a_{i+1})``
  with ``W = W_{i+1}`` (:func:`damped_target`); for a learned thesis-form map (``g = Q s^{-1}``) the feedback
  training's weight decay becomes ``lambda_i sigma^2``, so ``Q`` moves to theorem 4.7's regularised inverse
  ``W^T (W W^T + lambda_i I)^{-1}`` (the same matrix).
* :class:`LayerStep`: each layer's step ``eta_i`` from the curvature of its local loss along its update direction: a
  parabola through ``L_i(0)``, its slope at 0 and ``L_i(t)`` at a trial step ``t`` (the last ``eta_i``); its minimum is
  eq. 4.65 with the layer's own loss in place of the network's (:func:`parabola_step`).
* :class:`OutputStep`: the output step ``eta^`` from what the output layer sees: its error ``e`` and how far its output
  actually moved after the step, ``r``. On the secant model (the output moves ``r t / eta^`` for step ``t``), the
  L2 loss ``1/2 ||e + r t / eta^||^2`` is least at ``t* = <q, r> / ||r||^2`` with ``q = h^_L - h_L`` the asked move
  (:func:`secant_output_step`): eq. 4.65 restricted to the output layer.

Global (non-local) references: :class:`~tplightning.rules.gauss_newton.GaussNewton` (the true Gauss-Newton /
Levenberg-Marquardt step on all parameters, with :class:`TrustRegion` on its ``lambda``) and BP with Adam.

Choices where the thesis leaves it open: ``rho`` uses the Gauss-Newton (linearised activation) model of the layer's
output in its weights as the prediction; the trust-region constants are the classic ones of Martens (2010), the
heuristic the thesis quotes (eq. 4.66 and the text after it): ``rho < 1/4``: ``lambda * 3/2``; ``rho > 3/4``:
``lambda * 2/3``; a step whose predicted decrease is not positive leaves ``lambda`` as it is. Steps never grow by
more than ``growth`` per batch. With a layer step the learning-rate schedule no longer applies to the forward
weights (the adaptive step replaces it). Under DDP the scalars each decision is made from are averaged over the
replicas first, so every replica takes the same decision.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import functional as F
from .errors import ConfigError

__all__ = ["TrustRegion", "LayerDamping", "LayerStep", "OutputStep", "Adaptive", "parabola_step", "secant_output_step",
           "damped_target", "local_loss"]  # fmt: skip


class TrustRegion:
    """The Levenberg-Marquardt heuristic on a damping value from the reduction ratio (thesis eq. 4.66; Martens 2010).

    ``rho = actual / predicted`` decrease; ``rho < low`` (including a step that raised the loss): ``value * increase``;
    ``rho > high``: ``value * decrease``; otherwise, or when the predicted decrease is not positive, unchanged. The
    result is clamped to ``[minimum, maximum]`` (so a value of 0 becomes ``minimum`` at its first update).

    Args:
        low: ``rho`` below it increases the value (classic: 1/4).
        high: ``rho`` above it decreases the value (classic: 3/4).
        increase: the factor after a poor step (classic: 3/2).
        decrease: the factor after a good step (classic: 2/3).
        minimum: the value's lower bound.
        maximum: the value's upper bound.

    >>> tr = TrustRegion()
    >>> tr.update(torch.tensor(1.0), actual=torch.tensor(-0.1), predicted=torch.tensor(0.2))  # the loss rose
    tensor(1.5000)
    >>> tr.update(torch.tensor(1.0), actual=torch.tensor(0.19), predicted=torch.tensor(0.2))  # a good step
    tensor(0.6667)
    """

    def __init__(self, low: float = 0.25, high: float = 0.75, increase: float = 1.5, decrease: float = 2 / 3,
                 minimum: float = 1e-8, maximum: float = 1e4):  # fmt: skip
        if not (0 <= low <= high and increase >= 1 and 0 < decrease <= 1 and 0 < minimum <= maximum):
            raise ConfigError(
                f"TrustRegion needs 0 <= low <= high, increase >= 1, 0 < decrease <= 1 and 0 < minimum <= maximum; got "
                f"low={low}, high={high}, increase={increase}, decrease={decrease}, minimum={minimum}, maximum={maximum}"
            )
        self.low, self.high, self.increase, self.decrease = low, high, increase, decrease
        self.minimum, self.maximum = minimum, maximum

    def ratio(self, actual: Tensor, predicted: Tensor) -> Tensor:
        """``rho = actual / predicted`` (1 where the predicted decrease is not positive)."""
        ok = predicted > 0
        return torch.where(ok, actual / torch.where(ok, predicted, torch.ones_like(predicted)), torch.ones_like(actual))

    def update(self, value: Tensor, actual: Tensor, predicted: Tensor) -> Tensor:
        """The damping after a step with these decreases (tensors; no host read)."""
        rho = self.ratio(actual, predicted)
        one = torch.ones_like(rho)
        factor = torch.where(rho < self.low, one * self.increase, torch.where(rho > self.high, one * self.decrease, one))
        factor = torch.where(predicted > 0, factor, one)
        return (value * factor.to(value.dtype)).clamp(self.minimum, self.maximum)

    def spec(self) -> dict:
        """The arguments as plain data (what checkpoints keep; ``TrustRegion(**spec)`` rebuilds it)."""
        return {"low": self.low, "high": self.high, "increase": self.increase, "decrease": self.decrease,
                "minimum": self.minimum, "maximum": self.maximum}  # fmt: skip

    @classmethod
    def build(cls, value: "TrustRegion | dict | None") -> "TrustRegion | None":
        """``value`` itself, or the trust region its :meth:`spec` describes (a checkpoint's hyper-parameters)."""
        return cls(**value) if isinstance(value, dict) else value

    def __repr__(self) -> str:
        return f"TrustRegion(low={self.low}, high={self.high}, increase={self.increase}, decrease={self.decrease})"


def local_loss(layer, h_prev: Tensor, h_hat: Tensor, dW: Tensor | None = None, db: Tensor | None = None) -> Tensor:
    """``1/2 mean_b ||s((W + dW) h_{i-1} + b + db) - h^_i||^2`` in float64: a dense layer's local loss (eq. 4.60)
    after a change ``dW, db`` of its weights (none: at the current weights).

    >>> from tplightning.layers import Dense
    >>> layer = Dense(2, 1, activation="linear")
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
    >>> float(local_loss(layer, torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0]])))  # 1/2 (3 - 1)^2
    2.0
    """
    W = layer.weight.detach().double() + (0 if dW is None else dW.double())
    a = h_prev.double().flatten(1) @ W.T
    if layer.bias is not None:
        a = a + layer.bias.detach().double() + (0 if db is None else db.double())
    return 0.5 * (layer.activation(a) - h_hat.double()).pow(2).sum() / h_prev.shape[0]


def parabola_step(L0: Tensor, slope: Tensor, L_trial: Tensor, trial: Tensor, growth: float, minimum: float,
                  maximum: float) -> Tensor:  # fmt: skip
    """The minimum ``t* = -slope / c`` of the parabola ``L(t) = L0 + slope t + c t^2 / 2`` through ``L(trial)`` (eq. 4.65
    with the curvature measured along the step), bounded by ``growth * trial`` and ``[minimum, maximum]``. No descent
    (``slope >= 0``): ``minimum``; no positive curvature: ``growth * trial``.

    >>> L = lambda t: 3.0 - 4.0 * t + t**2  # minimum at t = 2
    >>> float(parabola_step(torch.tensor(L(0.0)), torch.tensor(-4.0), torch.tensor(L(0.5)), torch.tensor(0.5), 10.0, 0.0, 100.0))
    2.0
    """
    c = 2 * (L_trial - L0 - slope * trial) / trial**2
    descent = slope < 0
    t_star = torch.where(descent & (c > 0), -slope / torch.where(c > 0, c, torch.ones_like(c)), growth * trial)
    t_star = torch.minimum(t_star, growth * trial)
    return torch.where(descent, t_star, torch.zeros_like(t_star)).clamp(minimum, maximum)


def secant_output_step(asked: Tensor, moved: Tensor, current: Tensor, growth: float, minimum: float, maximum: float) -> Tensor:
    """``t* = <q, r> / ||r||^2`` (``q = asked``, ``r = moved``: sums over the batch), within a factor ``growth`` of
    ``current`` and in ``[minimum, maximum]``; ``growth * current`` when the output did not move.

    >>> q = torch.tensor([[0.1, -0.2]])
    >>> float(secant_output_step(q, 2 * q, torch.tensor(0.1), 100.0, 1e-3, 1.0))  # twice the asked move: halve
    0.5
    """
    qr, rr = (asked * moved).sum().double(), moved.pow(2).sum().double()
    return secant_from_sums(qr, rr, current, growth, minimum, maximum)


def secant_from_sums(qr: Tensor, rr: Tensor, current: Tensor, growth: float, minimum: float, maximum: float) -> Tensor:
    """:func:`secant_output_step` from the sums ``<q, r>`` and ``||r||^2`` (averaged over DDP replicas first)."""
    current = current.double()
    t = torch.where(rr > 0, qr / torch.where(rr > 0, rr, torch.ones_like(rr)), growth * current)
    return t.clamp(current / growth, current * growth).clamp(minimum, maximum)


def damped_target(layer_above, W_damped_inverse: Tensor, h: Tensor, a_above: Tensor, h_hat_above: Tensor) -> Tensor:
    """``h^_i = h_i + R (s_{i+1}^{-1}(h^_{i+1}) - a_{i+1})`` with ``R = (W^T W + lambda I)^{-1} W^T`` (given): one layer's
    Levenberg-Marquardt target step (thesis eq. 4.72 with ``J = W_{i+1}``, linear after ``s^{-1}``); ``R = W^{-1}`` gives
    TP-EI's target.

    >>> from tplightning.layers import Dense
    >>> up = Dense(2, 2, activation="linear")
    >>> R = torch.eye(2) / 2
    >>> damped_target(up, R, torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[2.0, 4.0]]))
    tensor([[1., 2.]])
    """
    v = layer_above.activation.inverse(h_hat_above) - a_above
    return h + v @ W_damped_inverse.T


class LayerDamping:
    """Each hidden layer's damping ``lambda_i`` of its target map, adapted by a :class:`TrustRegion` from the ratio of
    actual to predicted decrease of the layer's local loss over its weight step (thesis 4.2.3, eqs. 4.66-4.72, theorem
    4.7). See the module's text for how it enters exact and learned maps.

    Args:
        initial: ``lambda_i`` at the start (every hidden layer).
        trust_region: the update rule (classic constants by default).

    >>> LayerDamping(initial=0.01).initial
    0.01
    """

    def __init__(self, initial: float = 1e-2, trust_region: TrustRegion | None = None):
        if not initial >= 0:
            raise ConfigError(f"LayerDamping initial must be >= 0, got {initial}")
        self.initial, self.trust_region = initial, trust_region or TrustRegion()

    def __repr__(self) -> str:
        return f"LayerDamping(initial={self.initial}, trust_region={self.trust_region!r})"


class LayerStep:
    """Each layer's step ``eta_i``: the minimum of the parabola fitted to its local loss along its update direction
    (:func:`parabola_step`; eq. 4.65 restricted to the layer). It replaces the forward optimizer's learning rate, whose
    value is the first trial step; the forward optimizer must be plain SGD.

    Every layer that reaches its own target moves the output too, so the layers' moves add up (the block-diagonal
    approximation that eq. 4.65's global line search corrects for), and at batch size 1 the full step fits each sample;
    ``fraction`` takes that share of the parabola's minimum (a choice: 1 is the layer's full local step; the default
    0.1 is the value docs/experiments.md found stable on the student-teacher problems).

    Args:
        fraction: the share of the parabola's minimum taken (``0 < fraction <= 1``).
        growth: the step grows by at most this factor per batch.
        minimum: the lower bound of ``eta_i``.
        maximum: the upper bound of ``eta_i``.

    >>> LayerStep().growth
    2.0
    """

    def __init__(self, fraction: float = 0.1, growth: float = 2.0, minimum: float = 1e-6, maximum: float = 1e3):
        if not (0 < fraction <= 1 and growth >= 1 and 0 < minimum <= maximum):
            raise ConfigError(f"LayerStep needs 0 < fraction <= 1, growth >= 1 and 0 < minimum <= maximum, got {fraction}, {growth}, "
                              f"{minimum}, {maximum}")  # fmt: skip
        self.fraction, self.growth, self.minimum, self.maximum = fraction, growth, minimum, maximum

    def __repr__(self) -> str:
        return f"LayerStep(fraction={self.fraction}, growth={self.growth}, minimum={self.minimum}, maximum={self.maximum})"


class OutputStep:
    """The output target step ``eta^`` from the secant line search of the output layer (:func:`secant_output_step`), for
    the L2 (``mse``) loss; the rule's ``target_stepsize`` is its first value.

    Args:
        growth: ``eta^`` changes by at most this factor per batch.
        minimum: the lower bound of ``eta^``.
        maximum: the upper bound of ``eta^`` (1: the target ``y`` itself, the Gauss-Newton output step).

    >>> OutputStep().maximum
    1.0
    """

    def __init__(self, growth: float = 2.0, minimum: float = 1e-3, maximum: float = 1.0):
        if not (growth >= 1 and 0 < minimum <= maximum):
            raise ConfigError(f"OutputStep needs growth >= 1 and 0 < minimum <= maximum, got {growth}, {minimum}, {maximum}")
        self.growth, self.minimum, self.maximum = growth, minimum, maximum

    def __repr__(self) -> str:
        return f"OutputStep(growth={self.growth}, minimum={self.minimum}, maximum={self.maximum})"


class Adaptive:
    """The adaptive pieces a target-propagation rule uses (option ``adaptive`` of the exact- and learned-inverse rules);
    each may be left out (``None``).

    Args:
        damping: :class:`LayerDamping` of the target maps.
        layer_step: :class:`LayerStep` of the forward weights.
        output_step: :class:`OutputStep` of ``eta^``.

    >>> import tplightning as tp
    >>> rule = tp.TPEI(sizes=[3, 4, 4], adaptive=Adaptive(LayerDamping(), LayerStep(), OutputStep()))
    >>> rule.adaptive_state["lambda"].tolist()
    [0.01]
    """

    def __init__(self, damping: LayerDamping | None = None, layer_step: LayerStep | None = None,
                 output_step: OutputStep | None = None):  # fmt: skip
        self.damping, self.layer_step, self.output_step = damping, layer_step, output_step

    def spec(self) -> dict:
        """The pieces and their arguments as plain data (what checkpoints keep; :meth:`build` rebuilds them).

        >>> Adaptive(output_step=OutputStep()).spec()["output_step"]
        {'growth': 2.0, 'minimum': 0.001, 'maximum': 1.0}
        """
        d, s, o = self.damping, self.layer_step, self.output_step
        return {
            "damping": None if d is None else {"initial": d.initial, "trust_region": d.trust_region.spec()},
            "layer_step": None if s is None else {"fraction": s.fraction, "growth": s.growth, "minimum": s.minimum, "maximum": s.maximum},
            "output_step": None if o is None else {"growth": o.growth, "minimum": o.minimum, "maximum": o.maximum},
        }

    @classmethod
    def build(cls, value: "Adaptive | dict | None") -> "Adaptive | None":
        """``value`` itself, or the pieces its :meth:`spec` describes."""
        if not isinstance(value, dict):
            return value
        d, s, o = value.get("damping"), value.get("layer_step"), value.get("output_step")
        damping = None if d is None else LayerDamping(d["initial"], TrustRegion.build(d.get("trust_region")))
        return cls(damping, None if s is None else LayerStep(**s), None if o is None else OutputStep(**o))

    def __repr__(self) -> str:
        return f"Adaptive(damping={self.damping!r}, layer_step={self.layer_step!r}, output_step={self.output_step!r})"


class AdaptiveTargetProp:
    """Mixin of :class:`~tplightning.rules.target_prop.TargetPropRule` presets that takes the option ``adaptive``
    (placed before ``TargetPropRule`` in the bases). With ``adaptive=None`` every method is the base's.

    State (``adaptive_state``, in checkpoints): ``lambda`` (one per hidden layer), ``eta`` (one per layer: the last
    step, the next trial) and ``eta_hat``.
    """

    adaptive: Adaptive | None = None

    def init_adaptive(self, adaptive: Adaptive | None) -> None:
        """Check the option against the rule and create the state; the hyper-parameters keep it as plain data
        (:meth:`Adaptive.spec`), so checkpoints load without unpickling classes."""
        self.adaptive = adaptive = Adaptive.build(adaptive)
        if adaptive is None:
            return
        from .layers import Dense
        from .target_maps import ExactInverse, ThesisInverse

        if not isinstance(adaptive, Adaptive):
            raise ConfigError(f"adaptive must be a tplightning.adaptive.Adaptive (or None), got {type(adaptive).__name__}")
        if self.normalization is not None:
            raise ConfigError("adaptive steps do not support batch_norm (the local losses are on unnormalised inputs)")
        if not all(isinstance(layer, Dense) for layer in self.net.layers):
            raise ConfigError("adaptive steps need dense layers (their local losses are computed in closed form)")
        if adaptive.damping is not None and not all(isinstance(m.base, (ExactInverse, ThesisInverse)) for m in self.maps):
            kinds = sorted({type(m.base).__name__ for m in self.maps})
            raise ConfigError(f"adaptive damping needs exact inverses or thesis-form learned maps (ThesisInverse); this rule has {', '.join(kinds)}")
        if adaptive.output_step is not None and self.loss.name != "mse":
            raise ConfigError(f"adaptive output_step needs loss='mse' (its line search models the L2 loss), got loss={self.loss.name!r}")
        self.hparams["adaptive"] = adaptive.spec()
        L = self.num_layers
        lam = adaptive.damping.initial if adaptive.damping is not None else 0.0
        self.adaptive_state = {
            "lambda": torch.full((L - 1,), float(lam), dtype=torch.float64),
            "eta": torch.full((L,), float("nan"), dtype=torch.float64),  # nan: take the optimizer's learning rate
            "eta_hat": torch.tensor(float(self.target_stepsize), dtype=torch.float64),
        }

    # ------------------------------------------------------------------------------------------------ helpers
    def _mean_over_replicas(self, t: Tensor) -> Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(t.to(self.device), reduce_op="mean").to(t.device)
        return t

    def _state(self, key: str) -> Tensor:
        return self.adaptive_state[key]

    # ------------------------------------------------------------------------------------------------ targets
    def propagate(self, i, h_hat_next, hs, pre, step=None):
        damping = self.adaptive.damping if self.adaptive is not None else None
        if damping is None or not getattr(self.maps[i - 1].base, "keeps_upper_weight", False):
            return super().propagate(i, h_hat_next, hs, pre, step)
        upper = self.net.layers[i]
        R = F.regularised_inverse(upper.weight.detach(), float(self._state("lambda")[i - 1]))
        return damped_target(upper, R, hs[i], pre[i], h_hat_next)

    # ------------------------------------------------------------------------------------------------ updates
    def build_optimizers(self):
        opts = super().build_optimizers()
        if self.adaptive is not None and self.adaptive.layer_step is not None:
            opt, group = opts[0], opts[0].param_groups[0]
            if not isinstance(opt, torch.optim.SGD) or any(float(group.get(k, 0) or 0) for k in ("momentum", "weight_decay")):
                raise ConfigError(f"adaptive layer_step replaces the learning rate of plain SGD; forward_optimizer is {type(opt).__name__} "
                                  "with momentum or weight decay")  # fmt: skip
        return opts

    def update_forward(self, layers, hs, pre, targets):
        a = self.adaptive
        if a is None or (a.layer_step is None and a.damping is None):
            return super().update_forward(layers, hs, pre, targets)
        group = self.optimizer_list()[0].param_groups[0]
        lr = group["lr"]
        # new tensors, never written in place: under ddp_spawn the pickled state's storage is shared between processes
        eta, lam = self._state("eta").clone(), self._state("lambda").clone()
        self.adaptive_state.update(eta=eta, **{"lambda": lam})
        try:
            for i in layers:
                layer = self.net.layers[i - 1]
                h_prev, h_hat = self.layer_input(i, hs).flatten(1), targets[i - 1]
                delta = layer.delta(pre[i - 1], hs[i], h_hat, self.scaling)
                dW = -(delta.T @ h_prev) / delta.shape[0]  # the update direction per unit step (eq. 4.12)
                db = -delta.mean(0) if layer.bias is not None else None
                if a.layer_step is not None:
                    trial = eta[i - 1] if torch.isfinite(eta[i - 1]) else torch.tensor(float(lr), dtype=torch.float64)
                    eta[i - 1] = self.layer_step_size(layer, h_prev, pre[i - 1], hs[i], h_hat, dW, db, trial)
                    group["lr"] = a.layer_step.fraction * float(eta[i - 1])
                W0 = layer.weight.detach().clone()
                b0 = layer.bias.detach().clone() if layer.bias is not None else None
                super().update_forward([i], hs, pre, targets)
                if a.damping is not None and i < self.num_layers:
                    dW_taken = layer.weight.detach() - W0
                    db_taken = layer.bias.detach() - b0 if b0 is not None else None
                    actual, predicted = self.local_decreases(layer, h_prev, pre[i - 1], hs[i], h_hat, dW_taken, db_taken)
                    lam[i - 1] = a.damping.trust_region.update(lam[i - 1], actual, predicted)
        finally:
            group["lr"] = lr

    def layer_step_size(self, layer, h_prev, a, h, h_hat, dW, db, trial) -> Tensor:
        """``eta_i`` from layer ``i``'s own quantities: its weights, input ``h_{i-1}``, ``a_i``, ``h_i``, target ``h^_i``
        and update direction ``dW, db`` (:func:`parabola_step` of :func:`local_loss`)."""
        d = layer.derivative(a, h).double()
        da = h_prev.double() @ dW.double().T + (0 if db is None else db.double())
        stats = torch.stack([
            local_loss(layer, h_prev, h_hat),
            ((h.double() - h_hat.double()) * d * da).sum() / h.shape[0],
            local_loss(layer, h_prev, h_hat, trial * dW, None if db is None else trial * db),
        ])  # fmt: skip
        L0, slope, L_trial = self._mean_over_replicas(stats).cpu()
        s = self.adaptive.layer_step
        return parabola_step(L0, slope, L_trial, trial.cpu(), s.growth, s.minimum, s.maximum)

    def local_decreases(self, layer, h_prev, a, h, h_hat, dW, db) -> tuple[Tensor, Tensor]:
        """``(actual, predicted)`` decrease of layer ``i``'s local loss over the weight change ``dW, db``: predicted by
        the Gauss-Newton model ``h_i + D_i dA`` of its output (averaged over DDP replicas)."""
        d = layer.derivative(a, h).double()
        da = h_prev.double() @ dW.double().T + (0 if db is None else db.double())
        L0 = local_loss(layer, h_prev, h_hat)
        model = 0.5 * (h.double() + d * da - h_hat.double()).pow(2).sum() / h.shape[0]
        L1 = local_loss(layer, h_prev, h_hat, dW, db)
        L0, model, L1 = self._mean_over_replicas(torch.stack([L0, model, L1])).cpu()
        return L0 - L1, L0 - model

    def training_step(self, batch, batch_idx):
        a = self.adaptive
        if a is None:
            return super().training_step(batch, batch_idx)
        if a.damping is not None:  # learned thesis-form maps: their feedback training's regularised inverse (theorem 4.7)
            for m, lam in zip(self.maps, self._state("lambda").tolist()):
                if not getattr(m.base, "keeps_upper_weight", False):
                    m.base.weight_decay = lam * m.base.noise_std**2
        if a.output_step is None:
            return super().training_step(batch, batch_idx)
        x, y = batch
        self.target_stepsize = float(self._state("eta_hat"))
        with torch.no_grad():
            before = self.net.forward_all(x)[0][-1]
            asked = self.output_target(before, y) - before
        loss = super().training_step(batch, batch_idx)
        with torch.no_grad():
            moved = self.net.forward_all(x)[0][-1] - before
            sums = self._mean_over_replicas(torch.stack([(asked * moved).sum().double(), moved.pow(2).sum().double()])).cpu()
            s = a.output_step
            self.adaptive_state["eta_hat"] = secant_from_sums(sums[0], sums[1], self._state("eta_hat"), s.growth, s.minimum, s.maximum)
        return loss

    # ------------------------------------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict:
        state = super().extra_state()
        if self.adaptive is not None:
            state["adaptive"] = {k: v.detach().cpu().clone() for k, v in self.adaptive_state.items()}
        return state

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if self.adaptive is not None and "adaptive" in state:
            self.adaptive_state = {k: v.clone().to(torch.float64) for k, v in state["adaptive"].items()}
