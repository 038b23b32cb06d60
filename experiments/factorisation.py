"""Fig. 5.12: when does the pseudo-inverse of ``J_i = dh_L/dh_i`` factorise over the layers?

Lemma 4.8: ``J_i^+ = J_i^f := prod_{k=i+1}^L W_k^+ D_{s_k}^+`` (eq. 5.48) for all ``i`` if and only
if ``n_1 >= n_2 = ... = n_L`` (with full-rank ``W_k``). Difference target propagation propagates
``J_i^f e_L`` where Gauss-Newton uses ``J_i^+ e_L`` (theorem 4.9), so section 5.2.1 measures
``||J_i^f e_L - J_i^+ e_L||_2`` averaged over 8 Gaussian ``e_L``, in 1000 random networks with 2
hidden layers whose ``W_k`` and diagonal ``D_{s_k}`` are Gaussian with ``sigma_min * sigma_max > 0.4``:

(a) ``n = (5, 5, 5)``, (b) ``(7, 5, 5)``: lemma holds, distance ~0 (float round-off);
(c) ``(5, 5, 3)``, smaller output layer: lemma fails, distance clearly nonzero.

The histograms show ``i = 1`` (``J_1 = D_3 W_3 D_2 W_2``); ``J_2 = D_3 W_3`` is a single layer and
factorises in all three (its numbers are in the JSON).

    python -m experiments.factorisation [--out DIR] [--trials N] [--batch B] [--seed S]
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from experiments.common import (
    DTYPE, generator, output_jacobians, parse_args, robust_gaussian, save_figure, save_json, single_thread, subplots,
)

NAME = "factorisation"
ARCHITECTURES = {"(a) n = 5, 5, 5": (5, 5, 5), "(b) n = 7, 5, 5": (7, 5, 5), "(c) n = 5, 5, 3": (5, 5, 3)}


def factorised_pinvs(Ws: Sequence[Tensor], Ds: Sequence[Tensor]) -> list[Tensor]:
    """``J_i^f = prod_{k=i+1}^L W_k^+ D_{s_k}^+`` for ``i = 1..L-1`` (eq. 5.48), given ``W_k, D_k``, ``k = 2..L``."""
    factors = [torch.linalg.pinv(W) @ torch.linalg.pinv(D) for W, D in zip(Ws, Ds)]
    out = [factors[-1]]
    for f in reversed(factors[:-1]):
        out.insert(0, f @ out[0])
    return out


def random_layers(
    sizes: Sequence[int], trials: int, gen: torch.Generator, tau: float = 0.4
) -> tuple[list[Tensor], list[Tensor]]:
    """Robust Gaussian ``W_k (n_k x n_{k-1})`` and diagonal ``D_k`` for ``k = 2..L``, ``sizes = (n_1, ..., n_L)``."""
    Ws = [robust_gaussian(trials, n, m, tau, gen) for m, n in zip(sizes[:-1], sizes[1:])]
    Ds = [robust_gaussian(trials, n, n, tau, gen, diagonal=True) for n in sizes[1:]]
    return Ws, Ds


def distances(
    sizes: Sequence[int], trials: int, batch: int = 8, seed: int = 0, relative: bool = False
) -> list[Tensor]:
    """``||J_i^f e_L - J_i^+ e_L||_2`` averaged over ``batch`` Gaussian ``e_L``: one ``(trials,)`` tensor per ``i``.

    ``relative`` divides each distance by ``||J_i^+ e_L||_2`` (the Gauss-Newton update's norm).
    """
    gen = generator(seed)
    Ws, Ds = random_layers(sizes, trials, gen)
    e = torch.randn(trials, sizes[-1], batch, generator=gen, dtype=DTYPE)
    out = []
    for Jf, J in zip(factorised_pinvs(Ws, Ds), output_jacobians([D @ W for W, D in zip(Ws, Ds)])):
        gn = torch.linalg.pinv(J) @ e
        dist = (Jf @ e - gn).norm(dim=1)
        out.append((dist / gn.norm(dim=1) if relative else dist).mean(dim=1))
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(
        NAME, __doc__.split("\n")[0], argv,
        sizes={"trials": (1000, 1000, "random networks per architecture")},
        extra={"batch": (int, 8, "output errors e_L averaged per network")},
    )  # fmt: skip
    stats = {"trials": args.trials, "batch": args.batch, "architectures": {}}
    fig, axes = subplots(len(ARCHITECTURES))
    with single_thread():
        for ax, (label, sizes) in zip(axes, ARCHITECTURES.items()):
            dist = distances(sizes, args.trials, args.batch, args.seed)
            stats["architectures"][label] = {
                f"layer {i}": {"median": d.median().item(), "max": d.max().item()} for i, d in enumerate(dist, start=1)
            }
            ax.hist(dist[0].clamp_min(1e-18).log10(), bins=40, range=(-18, 2))
            ax.set(title=label, xlabel=r"$\log_{10}\|J_1^f e_L - J_1^\dagger e_L\|_2$", ylabel="networks")
    save_json(args.out, NAME, stats)
    save_figure(fig, args.out, NAME)
    print(f"{NAME}: {args.trials} networks per architecture, e_L averaged over {args.batch} -> {args.out}")
    for label, layers in stats["architectures"].items():
        parts = [f"{i}: median {s['median']:.1e}, max {s['max']:.1e}" for i, s in layers.items()]
        print(f"  {label}: " + "; ".join(parts))
    return stats


if __name__ == "__main__":
    main()
