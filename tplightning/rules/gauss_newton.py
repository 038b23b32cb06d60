"""The global Gauss-Newton / Levenberg-Marquardt step on all parameters: a non-local reference for small networks.

Thesis 4.2.1: with ``e = h_L - y`` and ``J = d h_L / d theta`` over every parameter (all layers at once, what no layer
knows: this rule is *not* local), the Levenberg-Marquardt step solves ``(J^T J + lambda I) delta = -J^T e`` (eq. 4.38;
``lambda = 0``: the Gauss-Newton step ``-J^dagger e`` of eq. 4.30, the least-norm one when ``J^T J`` is singular). Target
propagation approximates this step's block-diagonal version (theorem 4.3); the experiment ``experiments.adaptive_steps``
compares the two.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.func import functional_call, jacrev

from .. import functional as F
from .._lightning import OptimizerCallable
from ..adaptive import TrustRegion
from ..errors import ConfigError
from ..layers import Layer
from .arguments import arguments_for
from .base import NORM_GUARD, LearningRule

__all__ = ["GaussNewton"]


class GaussNewton(LearningRule):
    """Gauss-Newton / Levenberg-Marquardt on the whole network (thesis eqs. 4.28-4.38), the global reference.

    Per batch of ``B`` samples, in float64: ``J`` (``B n_L`` rows, one column per trained parameter) by
    :func:`torch.func.jacrev`, ``e = h_L - y``, the step ``delta = -(J^T J / B + lambda I)^dagger J^T e / B`` (the loss is
    the batch mean of ``1/2 ||e||^2``), taken as ``theta <- theta + eta delta`` with ``eta`` the forward optimizer's
    learning rate (plain SGD; 1 is the full step; its schedule applies). With a trust region, ``lambda`` is adapted
    from ``rho`` = actual / predicted decrease of the batch loss at the candidate (eq. 4.66; the prediction is the
    undamped model ``1/2 ||e + J eta delta||^2``), and a step that would raise the batch loss is not taken (classic LM).
    Under DDP ``J^T J``, ``J^T e`` and the losses are averaged over the replicas, so all take the same step.

    It takes every argument of :class:`~tplightning.rules.base.LearningRule` too (``loss`` must be ``mse``).

    Args:
        damping: the initial ``lambda`` (0: Gauss-Newton).
        trust_region: the LM adaptation of ``lambda`` (:class:`~tplightning.adaptive.TrustRegion`); ``None`` keeps
            ``lambda`` fixed and takes every step.

    >>> import functools
    >>> rule = GaussNewton(sizes=[3, 2], activation="linear", forward_optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    >>> float(rule.damping)
    0.0
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
        damping: float = 0.0,
        trust_region: TrustRegion | None = None,
    ):
        super().__init__(**arguments_for(super().__init__, locals()))
        if loss != "mse":
            raise ConfigError(f"GaussNewton needs loss='mse' (the Gauss-Newton model of the L2 loss), got loss={loss!r}")
        if not damping >= 0:
            raise ConfigError(f"damping must be >= 0, got {damping}")
        self.trust_region = trust_region = TrustRegion.build(trust_region)
        if trust_region is not None:
            self.hparams["trust_region"] = trust_region.spec()  # plain data in checkpoints
        self.damping = torch.tensor(float(damping), dtype=torch.float64)

    def build_optimizers(self):
        opts = super().build_optimizers()
        group = opts[0].param_groups[0]
        if not isinstance(opts[0], torch.optim.SGD) or any(float(group.get(k, 0) or 0) for k in ("momentum", "weight_decay")):
            raise ConfigError(f"GaussNewton takes its step with plain SGD (lr = the step size); got {type(opts[0]).__name__} with "
                              "momentum or weight decay")  # fmt: skip
        return opts

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(t.to(self.device), reduce_op="mean").to(t.device)
        return t

    def step_direction(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(params, delta, loss, model_matrices)``: the trained parameters by name, the LM step ``delta`` (flat,
        float64), the batch loss and ``(G, g)`` with ``G = J^T J / B``, ``g = J^T e / B``."""
        params = {n: p for n, p in self.net.named_parameters() if p.requires_grad}
        flat = torch.cat([p.detach().double().flatten() for p in params.values()])
        sizes = [p.numel() for p in params.values()]
        net64 = {n: p.detach().double() for n, p in self.net.named_parameters()}

        def outputs(theta):
            chunks = dict(zip(params, torch.split(theta, sizes)))
            values = {n: chunks[n].view_as(p) if n in chunks else net64[n] for n, p in net64.items()}
            return functional_call(self.net, values, (x.double(),)).flatten()

        B = x.shape[0]
        J = jacrev(outputs)(flat)  # (B n_L, P)
        e = outputs(flat) - y.double().flatten()
        G, g = self._mean(J.T @ J / B), self._mean(J.T @ e / B)
        loss = self._mean(0.5 * e.pow(2).sum() / B)
        A = G + self.damping.to(G.device) * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        delta = -(F.pinv64(A) @ g)
        return {"params": params, "sizes": sizes, "outputs": outputs, "flat": flat}, delta, loss, (G, g)

    def training_step(self, batch, batch_idx):
        x, y = batch
        (opt,) = self.optimizer_list()
        with torch.no_grad():
            hs, _ = self.net.forward_all(x)
            self.check_finite(self.loss_from_output(hs[-1], y), hs)
            ctx, delta, loss, (G, g) = self.step_direction(x, y)
            step = opt.param_groups[0]["lr"] * delta
            take = True
            if self.trust_region is not None:
                e_new = ctx["outputs"](ctx["flat"] + step) - y.double().flatten()
                new_loss = self._mean(0.5 * e_new.pow(2).sum() / x.shape[0])
                predicted = -(g @ step + 0.5 * step @ G @ step)
                actual = loss - new_loss
                self.damping = self.trust_region.update(self.damping, actual.cpu(), predicted.cpu())
                take = bool(actual > 0)
            grads = {}
            if take:  # SGD with lr eta on the gradient -delta gives theta + eta delta
                for p, d in zip(ctx["params"].values(), torch.split(delta, ctx["sizes"])):
                    grads[p] = (-d).view_as(p).to(p.dtype)
            self.apply_gradients(opt, grads)  # no gradients: a counted no-op step
        self.log_train(loss.float(), x.shape[0])
        return loss.float()

    def extra_state(self) -> dict:
        return {**super().extra_state(), "damping": float(self.damping)}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if "damping" in state:
            self.damping = torch.tensor(float(state["damping"]), dtype=torch.float64)
