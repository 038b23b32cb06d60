"""Figs. 5.2-5.4: the 1-2-2 toy example, Gauss-Newton vs target propagation vs backprop (section 5.1.1).

A scalar input ``h_0 ~ N(0, 1)``, two hidden units ``h_1 = s(W_1 h_0)`` and two linear outputs
``h_2 = W_2 h_1``. The student shares the teacher's fixed ``W_2`` and learns only ``W_1`` (a point
in the plane), so each method's trajectory can be drawn on the contours of the expected loss
``E[1/2 ||h_2 - t||^2]`` (eq. 5.4-5.6, 5.14-5.15). Teacher ``W_1*`` and ``W_2`` come from
:class:`tplightning.ToyDataModule` (``--teacher-seed``). Two cases:

* linear (``s`` = identity, fig. 5.2): Gauss-Newton (eq. 5.10-5.11) reaches the optimum in one step;
  TP with exact inverses (``eta^ = 0.8``, eq. 5.8-5.9) goes straight but needs several steps;
  BP (``eta = 0.3``, eq. 5.7) zig-zags along the gradient.
* leaky-ReLU 0.1 (figs. 5.3, 5.4): GN on ``W_1`` with the batch-averaged curvature (eq. 5.18-5.19),
  TP (``eta^ = 1.0``, eq. 5.17), BP (``eta = 0.5``, eq. 5.16) and modified TP (``D^{-1}`` for ``D``,
  ``eta * eta^ = 1``, eq. 5.34), which reaches the optimum in two steps.

Every step uses the whole distribution of ``h_0`` by default: the network is positively
homogeneous in ``h_0``, so every expectation the methods need is the mean over the two-sample
batch ``h_0 = +1, -1`` (``E[h_0^2 f(sign h_0)] = (f(+) + f(-))/2`` for ``h_0 ~ N(0, 1)``). That
makes the trajectories exact and deterministic; ``--batch B`` draws ``B`` Gaussian samples per
step instead (the thesis' fig. 5.3 used ``B = 1``). The TP steps are the library's: targets from
:class:`tplightning.TPEI` / :class:`tplightning.RMTPEI` (``targets_from``: ``h^_1 = W_2^{-1} h^_2``) and
their local update (``forward_grads``: :meth:`tplightning.layers.Dense.local_grads`, i.e. :func:`tplightning.functional.local_update`), with
forward learning rate 1 as in eq. 5.8.

    python -m experiments.toy [--out DIR] [--steps N] [--batch B] [--teacher-seed S] [--seed S]
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from tplightning.data.toy import ToyDataModule
from tplightning.rules.exact import RMTPEI, TPEI

from experiments.common import DTYPE, generator, parse_args, save_figure, save_json, single_thread

NAME = "toy"
TOL = 1e-6
# (case, method) -> step size: eta^ for TP-like methods (forward rate 1), eta for BP (figure captions)
SETTINGS = {
    "linear": {"GN": None, "TP": 0.8, "BP": 0.3},
    "nonlinear": {"GN": None, "TP": 1.0, "BP": 0.5, "MTP": 1.0},
}


class Toy:
    """The toy network with teacher ``W_1*``, shared ``W_2`` and the library's TP rules."""

    def __init__(self, nonlinear: bool, teacher_seed: int = 4):
        dm = ToyDataModule(nonlinear=nonlinear, teacher_seed=teacher_seed)
        W1, W2 = (W.to(DTYPE) for W in dm.teacher_weights)
        self.nonlinear, self.W1_star, self.W2 = nonlinear, W1, W2
        self.act = dm.teacher.activations[0]
        self.rules = {}
        for name, cls in (("TP", TPEI), ("MTP", RMTPEI)):
            rule = cls(
                sizes=[1, 2, 2], activation="leaky_relu" if nonlinear else "linear", negative_slope=0.1,
                train_layers=[1], forward_optimizer=torch.optim.SGD,
            ).to(DTYPE)  # fmt: skip
            rule.load_forward_weights([W1.clone(), W2.clone()])  # W_2 and its exact inverse
            self.rules[name] = rule

    def hidden(self, W1: Tensor, x: Tensor) -> Tensor:
        return self.act(x @ W1.T)

    def targets(self, x: Tensor) -> Tensor:
        return self.hidden(self.W1_star, x) @ self.W2.T

    def loss(self, W1: Tensor, x: Tensor) -> Tensor:
        """``mean_b 1/2 ||h_2 - t||^2`` (the expected loss for the ``+-1`` batch)."""
        return 0.5 * ((self.hidden(W1, x) @ self.W2.T - self.targets(x)) ** 2).sum(-1).mean()

    def loss_grid(self, a: Tensor, b: Tensor, x: Tensor) -> Tensor:
        """The loss at every ``W_1 = (a, b)`` of a grid (for the contours)."""
        W = torch.stack([a.flatten(), b.flatten()], dim=-1)[:, :, None]  # (G, 2, 1)
        h = self.act(torch.einsum("gij,bj->gbi", W, x))  # (G, B, 2)
        err = (h - self.hidden(self.W1_star, x)) @ self.W2.T
        return 0.5 * (err**2).sum(-1).mean(-1).reshape(a.shape)

    # ------------------------------------------------------------------ one step of each method
    def step(self, method: str, W1: Tensor, x: Tensor, lr: float | None) -> Tensor:
        if method == "GN":
            return self.gauss_newton_step(W1, x)
        if method == "BP":
            W = W1.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.loss(W, x), W)
            return W1 - lr * grad
        rule = self.rules[method]
        rule.target_stepsize = lr
        with torch.no_grad():
            rule.net.weights[0].copy_(W1)
            hs, pre = rule.net.forward_all(x)
            targets = rule.targets_from(hs, pre, self.targets(x), 1)  # h^_1 = W_2^-1 (h_2 - eta^ e)
            grad = rule.forward_grads([1], hs, pre, targets)[rule.net.weights[0]]  # eq. 4.12 (D^-1 if modified)
        return W1 - grad  # forward learning rate 1 (eq. 5.8)

    def gauss_newton_step(self, W1: Tensor, x: Tensor) -> Tensor:
        """``-E[J^T J]^{-1} E[J^T e]`` with ``J = dh_2/dW_1 = W_2 D_s h_0`` (eq. 5.10, 5.18-5.19)."""
        a = x @ W1.T  # (B, 2)
        d = self.act.derivative(a)
        J = self.W2[None] * (d * x)[:, None, :]  # (B, 2 outputs, 2 params): W_2 diag(d h_0)
        e = self.hidden(W1, x) @ self.W2.T - self.targets(x)
        G = (J.transpose(1, 2) @ J).mean(0)
        g = (J.transpose(1, 2) @ e[:, :, None]).mean(0)
        return W1 - torch.linalg.solve(G, g)


