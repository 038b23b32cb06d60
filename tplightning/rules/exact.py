"""Target propagation with exact inverses: TP-EI, RTP-EI, RMTP-EI (thesis 4.1, 4.2.3, 5.1; Alg. A.4-A.6).

``g_i(h^) = W_{i+1}^{-1} s_{i+1}^{-1}(h^)`` (eq. 4.16). ``W^{-1}`` is a buffer computed once and
then kept exact under every update: Sherman-Morrison (Alg. 4.1) at batch size 1, Woodbury for a
mini-batch's rank-B update (:func:`~tplightning.functional.robust_woodbury`), both with the
robust step shortening ``beta`` that keeps ``W`` away from singularity.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from .target_prop import TargetPropRule

__all__ = ["ExactInverseRule", "TPEI", "RTPEI", "RMTPEI"]


class ExactInverseRule(TargetPropRule):
    """Shared machinery of the exact-inverse rules.

    Layers 2..L must be square and of equal size (``n_1 = ... = n_L``; the first layer may map
    any input size), and their activations invertible. ``W_2..W_L`` are updated in closed form
    with the learning rate of the forward optimizer, which must therefore be plain SGD (no
    momentum, no weight decay); its schedule still applies. ``W_1`` has no inverse to keep and
    is updated by the forward optimizer.

    Args:
        threshold: ``epsilon`` of the robust Sherman-Morrison/Woodbury update (thesis: 0.5).
        tau_init: with ``init="gaussian"``, initial ``W_2..W_L`` are Gaussian, redrawn until ``sigma_min * sigma_max > tau_init``
            (section 4.2.3; thesis 0.4).
        init_attempts: redraws before giving up with an error.
        inverse_tolerance: when the probed error ``|(W W^{-1} - I) r|_inf / |r|_inf`` exceeds it,
            ``W^{-1}`` is recomputed from ``W`` (drift guard against the round-off of chained
            updates, cf. fig. 5.8).
        inverse_check_every: batches between drift checks and between diagnostics logs.
        **kwargs: the arguments of :class:`~tplightning.rules.target_prop.TargetPropRule`.
    """

    def __init__(
        self,
        *args,
        threshold: float = 0.5,
        tau_init: float = 0.4,
        init_attempts: int = 1000,
        inverse_tolerance: float = 1e-4,
        inverse_check_every: int = 100,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if not threshold > 0:
            raise ValueError(f"threshold (epsilon) must be > 0, got {threshold}")
        sizes, L = self.net.sizes, self.num_layers
        if L < 2:
            raise ValueError(f"exact-inverse rules need at least one hidden layer, got sizes {sizes}")
        if len(set(sizes[1:])) != 1:
            raise ValueError(
                f"exact-inverse rules need equal layer sizes above the input (n_1 = ... = n_L), got sizes {sizes}; "
                "use a learned-inverse rule (DTPAI, LeeDTP, AOSDTP) for other architectures"
            )
        for i in range(2, L + 1):
            act = self.net.activations[i - 1]
            if not act.invertible:
                raise ValueError(
                    f"layer {i} activation {act!r} has no inverse; exact-inverse rules need invertible "
                    "activations above the first layer (leaky_relu with negative_slope > 0, tanh, linear)"
                )
        self.threshold, self.tau_init = threshold, tau_init
        self.inverse_tolerance, self.inverse_check_every = inverse_tolerance, inverse_check_every
        n = sizes[1]
        std = self.hparams.get("init_std") or n**-0.5
        if self.hparams.get("init", "gaussian") == "gaussian":  # orthogonal weights have sigma_min = 1: kept
            with torch.no_grad():
                for i in range(2, L + 1):
                    self.net.weights[i - 1].copy_(F.robust_invertible_gaussian(n, tau_init, std, init_attempts))
        for i in range(2, L + 1):
            self.register_buffer(f"W_inv_{i}", torch.empty(n, n))
        self.refresh_inverses()
        self.reinversions = 0
        self._reset_stats()

    # ----------------------------------------------------------------------------- inverses
    def inverse(self, i: int) -> Tensor:
        """The buffer ``W_i^{-1}`` (``i >= 2``)."""
        return getattr(self, f"W_inv_{i}")

    @torch.no_grad()
    def refresh_inverses(self) -> None:
        """Recompute every ``W_i^{-1}`` from ``W_i`` (after loading or editing weights by hand)."""
        for i in range(2, self.num_layers + 1):
            W = self.net.weights[i - 1]
            s = torch.linalg.svdvals(W.double())
            if not bool(s[-1] > 0) or not bool(torch.isfinite(s).all()) or float(s[0] / s[-1]) > 1e12:
                raise ValueError(f"W_{i} is singular or numerically singular (singular values {s.tolist()})")
            self.inverse(i).copy_(torch.linalg.inv(W.double()).to(W.dtype))

    def on_forward_weights_changed(self) -> None:
        self.refresh_inverses()

    def weight_is_acceptable(self, i: int, W: Tensor) -> bool:
        return i == 1 or F.is_robustly_invertible(W, self.tau_init)

    @torch.no_grad()
    def inverse_errors(self) -> list[Tensor]:
        """``max|W_i W_i^{-1} - I|`` for ``i = 2..L``."""
        out = []
        for i in range(2, self.num_layers + 1):
            W = self.net.weights[i - 1]
            out.append((W @ self.inverse(i) - torch.eye(W.shape[0], dtype=W.dtype, device=W.device)).abs().max())
        return out

    # ----------------------------------------------------------------------------- targets
    def propagate(self, i, h_hat_next, hs, pre):
        a_hat = self.net.activations[i].inverse(h_hat_next)  # s_{i+1}^{-1}(h^_{i+1}), (B, n)
        if self.net.biases is not None:
            a_hat = a_hat - self.net.biases[i]
        return a_hat @ self.inverse(i + 1).T

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
            raise ValueError(
                f"{type(self).__name__} updates W_2..W_L and their exact inverses in closed form, which needs plain "
                f"SGD as forward_optimizer; got {type(opt).__name__} with {', '.join(bad) or 'options'} set"
            )
        return opts

    def update_forward(self, layers, hs, pre, targets):
        opt = self.optimizer_list()[0]
        deltas = {i: self.layer_delta(i, hs, pre, targets) for i in layers if i > 1}  # (B, n) each
        grads = self.forward_grads([i for i in layers if i == 1], hs, pre, targets)
        if self.net.biases is not None:
            grads.update({self.net.biases[i - 1]: delta.mean(0) for i, delta in deltas.items()})
        if grads:
            self.apply_gradients(opt, grads)
        lr = opt.param_groups[0]["lr"]
        world = self.trainer.world_size if self._trainer is not None else 1
        for i, delta in deltas.items():
            U = (-lr / (delta.shape[0] * world)) * delta.T  # (n, B): Delta W = U V^T is the SGD step
            V = self.layer_input(i, hs).T  # (n, B)
            if world > 1:  # the same rank-(world*B) update on every replica
                U, V = (torch.cat(list(self.all_gather(M)), dim=1) for M in (U, V))
            self._robust_update(i, U, V)
        if self.batches_seen % self.inverse_check_every == self.inverse_check_every - 1:
            self._guard_and_log()

    def _robust_update(self, i: int, U: Tensor, V: Tensor) -> None:
        W, W_inv = self.net.weights[i - 1], self.inverse(i)
        if U.shape[1] == 1:
            W_new, inv_new, beta = F.robust_sherman_morrison(W, W_inv, U[:, 0], V[:, 0], self.threshold)
            s_min = (1 + V[:, 0] @ W_inv @ U[:, 0]).abs()
        else:
            W_new, inv_new, beta, s_min = F.robust_woodbury(W, W_inv, U, V, self.threshold)
        W.copy_(W_new)
        W_inv.copy_(inv_new)
        st = self._stats[i]
        st["updates"] += 1
        st["clipped"] = st["clipped"].to(beta.device) + (beta < 1).float()
        st["min_capacitance"] = torch.minimum(st["min_capacitance"].to(beta.device), s_min.float())

    def _reset_stats(self) -> None:
        self._stats = {
            i: {"updates": 0, "clipped": torch.zeros(()), "min_capacitance": torch.tensor(float("inf"))}
            for i in range(2, self.num_layers + 1)
        }

    @torch.no_grad()
    def probe_inverse_error(self, i: int, probes: int = 4) -> Tensor:
        """O(n^2) estimate of the drift of ``W_i^{-1}``: ``max_r |(W W^{-1} - I) r|_inf / |r|_inf``
        over a few Gaussian probes ``r`` (deterministic: seeded by the batch counter)."""
        W, W_inv = self.net.weights[i - 1], self.inverse(i)
        g = torch.Generator(W.device).manual_seed(self.batches_seen * 1009 + i)
        R = torch.randn(W.shape[0], probes, generator=g, device=W.device, dtype=W.dtype)
        return ((W @ (W_inv @ R) - R).abs().amax(0) / R.abs().amax(0)).max()

    @torch.no_grad()
    def estimate_sigma_min(self, i: int, iterations: int = 8) -> Tensor:
        """O(n^2) estimate of ``sigma_min(W_i) = 1/||W_i^{-1}||_2`` by power iteration on ``W^{-1}``."""
        W_inv = self.inverse(i)
        v = torch.ones(W_inv.shape[1], device=W_inv.device, dtype=W_inv.dtype)
        for _ in range(iterations):
            v = W_inv.T @ (W_inv @ v)
            v = v / v.norm()
        return 1 / (W_inv @ v).norm()

    @torch.no_grad()
    def _guard_and_log(self) -> None:
        """Drift guard and cheap diagnostics, all O(n^2) so that they keep the step's scaling.

        Re-inverts ``W`` (O(n^3), rare) when the probed ``|(W W^{-1} - I) r|`` passes
        ``inverse_tolerance``; logs that error, an estimate of ``sigma_min(W)``, the fraction of
        clipped (shortened) updates and the smallest capacitance ``sigma_min(I + K)`` (``|1 + d|``
        at batch size 1) since the last log.
        """
        logs = {}
        for i in range(2, self.num_layers + 1):
            err = self.probe_inverse_error(i)
            logs[f"inverse/error_{i}"] = err
            logs[f"inverse/sigma_min_{i}"] = self.estimate_sigma_min(i)
            st = self._stats[i]
            if st["updates"]:
                logs[f"inverse/clipped_fraction_{i}"] = st["clipped"] / st["updates"]
                logs[f"inverse/min_capacitance_{i}"] = st["min_capacitance"]
            if float(err) > self.inverse_tolerance:
                W = self.net.weights[i - 1]
                self.inverse(i).copy_(torch.linalg.inv(W.double()).to(W.dtype))
                self.reinversions += 1
        logs["inverse/reinversions"] = torch.tensor(float(self.reinversions))
        self._reset_stats()
        if self._trainer is not None:
            self.log_dict({k: v.float().cpu() for k, v in logs.items()}, on_step=True, on_epoch=False)

    def extra_state(self) -> dict:
        return {**super().extra_state(), "reinversions": self.reinversions}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.reinversions = int(state.get("reinversions", 0))


class TPEI(ExactInverseRule):
    """TP-EI: target propagation with exact inverses, every layer updated each batch (Alg. A.4)."""


class RTPEI(ExactInverseRule):
    """RTP-EI: randomized TP-EI, one uniformly drawn layer updated per batch (Alg. A.5)."""

    randomized = True


class RMTPEI(ExactInverseRule):
    """RMTP-EI: randomized modified TP-EI, ``D^{-1}`` instead of ``D`` (Alg. A.6).

    As in the thesis (section 5.1.3) there is no batch normalisation at batch size 1.
    """

    randomized = True
    modified = True
