"""Presets with exact inverses: TP-EI, RTP-EI, RMTP-EI (thesis 4.1, 4.2.3, 5.1; Alg. A.4-A.6) and DTP-EI.

Every map is an :class:`~tplightning.target_maps.ExactInverse`, ``g_i(h^) = W_{i+1}^{-1} s_{i+1}^{-1}(h^)``
(eq. 4.16), whose ``W^{-1}`` is kept exact under every update: Sherman-Morrison (Alg. 4.1) at batch size 1,
Woodbury for a mini-batch's rank-B update (:func:`~tplightning.functional.robust_woodbury`), both with the
robust step shortening ``beta`` that keeps ``W`` away from singularity.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .. import functional as F
from .._lightning import OptimizerCallable
from ..errors import ConfigError
from ..layers import Dense, Layer
from ..losses import D_INVERSE
from ..selection import RandomLayer
from ..target_maps import Difference, ExactInverse
from .arguments import arguments_for
from .target_prop import TargetPropRule
from .base import NORM_GUARD

__all__ = ["ExactInverseRule", "TPEI", "RTPEI", "RMTPEI", "DTPEI"]


class ExactInverseRule(TargetPropRule):
    """Shared options of the exact-inverse presets.

    Layers 2..L must be square and of equal size (``n_1 = ... = n_L``; the first layer may map
    any input size), and their activations invertible. ``W_2..W_L`` are updated in closed form
    by their maps with the learning rate of the forward optimizer, which must therefore be plain
    SGD (no momentum, no weight decay); its schedule still applies. ``W_1`` has no inverse to keep
    and is updated by the forward optimizer.

    It takes every argument of :class:`~tplightning.rules.target_prop.TargetPropRule` too.

    Args:
        threshold: ``epsilon`` of the robust Sherman-Morrison/Woodbury update (thesis: 0.5).
        tau_init: with ``init="gaussian"``, initial ``W_2..W_L`` are Gaussian, redrawn until ``sigma_min * sigma_max > tau_init``
            (section 4.2.3; thesis 0.4).
        init_attempts: redraws before giving up with an error.
        inverse_tolerance: when the probed error ``|(W W^{-1} - I) r|_inf / |r|_inf`` exceeds it,
            ``W^{-1}`` is recomputed from ``W`` (drift guard against the round-off of chained
            updates, cf. fig. 5.8).
        inverse_check_every: batches between drift checks and between diagnostics logs.

    The divergence check is never deferred here: the robust update's SVD stops at a non-finite matrix (and its error
    check reads the device anyway), so a deferred check would come too late to name the step.

    A preset such as :class:`TPEI` is built; the base keeps the options:

    >>> rule = TPEI(sizes=[3, 4, 4], threshold=0.4)
    >>> rule.maps[0].threshold, rule.divergence.defer
    (0.4, False)
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
        target_stepsize: float = 0.1,
        layer_seed: int = 0,
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        threshold: float = 0.5,
        tau_init: float = 0.4,
        init_attempts: int = 1000,
        inverse_tolerance: float = 1e-4,
        inverse_check_every: int = 100,
    ):
        super().__init__(**arguments_for(super().__init__, locals()))
        self.threshold, self.tau_init, self.init_attempts, self.inverse_tolerance = threshold, tau_init, init_attempts, inverse_tolerance
        self.inverse_check_every = inverse_check_every
        self.divergence.defer = False
        self.reinversions = 0

    def make_maps(self):
        """One :class:`~tplightning.target_maps.ExactInverse` per hidden layer, after drawing ``W_2..W_L`` robustly
        invertible (``init="gaussian"``)."""
        sizes, L, options = self.net.sizes, self.num_layers, self.hparams
        if not options["threshold"] > 0:
            raise ConfigError(f"threshold (epsilon) must be > 0, got {options['threshold']}")
        if L < 2:
            raise ConfigError(f"exact-inverse rules need at least one hidden layer, got sizes {sizes}")
        for i, layer in enumerate(self.net.layers[1:], start=2):
            if not isinstance(layer, Dense):
                raise ConfigError(
                    f"layer {i} is a {layer.describe()}: an exact inverse of it is not "
                    "available (exact inverses need square dense layers above the first); use a learned-inverse rule (DTPAI, LeeDTP)"
                )
        if len(set(sizes[1:])) != 1:
            raise ConfigError(
                f"exact-inverse rules need equal layer sizes above the input (n_1 = ... = n_L), got sizes {sizes}; "
                "use a learned-inverse rule (DTPAI, LeeDTP, AOSDTP) for other architectures"
            )
        for i in range(2, L + 1):
            layer = self.net.layers[i - 1]
            if not layer.activation.invertible:
                raise ConfigError(
                    f"layer {i} activation {layer.activation!r} has no inverse; exact-inverse rules need invertible "
                    "activations above the first layer (leaky_relu with negative_slope > 0, tanh, linear)"
                )
        if options.get("init", "gaussian") == "gaussian" and options.get("network") is None:
            n, std = sizes[1], options.get("init_std") or sizes[1] ** -0.5  # orthogonal weights have sigma_min = 1: kept
            with torch.no_grad():
                for i in range(2, L + 1):
                    self.net.layers[i - 1].weight.copy_(F.robust_invertible_gaussian(n, options["tau_init"], std, options["init_attempts"]))
        return [ExactInverse(options["threshold"], options["tau_init"], options["inverse_tolerance"]) for _ in range(L - 1)]

    # ----------------------------------------------------------------------------- inverses
    def inverse(self, i: int) -> Tensor:
        """The buffer ``W_i^{-1}`` (``i >= 2``)."""
        return self._keepers[i].W_inv

    @torch.no_grad()
    def refresh_inverses(self) -> None:
        """Recompute every ``W_i^{-1}`` from ``W_i`` (after loading or editing weights by hand)."""
        for keeper in self._keepers.values():
            keeper.refresh()

    @torch.no_grad()
    def inverse_errors(self) -> list[Tensor]:
        """``max|W_i W_i^{-1} - I|`` for ``i = 2..L``."""
        out = []
        for i in range(2, self.num_layers + 1):
            W = self.net.weights[i - 1]
            out.append((W @ self.inverse(i) - torch.eye(W.shape[0], dtype=W.dtype, device=W.device)).abs().max())
        return out

    def probe_inverse_error(self, i: int, probes: int = 4) -> Tensor:
        """O(n^2) estimate of the drift of ``W_i^{-1}`` (seeded by the batch counter)."""
        return self._keepers[i].probe_error(self.batches_seen * 1009 + i, probes)

    def estimate_sigma_min(self, i: int, iterations: int = 8) -> Tensor:
        """O(n^2) estimate of ``sigma_min(W_i)`` by power iteration on ``W_i^{-1}``."""
        return self._keepers[i].sigma_min(iterations)

    # ----------------------------------------------------------------------------- updates
    def build_optimizers(self):
        opts = super().build_optimizers()
        opt = opts[0]
        bad = [
            k
            for k in ("momentum", "weight_decay", "dampening")
            if float(opt.param_groups[0].get(k, 0) or 0) != 0
        ]
        if not isinstance(opt, torch.optim.SGD) or bad or opt.param_groups[0].get("nesterov"):
            raise ConfigError(
                f"{type(self).__name__} updates W_2..W_L and their exact inverses in closed form, which needs plain "
                f"SGD as forward_optimizer; got {type(opt).__name__} with {', '.join(bad) or 'options'} set"
            )
        return opts

    def update_forward(self, layers, hs, pre, targets):
        super().update_forward(layers, hs, pre, targets)
        if self.batches_seen % self.inverse_check_every == self.inverse_check_every - 1:
            self._guard_and_log()

    @torch.no_grad()
    def _guard_and_log(self) -> None:
        """Drift guard and cheap diagnostics of every map (:meth:`~tplightning.target_maps.ExactInverse.guard`), all
        O(n^2) so that they keep the step's scaling: the probed inverse error, ``sigma_min(W)``, the fraction of
        clipped (shortened) updates and the smallest capacitance since the last log."""
        logs = {}
        for i, keeper in self._keepers.items():
            values, reinverted = keeper.guard(self.batches_seen * 1009 + i)
            logs.update(values)
            self.reinversions += int(reinverted)
        logs["inverse/reinversions"] = torch.tensor(float(self.reinversions))
        if self._trainer is not None:
            self.log_dict({k: v.float().cpu() for k, v in logs.items()}, on_step=True, on_epoch=False)

    def extra_state(self) -> dict:
        return {**super().extra_state(), "reinversions": self.reinversions}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.reinversions = int(state.get("reinversions", 0))


