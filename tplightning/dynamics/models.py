"""Continuous-time rate networks of pyramidal neurons that implement target propagation (thesis chapter 6).

Torch only, batched over samples: activations are ``(B, n_i)`` rows, weights ``(n_out, n_in)`` as
in the rest of the library (:mod:`tplightning.functional`), so ``f_i(h) = s_i(h @ W_i.T)``.

Three models:

* :class:`MixtureNetwork`, the single-phase network of section 6.3,
  ``tau dh_i/dt = -h_i + (1-mu) f_i(h_{i-1}) + mu g_i(h_{i+1})`` (eq. 6.1), ``f_i = s_i(W_i .)``
  (eq. 6.2), output clamp ``g_L = h_L^trgt`` (eq. 6.3), with exact inverses
  ``g_i = W_{i+1}^{-1} s_{i+1}^{-1}`` (eq. 6.4; the thesis writes ``W_i^{-1} s_i^{-1}``, an index
  slip: ``g_i`` inverts ``f_{i+1}``) or learned ones ``g_i = Q_i t_i``, ``t_i = s_{i+1}^{-1}``
  (eq. 6.23 with the choice section 6.8 asks for), and the weight dynamics 6.17 and 6.26;
* :class:`TwoPhaseNetwork`, section 6.6: the same dynamics run in a free phase (output
  short-circuited, eq. 6.29) and a learning phase; forward weights by eq. 6.35, feedback weights by
  eq. 6.37 in the free phase;
* :class:`MultiplexingNetwork`, section 6.9.2: event rates ``h_i = s_i(a_i^b)`` and burst
  probabilities ``h^_i = t_i(a_i^a)`` with decoupled compartment dynamics (eqs. 6.43-6.46); forward
  weights by eq. 6.58; the feedback dynamics the thesis leaves open are our choice (see the class).

**Targets.** Every ``equilibrium``/``trajectory`` takes ``h_target``: either a ``(B, n_L)`` tensor,
the fixed clamp of eq. 6.3, or a callable ``h_L -> h_L^trgt`` applied row-wise to the *current*
output. The callable is how we read eq. 6.10: the thesis sets ``h_L^trgt = h_L^* - eta^ e_L`` with
``h_L^*`` the equilibrium output itself and solves ``h_L^* = (1-mu) f_L + mu (h_L^* - eta^ e_L)``
for eq. 6.12, ``h_L^* = f_L(h_{L-1}^*) - mu/(1-mu) eta^ e_L``: a teaching layer that reads the
output. ``lambda h: h`` is the free phase's short circuit (eq. 6.29). :func:`nudged_target` builds
eq. 6.10's target from a loss.

**Equilibria** are found by damped Newton iteration on ``R(h) = -h + (1-mu) f(h) + mu g(h)`` with
the analytic Jacobian of eq. 6.40 and a backtracking line search per sample (a sample whose residual
does not fall along the Newton direction, which happens at the kinks of leaky-ReLU, takes a damped
Euler step of eq. 6.1 instead), started from the forward pass (the ``mu -> 0`` solution); ``method="fixed_point"`` iterates
``h <- h + damping R(h)`` (forward Euler of eq. 6.1 with step ``damping tau``). Both stop when
``max_b ||R(h_b)||_inf <= tol (1 + max |h|)`` and raise :class:`ConvergenceError` otherwise.
**Trajectories** integrate the ODE with ``torchdiffeq.odeint`` (``dopri5`` by default).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import functional as F
from ..functional import Activation, get_activation
from .stability import block_tridiagonal

__all__ = ["ConvergenceError", "MixtureNetwork", "TwoPhaseNetwork", "MultiplexingNetwork", "nudged_target", "short_circuit"]

Target = Tensor | Callable[[Tensor], Tensor]


class ConvergenceError(RuntimeError):
    """The equilibrium iteration did not reach its tolerance (or produced non-finite rates).

    >>> net = MixtureNetwork([torch.eye(2, dtype=torch.float64)] * 2, "tanh", mu=0.3)
    >>> try:
    ...     net.equilibrium(torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64),
    ...                     method="fixed_point", max_iter=1)
    ... except ConvergenceError as err:
    ...     print(str(err)[:42])
    equilibrium not found: residual max|R| = 0
    """


def nudged_target(y: Tensor, loss: str, target_stepsize: float) -> Callable[[Tensor], Tensor]:
    """``h_L -> h_L - eta^ dl/dh_L`` (eqs. 6.10/6.11 and 6.54), via :func:`tplightning.functional.output_target`.

    Args:
        y: labels, ``(B, n_L)`` for ``mse``, ``(B,)`` class indices for ``cross_entropy``.
        loss: ``mse`` or ``cross_entropy``.
        target_stepsize: ``eta^``.

    >>> nudged_target(torch.tensor([[1.0]]), "mse", 0.5)(torch.tensor([[3.0]]))  # 3 - 0.5 (3 - 1)
    tensor([[2.]])
    """
    return lambda h_L: F.output_target(h_L, y, loss, target_stepsize)


def short_circuit(h_L: Tensor) -> Tensor:
    """The free phase's target ``h_L^trgt = h_L`` (eq. 6.29 and section 6.9.2).

    >>> short_circuit(torch.tensor([[0.5, -1.0]]))
    tensor([[ 0.5000, -1.0000]])
    """
    return h_L


def check_mu(mu: float) -> float:
    """``mu`` as a float; ``ValueError`` unless ``0 < mu < 1`` (eq. 6.1 mixes ``(1-mu) f + mu g``).

    >>> check_mu(0.2)
    0.2
    """
    if not isinstance(mu, (int, float)) or isinstance(mu, bool) or not 0 < mu < 1:
        raise ValueError(f"mu must lie in (0, 1) (the thesis uses (0, 0.5)), got {mu!r}")
    return float(mu)


def _check_tau(tau: float) -> float:
    """``tau`` as a float; ``ValueError`` unless ``tau > 0`` (the time constant of eqs. 6.1 and 6.43)."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return float(tau)


