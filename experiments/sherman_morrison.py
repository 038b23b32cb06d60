"""Fig. 5.5: the Sherman-Morrison denominator ``|1 + d|`` tracks ``sigma_min`` of the updated matrix.

Section 5.1.2 checks the assumption behind the robust Sherman-Morrison update (Alg. 4.1): in
``(W + u v^T)^{-1} = W^{-1} - W^{-1} u v^T W^{-1} / (1 + d)``, ``d = v^T W^{-1} u`` (eq. 4.19), a
small ``|1 + d|`` means a nearly singular ``W + u v^T``. Each trial draws a robust invertible
Gaussian ``W`` (``sigma_min * sigma_max > 0.4``; the thesis does not give ``n``, we use 6) and
Gaussian ``u``, ``v``, then

(a) plain update ``W + u v^T``: scatter of ``|1 + d|`` vs ``sigma_min(W + u v^T)``;
(b) robust update (Alg. 4.1, ``epsilon = 0.1``): ``W + beta u v^T`` with ``beta = 1/(epsilon - d)``
    where ``|1 + d| < epsilon``: scatter of the same ``|1 + d|`` vs ``sigma_min``.

Compare with the thesis: Pearson ``rho = 0.80`` between ``|1 + d|`` and ``sigma_min`` over the
trials with ``|1 + d| < 0.1``, and ``sigma_min`` bounded below in (b) while it reaches ~0 in (a).
The thesis gives no scale for ``u``, ``v``; with unit Gaussians we measure ``rho ~ 0.5`` (0.75 on
log scales), rising to ~0.7 for smaller updates (``--u-std 0.1``). ``n`` hardly matters.

    python -m experiments.sherman_morrison [--out DIR] [--trials N] [--n N] [--seed S]
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tplightning import functional as F

from experiments.common import generator, parse_args, pearson, robust_gaussian, save_figure, save_json, single_thread, subplots

NAME = "sherman_morrison"


def run_trials(
    trials: int, n: int = 6, epsilon: float = 0.1, tau: float = 0.4, u_std: float = 1.0, seed: int = 0
) -> dict[str, Tensor]:
    """The trials of fig. 5.5: ``|1 + d|`` and ``sigma_min`` after the plain and the robust update."""
    gen = generator(seed)
    W = robust_gaussian(trials, n, n, tau, gen)
    u = u_std * torch.randn(trials, n, generator=gen, dtype=W.dtype)
    v = torch.randn(trials, n, generator=gen, dtype=W.dtype)
    W_inv = torch.linalg.inv(W)
    W_robust, _, beta = F.robust_sherman_morrison(W, W_inv, u, v, epsilon)  # batched over trials
    d = torch.einsum("ti,tij,tj->t", v, W_inv, u)
    W_plain = W + u[:, :, None] * v[:, None, :]
    return {
        "W": W, "W_inv": W_inv, "u": u, "v": v, "beta": beta,
        "abs_denom": (1 + d).abs(),
        "smin_plain": torch.linalg.svdvals(W_plain)[:, -1],
        "smin_robust": torch.linalg.svdvals(W_robust)[:, -1],
        "W_robust": W_robust,
    }  # fmt: skip


def summarize(r: dict[str, Tensor], epsilon: float = 0.1, check: int = 50) -> dict:
    """Statistics of :func:`run_trials`; checks the batched update against Alg. 4.1 on ``check`` trials."""
    small = r["abs_denom"] < epsilon
    diff = 0.0
    for t in range(min(check, len(small))):
        W_new = F.robust_sherman_morrison(r["W"][t], r["W_inv"][t], r["u"][t], r["v"][t], epsilon)[0]
        diff = max(diff, (W_new - r["W_robust"][t]).abs().max().item())
    return {
        "trials": len(small),
        "n": r["W"].shape[-1],
        "epsilon": epsilon,
        "clipped_trials": int(small.sum()),
        "pearson_rho_small_denominator": pearson(r["abs_denom"][small], r["smin_plain"][small]),
        "pearson_rho_small_denominator_loglog": pearson(r["abs_denom"][small].log(), r["smin_plain"][small].log()),
        "pearson_rho_all": pearson(r["abs_denom"], r["smin_plain"]),
        "min_sigma_min_plain": r["smin_plain"].min().item(),
        "min_sigma_min_robust": r["smin_robust"].min().item(),
        "min_sigma_min_robust_clipped": r["smin_robust"][small].min().item() if small.any() else float("nan"),
        "max_abs_diff_vs_functional_robust_sherman_morrison": diff,
        "thesis": {"pearson_rho_small_denominator": 0.80},
    }


def plot(r: dict[str, Tensor], stats: dict, out) -> None:
    """Fig. 5.5: the two scatter plots, trials that Alg. 4.1 clips in another colour."""
    fig, axes = subplots(2)
    clipped = r["abs_denom"] < stats["epsilon"]
    panels = [("smin_plain", "(a) $W + uv^T$"), ("smin_robust", f"(b) robust, $\\epsilon$={stats['epsilon']}")]
    for ax, (key, title) in zip(axes, panels):
        for mask, label in [(~clipped, rf"$|1+d| \geq \epsilon$"), (clipped, rf"$|1+d| < \epsilon$")]:
            ax.scatter(r["abs_denom"][mask], r[key][mask], s=1, alpha=0.3, rasterized=True, label=label)
        ax.set(xscale="log", yscale="log", xlabel="$|1+d|$", ylabel=r"$\sigma_{min}$", title=title)
    axes[0].legend(markerscale=8, fontsize="small")
    save_figure(fig, out, NAME)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(
        NAME, __doc__.split("\n")[0], argv,
        sizes={"trials": (20000, 20000, "number of random trials")},
        extra={
            "n": (int, 6, "matrix size"),
            "epsilon": (float, 0.1, "threshold of Alg. 4.1"),
            "tau": (float, 0.4, "sigma_min*sigma_max bound"),
            "u-std": (float, 1.0, "std of u (v has std 1)"),
        },
    )  # fmt: skip
    with single_thread():
        r = run_trials(args.trials, args.n, args.epsilon, args.tau, args.u_std, args.seed)
        stats = summarize(r, args.epsilon)
    save_json(args.out, NAME, stats)
    plot(r, stats, args.out)
    print(
        f"{NAME}: {stats['trials']} trials, n={stats['n']}: rho(|1+d|, sigma_min | |1+d|<{args.epsilon}) = "
        f"{stats['pearson_rho_small_denominator']:.3f} over {stats['clipped_trials']} trials (thesis 0.80); "
        f"min sigma_min plain {stats['min_sigma_min_plain']:.2e}, robust {stats['min_sigma_min_robust']:.2e}"
        f" -> {args.out}"
    )
    return stats


if __name__ == "__main__":
    main()