def start_point(toy: Toy) -> Tensor:
    """Linear: ``W_1* + 1.5 (v_1 + v_2)`` (both principal directions of ``W_2``, so BP zig-zags);
    nonlinear: the orthant opposite to ``W_1*`` (every unit starts on the other side of its kink, as
    in fig. 5.3 where the start is in the positive and the optimum in the negative region)."""
    if toy.nonlinear:
        s = torch.sign(toy.W1_star)
        return -s * (toy.W1_star.abs() + 0.5)
    V = torch.linalg.svd(toy.W2).Vh.T  # columns v_1, v_2
    return toy.W1_star + 1.5 * (V[:, :1] + V[:, 1:])


def trajectory(toy: Toy, method: str, lr, steps: int, max_steps: int, batch: int, gen) -> dict:
    """Iterate ``method`` from :func:`start_point`; losses are the exact expected loss."""
    x_exact = torch.tensor([[1.0], [-1.0]], dtype=DTYPE)
    W = start_point(toy)
    path, losses, reached = [W.flatten().tolist()], [float(toy.loss(W, x_exact))], None
    for t in range(1, max_steps + 1):
        x = x_exact if batch == 0 else torch.randn(batch, 1, generator=gen, dtype=DTYPE)
        W = toy.step(method, W, x, lr)
        loss = float(toy.loss(W, x_exact))
        if not math.isfinite(loss):
            break
        if t <= steps:
            path.append(W.flatten().tolist())
            losses.append(loss)
        if reached is None and loss < TOL:
            reached = t
        if reached is not None and t >= steps:
            break
    return {"step_size": lr, "path": path, "losses": losses, "final_loss": losses[-1], "steps_to_1e-6": reached}