def _activations(L: int, activation, output_activation, negative_slope: float) -> list[Activation]:
    if isinstance(activation, (list, tuple)):
        if len(activation) != L:
            raise ValueError(f"expected {L} activations (one per layer), got {len(activation)}")
        return [get_activation(a, negative_slope) for a in activation]
    return [get_activation(activation, negative_slope)] * (L - 1) + [get_activation(output_activation, negative_slope)]


def _network(weights, activation, output_activation, negative_slope):
    """``(weights, L, sizes, activations)`` of a forward network given by its weight matrices."""
    weights = _check_weights(weights)
    L = len(weights)
    return weights, L, [weights[0].shape[1]] + [W.shape[0] for W in weights], _activations(L, activation, output_activation, negative_slope)


def _check_feedback(feedback: Sequence[Tensor], sizes: list[int]) -> list[Tensor]:
    """``[Q_1..Q_{L-1}]`` detached, ``Q_i`` of shape ``(n_i, n_{i+1})``; ``ValueError`` otherwise."""
    feedback = [Q.detach() for Q in feedback]
    L = len(sizes) - 1
    if len(feedback) != L - 1:
        raise ValueError(f"feedback must list L-1 = {L - 1} matrices Q_1..Q_{L - 1}, got {len(feedback)}")
    for i, Q in enumerate(feedback, start=1):
        if tuple(Q.shape) != (sizes[i], sizes[i + 1]):
            raise ValueError(f"Q_{i} must have shape {(sizes[i], sizes[i + 1])}, got {tuple(Q.shape)}")
    return feedback


def _check_weights(weights: Sequence[Tensor]) -> list[Tensor]:
    weights = [W.detach() for W in weights]
    if not weights:
        raise ValueError("weights must list at least one matrix [W_1, ..., W_L]")
    for i, W in enumerate(weights, start=1):
        if W.dim() != 2:
            raise ValueError(f"W_{i} must be a matrix (n_{i}, n_{i - 1}), got shape {tuple(W.shape)}")
        if i > 1 and W.shape[1] != weights[i - 2].shape[0]:
            raise ValueError(f"W_{i} has {W.shape[1]} columns but W_{i - 1} has {weights[i - 2].shape[0]} rows")
    return weights


def _check_input(x: Tensor, n0: int) -> None:
    if x.dim() != 2 or x.shape[1] != n0:
        raise ValueError(f"x must be a (batch, {n0}) tensor, got shape {tuple(x.shape)}")


def _target_value(h_target: Target, h_L: Tensor) -> Tensor:
    t = h_target(h_L) if callable(h_target) else h_target
    if t.shape != h_L.shape:
        raise ValueError(f"h_target must have the output's shape {tuple(h_L.shape)}, got {tuple(t.shape)}")
    return t


def _target_jacobian(h_target: Target, h_L: Tensor) -> Tensor | None:
    """``d h_L^trgt / d h_L`` per sample ``(B, n, n)`` for a row-wise callable target (``None`` if fixed)."""
    if not callable(h_target):
        return None
    if h_target is short_circuit:
        return torch.eye(h_L.shape[1], dtype=h_L.dtype, device=h_L.device).expand(h_L.shape[0], -1, -1)
    with torch.enable_grad():
        h = h_L.detach().requires_grad_(True)
        t = h_target(h)
        rows = [torch.autograd.grad(t[:, k].sum(), h, retain_graph=k < t.shape[1] - 1)[0] for k in range(t.shape[1])]
    return torch.stack(rows, dim=1).detach()