class TPEI(ExactInverseRule):
    """TP-EI: target propagation with exact inverses, every layer updated each batch (Alg. A.4).

    >>> rule = TPEI(sizes=[3, 4, 4])
    >>> W = rule.forward_weights[1]
    >>> torch.allclose(W @ rule.inverse(2), torch.eye(4), atol=1e-5)
    True
    """


class RTPEI(ExactInverseRule):
    """RTP-EI: randomized TP-EI, one uniformly drawn layer updated per batch (Alg. A.5).

    >>> type(RTPEI(sizes=[3, 4, 4]).selection).__name__
    'RandomLayer'
    """

    selection_class = RandomLayer


class RMTPEI(ExactInverseRule):
    """RMTP-EI: randomized modified TP-EI, ``D^{-1}`` instead of ``D`` (Alg. A.6).

    As in the thesis (section 5.1.3) there is no batch normalisation at batch size 1.

    >>> RMTPEI(sizes=[3, 4, 4]).scaling
    D_INVERSE
    """

    selection_class = RandomLayer
    scaling = D_INVERSE


class DTPEI(ExactInverseRule):
    """DTP-EI: difference targets (eq. 4.101) on exact inverses, a combination the thesis does not run.

    With ``g_i = f_{i+1}^{-1}`` the correction ``h_i - g_i(h_{i+1})`` is zero, so the thesis predicts (4.3.3:
    difference targets cancel reconstruction errors, and an exact inverse has none) the same updates as TP-EI up
    to float error. Run: ``python train.py --config dtp_ei.yaml``.

    >>> type(DTPEI(sizes=[3, 4, 4]).maps[0]).__name__
    'Difference'
    """

    propagation = Difference
