"""Fig. 5.6: is the Gauss-Newton curvature of the hidden activations block-diagonal dominant?

Lemma 4.2 (and so theorems 4.3, 4.9) treats the hidden activations ``h_bar = (h_1, ..., h_{L-1})``
as the parameters of a Gauss-Newton step and replaces the curvature ``G = J_bar^T J_bar``
(eq. 4.42-4.44) by its block diagonal ``J_i^T J_i`` (eq. 4.45), giving ``dh_i = -J_i^+ e_L``
(eq. 4.48). Section 5.1.2 compares that update with the full one, ``dh_bar = -G^+ J_bar^T e_L``.

Each trial draws, for every sample of the mini-batch, independent Gaussian layer Jacobians
``J_{h_k} = D_{s_k} W_k`` (square, width 6 by default, entries ``N(0, 1)``; the thesis gives neither)
and a Gaussian output error ``e_L``. A mini-batch stacks the samples' Jacobians
along the rows of ``J_bar`` (so ``G`` and ``J_bar^T e_L`` are sums over the samples, as in
classical Gauss-Newton, section 5.1.2). The histogram shows the angle between the full and
the block-diagonal update for (a) 2 hidden layers, batch 1; (b) 10 hidden layers, batch 1;
(c) 10 hidden layers, batch 100.

Compare with the thesis: (a) angles spread over the whole range, (b) mostly close to 90 degrees
(nearly orthogonal), (c) close to 0 degrees (the approximation holds for large batches). At batch
size 1 the angle is always acute: ``J_bar dh_approx = -(L-1) e_L = (L-1) J_bar dh_full`` and
``dh_full`` is the min-norm solution, so ``dh_full . dh_approx = (L-1) ||dh_full||^2 > 0``.
With unit-variance entries the angle is dominated by the blocks near the output (their ``J_i``
are the smallest); ``--std`` changes that weighting (e.g. ``1/sqrt(width)`` gives (c) ~40 degrees).

    python -m experiments.block_diagonal [--out DIR] [--trials N] [--width N] [--seed S]
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tplightning import functional as F

from experiments.common import (
    DTYPE, apply_pinv, generator, output_jacobians, parse_args, save_figure, save_json, single_thread, subplots,
)

NAME = "block_diagonal"
SETTINGS = [(2, 1), (10, 1), (10, 100)]  # (hidden layers, mini-batch size) of fig. 5.6a-c


def gauss_newton_updates(blocks: Sequence[Tensor], e: Tensor) -> tuple[Tensor, Tensor]:
    """Full and block-diagonal Gauss-Newton updates of the hidden activations (eq. 4.42-4.48).

    ``blocks[i]`` is ``J_{i+1}`` of shape ``(..., R, n_i)`` with the ``R`` output rows of all
    samples stacked, ``e`` the stacked output errors ``(..., R)``. Full: ``-G^+ J_bar^T e``, the
    min-norm solution ``-J_bar^+ e`` (eq. 4.29-4.30 with ``J_bar = [J_1 ... J_{L-1}]``).
    Block-diagonal: ``dh_i = -J_i^+ e`` per block (eq. 4.47-4.48). Both ``(..., sum n_i)``.
    """
    full = -apply_pinv(torch.cat(list(blocks), dim=-1), e)
    approx = torch.cat([-apply_pinv(J, e) for J in blocks], dim=-1)
    return full, approx


def random_trials(
    trials: int, hidden: int, batch: int, width: int, gen: torch.Generator, std: float = 1.0
) -> Tensor:
    """Cosine of the angle between the full and block-diagonal updates for ``trials`` random networks."""
    layers = [std * torch.randn(trials, batch, width, width, generator=gen, dtype=DTYPE) for _ in range(hidden)]
    e = torch.randn(trials, batch * width, generator=gen, dtype=DTYPE)
    blocks = [J.reshape(trials, batch * width, width) for J in output_jacobians(layers)]  # stack samples' rows
    return F.cosine(*gauss_newton_updates(blocks, e))


def run(
    trials: int, width: int = 6, std: float = 1.0, seed: int = 0, settings=SETTINGS, chunk: int = 250
) -> dict[str, Tensor]:
    """Cosines for each ``(hidden, batch)`` setting, in chunks of trials to bound memory."""
    gen = generator(seed)
    return {
        f"{hidden} hidden, batch {batch}": torch.cat(
            [random_trials(min(chunk, trials - s), hidden, batch, width, gen, std) for s in range(0, trials, chunk)]
        )
        for hidden, batch in settings
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(
        NAME, __doc__.split("\n")[0], argv,
        sizes={"trials": (2000, 10000, "random trials per setting")},
        extra={"width": (int, 6, "width of every layer"), "std": (float, 1.0, "std of the Jacobians' entries")},
    )  # fmt: skip
    with single_thread():
        cosines = run(args.trials, args.width, args.std, args.seed)
    stats = {"trials": args.trials, "width": args.width, "std": args.std, "settings": {}}
    fig, axes = subplots(len(cosines))
    for ax, (label, cos) in zip(axes, cosines.items()):
        angle = torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))
        stats["settings"][label] = {
            "mean_cos": cos.mean().item(),
            "mean_abs_cos": cos.abs().mean().item(),
            "median_angle_deg": angle.median().item(),
        }
        ax.hist(angle, bins=45, range=(0, 180))
        ax.set(title=label, xlabel=r"angle $\alpha$ [deg]", ylabel="trials", xticks=range(0, 181, 45))
    save_json(args.out, NAME, stats)
    save_figure(fig, args.out, NAME)
    print(f"{NAME}: {args.trials} trials per setting, width {args.width} -> {args.out}")
    for label, s in stats["settings"].items():
        print(f"  {label:>20}: mean |cos| {s['mean_abs_cos']:.3f}, median angle {s['median_angle_deg']:.1f} deg")
    return stats


if __name__ == "__main__":
    main()