def _split(v: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    return list(torch.split(v, list(sizes), dim=-1))


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


# --------------------------------------------------------------------------------------------
# The single-phase mixture network (sections 6.3-6.5)
# --------------------------------------------------------------------------------------------


class _Feedforward:
    """The feed-forward part both network families share: ``f_i`` and the plain forward pass."""

    weights: list[Tensor]
    activations: list[Activation]

    def f(self, i: int, h_prev: Tensor) -> Tensor:
        """``f_i(h_{i-1}) = s_i(W_i h_{i-1})`` (eqs. 6.2, 6.49)."""
        return self.activations[i - 1](h_prev @ self.weights[i - 1].T)

    def forward_pass(self, x: Tensor) -> list[Tensor]:
        """``[h_1, ..., h_L]`` of the feed-forward network (the ``mu -> 0`` equilibrium)."""
        _check_input(x, self.sizes[0])
        hs, h = [], x
        for i in range(1, self.L + 1):
            h = self.f(i, h)
            hs.append(h)
        return hs


class MixtureNetwork(_Feedforward):
    """The single-phase network of eq. 6.1 with exact (eq. 6.4) or learned (eq. 6.23) inverses.

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_i`` of shape ``(n_i, n_{i-1})`` (detached copies are used).
        activation: hidden non-linearity ``s_i`` (a name, an :class:`~tplightning.functional.Activation`,
            or a list of ``L`` of them, one per layer).
        mu: mixing coefficient in (0, 1) (the thesis: (0, 0.5)).
        feedback: ``None`` for exact inverses ``Q_i = W_{i+1}^{-1}`` (square ``W_2..W_L`` needed), or
            ``[Q_1, ..., Q_{L-1}]``, ``Q_i`` of shape ``(n_i, n_{i+1})``, for ``g_i = Q_i s_{i+1}^{-1}``.
        output_activation: ``s_L`` (``linear`` by default).
        negative_slope: leaky-ReLU slope.
        tau: neural time constant.

    ``g_i`` needs ``s_{i+1}^{-1}`` in both cases, so ``s_2..s_L`` must be invertible.

    >>> W1 = torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    >>> W2 = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    >>> net = MixtureNetwork([W1, W2], "leaky_relu", mu=0.2)
    >>> x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    >>> [[round(v, 4) for v in h[0].tolist()] for h in net.forward_pass(x)]  # the mu -> 0 equilibrium
    [[0.5, -0.35], [1.0, -0.175]]
    >>> h1, h2 = net.equilibrium(x, torch.zeros(1, 2, dtype=torch.float64))  # output clamped to 0 (eq. 6.3)
    >>> [round(v, 4) for v in h2[0].tolist()]
    [0.7619, -0.1333]
    """

    def __init__(
        self,
        weights: Sequence[Tensor],
        activation="leaky_relu",
        mu: float = 0.1,
        feedback: Sequence[Tensor] | None = None,
        output_activation="linear",
        negative_slope: float = 0.35,
        tau: float = 1.0,
    ):
        self.weights, self.L, self.sizes, self.activations = _network(weights, activation, output_activation, negative_slope)
        self.mu = check_mu(mu)
        self.tau = _check_tau(tau)
        for i in range(2, self.L + 1):
            act = self.activations[i - 1]
            if not act.invertible:
                raise ValueError(f"g_{i - 1} needs the inverse of s_{i}, but layer {i}'s activation {act!r} is not invertible")
        self.exact = feedback is None
        if self.exact:
            for i in range(2, self.L + 1):
                W = self.weights[i - 1]
                if W.shape[0] != W.shape[1]:
                    raise ValueError(f"exact inverses (eq. 6.4) need square W_{i}, got shape {tuple(W.shape)}")
            self.feedback = [F.inverse64(W) for W in self.weights[1:]]
        else:
            self.feedback = _check_feedback(feedback, self.sizes)

    @property
    def ratio(self) -> float:
        """``mu / (1 - mu)``, the per-layer factor of eqs. 6.12-6.16."""
        return self.mu / (1 - self.mu)

    # ------------------------------------------------------------------- maps
    def g(self, i: int, h_next: Tensor) -> Tensor:
        """``g_i(h_{i+1}) = Q_i s_{i+1}^{-1}(h_{i+1})`` (eqs. 6.4, 6.23), ``i = 1..L-1``."""
        return self.activations[i].inverse(h_next) @ self.feedback[i - 1].T

    def g_derivative(self, i: int, h_next: Tensor) -> Tensor:
        """``dg_i/dh_{i+1} = Q_i diag(1/s_{i+1}'(s_{i+1}^{-1}(h_{i+1})))``, ``(B, n_i, n_{i+1})``."""
        act = self.activations[i]
        d = 1 / act.derivative(act.inverse(h_next), h_next)
        return self.feedback[i - 1].unsqueeze(0) * d.unsqueeze(1)

    # ------------------------------------------------------------------- dynamics
    def drive(self, x: Tensor, hs: Sequence[Tensor], h_target: Target) -> list[Tensor]:
        """``(1-mu) f_i(h_{i-1}) + mu g_i(h_{i+1})`` for every layer, ``g_L = h_L^trgt`` (eqs. 6.1, 6.3)."""
        prev = [x, *hs[:-1]]
        out = []
        for i in range(1, self.L + 1):
            top = self.g(i, hs[i]) if i < self.L else _target_value(h_target, hs[-1])
            out.append((1 - self.mu) * self.f(i, prev[i - 1]) + self.mu * top)
        return out

    def velocity(self, x: Tensor, hs: Sequence[Tensor], h_target: Target) -> list[Tensor]:
        """``dh_i/dt = (-h_i + (1-mu) f_i + mu g_i) / tau`` (eq. 6.1)."""
        return [(d - h) / self.tau for d, h in zip(self.drive(x, hs, h_target), hs)]

    def jacobian(self, x: Tensor, hs: Sequence[Tensor], h_target: Target) -> Tensor:
        """``dR/dh`` of ``R = -h + (1-mu) f + mu g`` at ``hs``: the block-tridiagonal matrix of eq. 6.40, ``(B, N, N)``."""
        lower = []
        for i in range(2, self.L + 1):
            a = hs[i - 2] @ self.weights[i - 1].T
            d = self.activations[i - 1].derivative(a)
            lower.append(d.unsqueeze(-1) * self.weights[i - 1].unsqueeze(0))  # D_{s_i} W_i (eq. 6.41)
        upper = [self.g_derivative(i, hs[i]) for i in range(1, self.L)]
        return block_tridiagonal(self.sizes[1:], lower, upper, self.mu, _target_jacobian(h_target, hs[-1]))

    # ------------------------------------------------------------------- equilibrium
    def equilibrium(
        self,
        x: Tensor,
        h_target: Target,
        tol: float | None = None,
        max_iter: int = 100,
        method: str = "newton",
        damping: float = 0.5,
        h0: Sequence[Tensor] | None = None,
        ode_fallback: float = 100.0,
    ) -> list[Tensor]:
        """The fixed point ``h_i^* = (1-mu) f_i(h_{i-1}^*) + mu g_i(h_{i+1}^*)`` (eq. 6.5): ``[h_1^*, ..., h_L^*]``.

        Args:
            x: input ``h_0``, ``(B, n_0)``.
            h_target: fixed ``(B, n_L)`` clamp or row-wise callable of ``h_L`` (see the module docstring).
            tol: stop when ``max ||R||_inf <= tol (1 + max |h|)`` (default 1e-10 in float64, 1e-5 otherwise).
            max_iter: iterations before :class:`ConvergenceError`.
            method: ``newton`` (damped, with line search) or ``fixed_point`` (``h <- h + damping R``).
            damping: step of the fixed-point iteration, in (0, 1].
            h0: start (default: the forward pass).
            ode_fallback: if Newton fails, integrate eq. 6.1 from the start over ``ode_fallback * tau``
                (``dopri5``, at most 2000 steps) and run Newton again from there (0 disables). Newton can cycle between
                the linear pieces of leaky-ReLU, or (tanh) step out of ``s^{-1}``'s domain, where the
                dynamics still settle.
        """
        try:
            return self._solve(x, h_target, tol, max_iter, method, damping, h0)
        except ConvergenceError:
            if method != "newton" or not ode_fallback:
                raise
        t = torch.tensor([0.0, ode_fallback * self.tau], dtype=x.dtype)
        try:
            end = [h[-1] for h in MixtureNetwork.trajectory(self, x, h_target, t, h0=h0, rtol=1e-6, atol=1e-9, options={"max_num_steps": 2000})]
        except (AssertionError, RuntimeError) as exc:  # torchdiffeq: step size underflow on a diverging run
            raise ConvergenceError(f"equilibrium not found: Newton failed and integrating eq. 6.1 failed too ({exc}) (mu={self.mu})") from None
        return self._solve(x, h_target, tol, max_iter, method, damping, end, after_ode=ode_fallback)

    def _solve(self, x, h_target, tol, max_iter, method, damping, h0, after_ode: float = 0.0) -> list[Tensor]:
        if method not in ("newton", "fixed_point"):
            raise ValueError(f"method must be 'newton' or 'fixed_point', got {method!r}")
        if not 0 < damping <= 1:
            raise ValueError(f"damping must lie in (0, 1], got {damping}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        hs = list(h0) if h0 is not None else self.forward_pass(x)
        _check_input(x, self.sizes[0])
        tol = _default_tol(x.dtype) if tol is None else tol
        sizes = self.sizes[1:]

        def residual(v: Tensor) -> Tensor:
            h = _split(v, sizes)
            return torch.cat([d - hh for d, hh in zip(self.drive(x, h, h_target), h)], dim=-1)

        v = torch.cat(hs, dim=-1)
        r = residual(v)
        for it in range(max_iter + 1):
            err = float(r.abs().max()) if r.numel() else 0.0
            scale = 1 + float(v.abs().max())
            if not (err == err and err < float("inf")):
                break
            if err <= tol * scale:
                return _split(v, sizes)
            if it == max_iter:
                break
            if method == "fixed_point":
                v = v + damping * r
                r = residual(v)
                continue
            J = self.jacobian(x, _split(v, sizes), h_target)
            try:
                step = torch.linalg.solve(J, -r.unsqueeze(-1)).squeeze(-1)
            except RuntimeError as exc:  # singular Jacobian
                raise ConvergenceError(f"equilibrium: the Jacobian of eq. 6.40 is singular at iteration {it} (mu={self.mu}): {exc}") from None
            norm = r.norm(dim=-1)
            t = torch.ones_like(norm)
            new_v, new_r = v + step, residual(v + step)
            for _ in range(30):  # backtracking per sample
                bad = ~(new_r.norm(dim=-1) <= (1 - 1e-4 * t) * norm)
                bad &= norm > 0
                if not bool(bad.any()):
                    break
                t = torch.where(bad, t / 2, t)
                cand = v + t.unsqueeze(-1) * step
                new_v = torch.where(bad.unsqueeze(-1), cand, new_v)
                new_r = torch.where(bad.unsqueeze(-1), residual(new_v), new_r)
            else:  # no decrease along the Newton step (a kink of a piecewise-linear s): a damped Euler step of eq. 6.1
                new_v = torch.where(bad.unsqueeze(-1), v + damping * r, new_v)
                new_r = torch.where(bad.unsqueeze(-1), residual(new_v), new_r)
            v, r = new_v, new_r
        raise ConvergenceError(
            f"equilibrium not found: residual max|R| = {err:.3g} > tol*(1+max|h|) = {tol * scale:.3g} after "
            f"{max_iter} {method} iterations{f' (restarted after integrating eq. 6.1 over t = {after_ode:g} tau)' if after_ode else ''} "
            f"(mu={self.mu}, {self.L} layers); raise max_iter, lower mu, or "
            "check that the fixed point is stable (tplightning.dynamics.stability)"
        )

    # ------------------------------------------------------------------- trajectory
    def trajectory(
        self,
        x: Tensor,
        h_target: Target,
        t: Tensor,
        h0: Sequence[Tensor] | None = None,
        method: str = "dopri5",
        rtol: float = 1e-7,
        atol: float = 1e-9,
        options: dict | None = None,
    ) -> list[Tensor]:
        """``[h_1(t), ..., h_L(t)]``, each ``(T, B, n_i)``, integrating eq. 6.1 with ``torchdiffeq.odeint``.

        ``h0`` defaults to the forward pass (the state before a target is applied); ``options`` go to
        ``odeint`` (e.g. ``{"max_num_steps": 1000}``).
        """
        from torchdiffeq import odeint

        _check_input(x, self.sizes[0])
        sizes = self.sizes[1:]
        hs = list(h0) if h0 is not None else self.forward_pass(x)
        v0 = torch.cat(hs, dim=-1)

        def rhs(_t, v):
            return torch.cat(self.velocity(x, _split(v, sizes), h_target), dim=-1)

        return _split(odeint(rhs, v0, t.to(v0.dtype), rtol=rtol, atol=atol, method=method, options=options), sizes)

    # ------------------------------------------------------------------- weight dynamics
    def learning_signals(self, x: Tensor, hs: Sequence[Tensor]) -> list[Tensor]:
        """``h_i^* - f_i(h_{i-1}^*)`` per layer: the signal the forward weights learn from (eq. 6.17)."""
        prev = [x, *hs[:-1]]
        return [h - self.f(i, p) for i, (h, p) in enumerate(zip(hs, prev), start=1)]

    def forward_update(self, x: Tensor, hs: Sequence[Tensor]) -> list[Tensor]:
        """``G_i`` with ``dW_i/dt = -eta_i G_i``: ``G_i = mean_b D_{s_i} (f_i(h_{i-1}^*) - h_i^*) h_{i-1}^{*T}`` (eq. 6.17).

        ``D_{s_i}`` at ``W_i h_{i-1}^*``; the batch mean of :func:`tplightning.functional.local_update`.
        """
        prev = [x, *hs[:-1]]
        out = []
        for i in range(1, self.L + 1):
            a = prev[i - 1] @ self.weights[i - 1].T
            f = self.activations[i - 1](a)
            out.append(F.local_update(self.activations[i - 1].derivative(a, f), f, hs[i - 1], prev[i - 1]))
        return out

    def feedback_update(self, hs: Sequence[Tensor], weight_decay: float = 0.0) -> list[Tensor]:
        """``G_i`` with ``dQ_i/dt = -eta^inv G_i``: ``mean_b (g_i(h_{i+1}^*) - h_i^*) t_i(h_{i+1}^*)^T + lambda Q_i`` (eq. 6.26).

        ``g_i(h_{i+1}^*) = Q_i t_i(h_{i+1}^*)``, so this is the gradient of the thesis-form inverse loss
        :func:`tplightning.functional.inverse_loss_grad` at ``a = t_i(h_{i+1}^*)``, ``h = h_i^*``, plus the decay.
        With ``hs`` a free-phase equilibrium this is eq. 6.37 (whose ``eta_i lambda`` we read as
        ``eta^inv lambda``, as in eq. 6.26).
        """
        out = []
        for i in range(1, self.L):
            t = self.activations[i].inverse(hs[i])
            out.append(F.inverse_loss_grad(self.feedback[i - 1], t, hs[i - 1]) + weight_decay * self.feedback[i - 1])
        return out


# --------------------------------------------------------------------------------------------
# The two-phase network (section 6.6)
# --------------------------------------------------------------------------------------------


class TwoPhaseNetwork(MixtureNetwork):
    """The difference-target-propagation network of section 6.6: a free and a learning phase of eq. 6.1.

    Same arguments as :class:`MixtureNetwork`. The free phase short-circuits the output
    (``h_L^trgt = h_L``, so ``h_L^{f*} = f_L(h_{L-1}^{f*})``, eq. 6.29); the learning phase uses the
    given target. :meth:`equilibrium` returns ``(free, learning)``.

    >>> W1 = torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    >>> W2 = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    >>> net = TwoPhaseNetwork([W1, W2], "leaky_relu", mu=0.2)
    >>> x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    >>> free, learn = net.equilibrium(x, nudged_target(torch.zeros(1, 2, dtype=torch.float64), "mse", 0.1))
    >>> torch.allclose(free[-1], net.forward_pass(x)[-1])  # exact inverses: the free phase is the forward pass
    True
    >>> [round(v, 4) for v in learn[-1][0].tolist()]
    [0.9697, -0.1697]
    """

    def equilibrium(self, x: Tensor, h_target: Target, **kw) -> tuple[list[Tensor], list[Tensor]]:  # type: ignore[override]
        """``([h_1^{f*}..h_L^{f*}], [h_1^{l*}..h_L^{l*}])``; the learning phase starts from the free equilibrium."""
        free = super().equilibrium(x, short_circuit, **kw)
        kw.pop("h0", None)
        learn = super().equilibrium(x, h_target, h0=free, **kw)
        return free, learn

    def trajectory(self, x: Tensor, h_target: Target, t: Tensor, h0=None, **kw) -> tuple[list[Tensor], list[Tensor]]:  # type: ignore[override]
        """Free phase over ``t`` from ``h0`` (default: forward pass), then the learning phase over ``t`` from its end."""
        free = super().trajectory(x, short_circuit, t, h0=h0, **kw)
        learn = super().trajectory(x, h_target, t, h0=[h[-1] for h in free], **kw)
        return free, learn

    def forward_update(self, x: Tensor, free: Sequence[Tensor], learn: Sequence[Tensor]) -> list[Tensor]:  # type: ignore[override]
        """``G_i = mean_b D^l_{s_i} (h_i^{f*} - h_i^{l*}) h_{i-1}^{l*T}`` with ``dW_i/dt = -eta_i G_i`` (eq. 6.35).

        The thesis prints ``(h_{i-1}^{f*} - h_{i-1}^{l*})``, which does not match ``D_{s_i}`` (size
        ``n_i``) nor the local loss ``||h_i^{f*} - h_i^{l*}||^2`` of eq. 6.34 nor eq. 6.36: we use
        layer ``i``. ``D^l_{s_i}`` at ``W_i h_{i-1}^{l*}``.
        """
        prev = [x, *learn[:-1]]
        out = []
        for i in range(1, self.L + 1):
            d = self.activations[i - 1].derivative(prev[i - 1] @ self.weights[i - 1].T)
            out.append(F.local_update(d, free[i - 1], learn[i - 1], prev[i - 1]))
        return out


# --------------------------------------------------------------------------------------------
# The multiplexing network (section 6.9.2)
# --------------------------------------------------------------------------------------------


class MultiplexingNetwork(_Feedforward):
    """Burst-multiplexing network of section 6.9.2: separate feed-forward and feedback channels.

    ``tau da_i^b/dt = -a_i^b + W_i h_{i-1}``, ``tau da_i^a/dt = -a_i^a + Q_i h^_{i+1}``,
    ``h_i = s_i(a_i^b)``, ``h^_i = t_i(a_i^a)`` (eqs. 6.43-6.46; the thesis sets ``tau = 1``), and
    ``h^_L = h_L^trgt`` (eq. 6.51). At equilibrium ``h_i^* = f_i(h_{i-1}^*)`` and
    ``h^_i^* = g_i(h^_{i+1}^*) = t_i(Q_i h^_{i+1}^*)`` (eqs. 6.49-6.50): the feed-forward chain does
    not depend on the feedback, and the feedback chain only on ``h_L``. :meth:`equilibrium` therefore
    solves exactly by one forward and one backward sweep (a Gauss-Seidel iteration that converges in
    one pass); with an output-dependent target the result is still exact because ``h_L`` does not
    depend on the bursts.

    Args:
        weights: ``[W_1, ..., W_L]``.
        feedback: ``[Q_1, ..., Q_{L-1}]``, ``Q_i`` of shape ``(n_i, n_{i+1})``.
        activation: ``s_i`` of the hidden layers (as :class:`MixtureNetwork`).
        feedback_activation: ``t_i`` of the apical compartments, ``i = 1..L-1``; ``None`` uses
            ``t_i = s_i`` (so ``g_i = s_i(Q_i .)``, the original DTP form, eq. 5.54), our choice: the
            thesis names ``t_i`` but does not fix it.
        output_activation: as :class:`MixtureNetwork`.
        negative_slope: as :class:`MixtureNetwork`.
        tau: as :class:`MixtureNetwork`.

    **Feedback dynamics (our choice; the thesis leaves them open).** In the free phase every
    neuron sees its event rate ``h_i``, its burst probability ``h^_i^f = t_i(a_i^a)`` and the bursts
    ``h^_{i+1}^f`` arriving at its apical synapses, and we let
    ``dQ_i/dt = -eta^inv (D_{t_i}(a_i^{a,f}) (h^_i^f - h_i) h^_{i+1}^{fT} + lambda Q_i)``: gradient descent on
    ``||t_i(Q_i h^_{i+1}^f) - h_i||^2``, which drives the free-phase bursts onto the event rates. For
    ``i = L-1`` (``h^_L^f = h_L``) it is exactly Alg. A.9's rule for ``||g_i(f_{i+1}(h_i)) - h_i||^2``;
    once the layers above reconstruct, ``h^_{i+1}^f = h_{i+1}`` and the same holds below, so ``g_i``
    becomes an approximate inverse of ``f_{i+1}`` on the data, which eqs. 6.52-6.59 assume.

    >>> W1 = torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    >>> W2 = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    >>> net = MultiplexingNetwork([W1, W2], [torch.linalg.inv(W2)], "leaky_relu", feedback_activation="linear")
    >>> x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    >>> hs, bursts = net.equilibrium(x, torch.tensor([[2.0, 1.0]], dtype=torch.float64))
    >>> [round(v, 4) for v in hs[-1][0].tolist()], bursts[0][0].tolist()  # h_L = f_L(h_{L-1}); h^_1 = Q_1 h^_2
    ([1.0, -0.175], [1.0, 2.0])
    """

    def __init__(
        self,
        weights: Sequence[Tensor],
        feedback: Sequence[Tensor],
        activation="leaky_relu",
        feedback_activation=None,
        output_activation="linear",
        negative_slope: float = 0.35,
        tau: float = 1.0,
    ):
        self.weights, self.L, self.sizes, self.activations = _network(weights, activation, output_activation, negative_slope)
        if feedback_activation is None:
            self.feedback_activations = self.activations[: self.L - 1]
        elif isinstance(feedback_activation, (list, tuple)):
            if len(feedback_activation) != self.L - 1:
                raise ValueError(f"expected L-1 = {self.L - 1} feedback activations, got {len(feedback_activation)}")
            self.feedback_activations = [get_activation(a, negative_slope) for a in feedback_activation]
        else:
            self.feedback_activations = [get_activation(feedback_activation, negative_slope)] * (self.L - 1)
        self.tau = _check_tau(tau)
        self.feedback = _check_feedback(feedback, self.sizes)

    def g(self, i: int, hhat_next: Tensor) -> Tensor:
        """``g_i(h^_{i+1}) = t_i(Q_i h^_{i+1})`` (eq. 6.50)."""
        return self.feedback_activations[i - 1](hhat_next @ self.feedback[i - 1].T)

    def g_jvp(self, i: int, at: Tensor, v: Tensor) -> Tensor:
        """``J_{g_i} v`` with ``J_{g_i} = D_{t_i}(Q_i at) Q_i``, row-wise."""
        c = at @ self.feedback[i - 1].T
        return self.feedback_activations[i - 1].derivative(c) * (v @ self.feedback[i - 1].T)

    def _bursts_down(self, top: Tensor) -> list[Tensor]:
        """``[h^_1..h^_L]`` with ``h^_L = top`` and ``h^_i = g_i(h^_{i+1})`` below (eqs. 6.50-6.51 at equilibrium)."""
        hhat = [top]
        for i in range(self.L - 1, 0, -1):
            hhat.insert(0, self.g(i, hhat[0]))
        return hhat

    def equilibrium(self, x: Tensor, h_target: Target) -> tuple[list[Tensor], list[Tensor]]:
        """``([h_1^*..h_L^*], [h^_1^*..h^_L^*])`` with ``h^_L^* = h_L^trgt`` (eqs. 6.47-6.51)."""
        hs = self.forward_pass(x)
        hhat = self._bursts_down(_target_value(h_target, hs[-1]))
        if not all(bool(torch.isfinite(h).all()) for h in [*hs, *hhat]):
            raise ConvergenceError("multiplexing equilibrium has non-finite rates: check the weights and the target")
        return hs, hhat

    def phases(self, x: Tensor, h_target: Target) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``(h^*, h^^{*f}, h^^{*l})``: event rates (the same in both phases), free and learning bursts."""
        hs, free = self.equilibrium(x, short_circuit)
        return hs, free, self._bursts_down(_target_value(h_target, hs[-1]))

    def trajectory(
        self, x: Tensor, h_target: Target, t: Tensor, a0: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
        method: str = "dopri5", rtol: float = 1e-7, atol: float = 1e-9,
    ) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
        """``([h_1(t)..h_L(t)], [h^_1(t)..h^_L(t)])``, each ``(T, B, n_i)``, integrating eqs. 6.43-6.46.

        ``a0 = (a^b, a^a)`` defaults to all compartments at rest (zero voltage).
        """
        from torchdiffeq import odeint

        _check_input(x, self.sizes[0])
        nb, na = self.sizes[1:], self.sizes[1:-1]
        B = x.shape[0]
        if a0 is None:
            v0 = x.new_zeros(B, sum(nb) + sum(na))
        else:
            v0 = torch.cat([*a0[0], *a0[1]], dim=-1)

        def unpack(v):
            parts = _split(v, [*nb, *na])
            return parts[: self.L], parts[self.L :]

        def bursts(ab, aa):
            hs = [act(a) for act, a in zip(self.activations, ab)]
            hhat = [act(a) for act, a in zip(self.feedback_activations, aa)] + [_target_value(h_target, hs[-1])]
            return hs, hhat

        def rhs(_t, v):
            ab, aa = unpack(v)
            hs, hhat = bursts(ab, aa)
            prev = [x, *hs[:-1]]
            dab = [(-a + p @ W.T) / self.tau for a, p, W in zip(ab, prev, self.weights)]
            daa = [(-a + hhat[i] @ self.feedback[i - 1].T) / self.tau for i, a in enumerate(aa, start=1)]
            return torch.cat([*dab, *daa], dim=-1)

        sol = odeint(rhs, v0, t.to(v0.dtype), rtol=rtol, atol=atol, method=method)
        ab, aa = unpack(sol)
        return bursts(ab, aa)

    def forward_update(self, x: Tensor, hs: Sequence[Tensor], free: Sequence[Tensor], learn: Sequence[Tensor]) -> list[Tensor]:
        """``G_i = mean_b D_{s_i} (h^_i^{*f} - h^_i^{*l}) h_{i-1}^{*T}``, ``dW_i/dt = -eta_i G_i`` (eq. 6.58).

        The thesis prints ``h^_{i-1}^{*f} - h^_i^{*l}``; layers ``i-1`` and ``i`` cannot be subtracted
        (sizes differ) and eq. 6.59 is the first-order form of ``h^_i^{*f} - h^_i^{*l}``: we use layer ``i``.
        """
        prev = [x, *hs[:-1]]
        out = []
        for i in range(1, self.L + 1):
            d = self.activations[i - 1].derivative(prev[i - 1] @ self.weights[i - 1].T, hs[i - 1])
            out.append(F.local_update(d, free[i - 1], learn[i - 1], prev[i - 1]))
        return out

    def feedback_update(self, hs: Sequence[Tensor], free: Sequence[Tensor], weight_decay: float = 0.0) -> list[Tensor]:
        """``G_i = mean_b D_{t_i}(Q_i h^_{i+1}^f) (h^_i^f - h_i) h^_{i+1}^{fT} + lambda Q_i`` (our choice, see the class).

        The gradient of the original-form inverse loss (:func:`tplightning.functional.original_inverse_loss_grad`) at
        ``h_{i+1} = h^_{i+1}^f``, written as :func:`tplightning.functional.local_update` of ``g_i``'s own layer (the batch
        mean taken before the product, which the recorded runs used).
        """
        out = []
        for i in range(1, self.L):
            c = free[i] @ self.feedback[i - 1].T
            d = self.feedback_activations[i - 1].derivative(c, free[i - 1])
            out.append(F.local_update(d, free[i - 1], hs[i - 1], free[i]) + weight_decay * self.feedback[i - 1])
        return out