def run(steps: int = 20, max_steps: int = 1000, batch: int = 0, teacher_seed: int = 4, seed: int = 0) -> dict:
    gen = generator(seed)
    out = {"teacher_seed": teacher_seed, "batch": batch or "exact expectation (h_0 = +-1)", "cases": {}}
    for case, methods in SETTINGS.items():
        toy = Toy(case == "nonlinear", teacher_seed)
        out["cases"][case] = {
            "W1_star": toy.W1_star.flatten().tolist(),
            "W2": toy.W2.tolist(),
            "start": start_point(toy).flatten().tolist(),
            "methods": {m: trajectory(toy, m, lr, steps, max_steps, batch, gen) for m, lr in methods.items()},
        }
    return out


def plot(result: dict, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"GN": "Gauss-Newton", "TP": r"TP, $\hat\eta$={}", "BP": r"BP, $\eta$={}", "MTP": r"mod. TP, $\eta\hat\eta$={}"}
    fig, axes = plt.subplots(2, 4, figsize=(12, 5.6))
    x_exact = torch.tensor([[1.0], [-1.0]], dtype=DTYPE)
    for row, (case, r) in enumerate(result["cases"].items()):
        toy = Toy(case == "nonlinear", result["teacher_seed"])
        pts = torch.tensor([p for m in r["methods"].values() for p in m["path"]])
        lo, hi = pts.min(0).values, pts.max(0).values
        pad = 0.15 * (hi - lo).max() + 0.2
        a, b = torch.meshgrid(
            torch.linspace(float(lo[0] - pad), float(hi[0] + pad), 100, dtype=DTYPE),
            torch.linspace(float(lo[1] - pad), float(hi[1] + pad), 100, dtype=DTYPE),
            indexing="ij",
        )
        Z = toy.loss_grid(a, b, x_exact)
        levels = torch.quantile(Z.flatten(), torch.linspace(0.002, 0.95, 10, dtype=DTYPE)).unique()
        for col, name in enumerate(["GN", "TP", "BP", "MTP"]):
            if name not in r["methods"]:
                continue
            ax, m = axes[row][col], r["methods"][name]
            ax.contour(a, b, Z, levels=levels, colors="tab:blue", linewidths=0.6)
            path = torch.tensor(m["path"])
            ax.plot(path[:, 0], path[:, 1], "r*-", ms=5, lw=0.8)
            ax.plot(*r["W1_star"], "kx", ms=8)
            title = titles[name].format(m["step_size"])
            ax.set(title=f"{'linear' if case == 'linear' else 'leaky'}: {title}", xlabel="$W_{1,1}$", ylabel="$W_{1,2}$")
    ax = axes[0][3]  # loss curves of both cases
    for case, style in (("linear", "-"), ("nonlinear", "--")):
        for name, m in result["cases"][case]["methods"].items():
            ax.semilogy([max(v, 1e-16) for v in m["losses"]], style, marker=".", ms=3, label=f"{name} ({case[:3]})")
    ax.axhline(TOL, color="gray", lw=0.5, ls=":")
    ax.set(title="expected loss", xlabel="step", ylabel="loss")
    ax.legend(fontsize="x-small", ncol=2)
    save_figure(fig, out, NAME, dpi=75)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(
        NAME, __doc__.split("\n")[0], argv,
        sizes={"steps": (20, 20, "steps drawn in the figure")},
        extra={
            "max-steps": (int, 1000, "steps allowed to reach loss < 1e-6"),
            "batch": (int, 0, "Gaussian samples per step (0: the exact expectation)"),
            "teacher-seed": (int, 4, "seed of the ToyDataModule teacher (W1*, W2)"),
        },
    )  # fmt: skip
    with single_thread():
        result = run(args.steps, args.max_steps, args.batch, args.teacher_seed, args.seed)
    result["thesis"] = {
        "linear": {"GN": "optimum in 1 step", "TP": "GN direction, several steps", "BP": "zig-zag"},
        "nonlinear": {"GN": "optimum in 2 steps", "TP": "first step like GN, then slow", "MTP": "optimum in 2 steps"},
    }
    save_json(args.out, NAME, result)
    plot(result, args.out)
    print(f"{NAME}: teacher seed {args.teacher_seed}, {result['batch']} per step -> {args.out}")
    for case, r in result["cases"].items():
        for name, m in r["methods"].items():
            print(f"  {case:>9} {name:>3}: final loss {m['final_loss']:.3g} after {len(m['losses']) - 1} steps, "
                  f"loss < 1e-6 after {m['steps_to_1e-6']} steps")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
