"""Section 6.7's claim that the exact-inverse Jacobian (eq. 6.40) "is always negative definite".

Two experiments (see :mod:`tplightning.dynamics.stability` for the two readings of the claim):

1. **Random blocks**, the thesis' own experiment: ``J_i`` Gaussian with a random std in
   ``[0.1, 10]``, ``mu ~ U(0, 0.5)``, widths ``--widths`` and depths ``--depths`` (the thesis ran
   100000 cases: ``--full``). Counted: cases with an eigenvalue of non-negative real part
   (eigenvalue claim) and with a non-negative eigenvalue of the symmetric part (definiteness), and
   the largest deviation of ``max Re(eig)`` from the closed form ``-1 + 2 sqrt(mu(1-mu)) cos(pi/(L+1))``.
2. **Simulated networks**: random exact-inverse networks (leaky-ReLU 0.35 or tanh hidden layers,
   linear output, Gaussian weights of std ``10^U(-0.5, 0.5)/sqrt(n)``), a fixed clamp
   ``h_L^trgt = h_L - eta^ (h_L - y)`` with Gaussian ``y`` and ``eta^ = 0.5`` (eq. 6.3; section 6.7 fixes the
   target), ``mu ~ U(0, 0.5)``; the Jacobian at the equilibrium of each sample (Newton from the forward
   pass, restarted from the ODE solution at ``t = 100 tau`` where it fails). Where no equilibrium is
   found, the ODE is integrated again to ``t = 100 tau`` and its final speed reported (does the network
   settle at all?). With tanh the mixture ``(1-mu) tanh(.) + mu g`` can leave ``(-1, 1)``, where
   ``s^{-1}`` (clamped atanh, :class:`tplightning.functional.Tanh`) is undefined: such networks fail.

Defaults: 5000 random cases, 80 networks x 8 samples (about two minutes). ``--full``: 100000 and 400.

    python -m experiments.dynamics.stability [--out DIR] [--full] [--docs]
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from tplightning.dynamics.models import ConvergenceError, MixtureNetwork
from tplightning.dynamics.stability import random_blocks_check, spectrum, toeplitz_spectrum

from experiments.common import generator, save_figure, save_json, single_thread, subplots
from experiments.dynamics.common import DTYPE, markdown_table, parse_args, to_docs

NAME = "dyn_stability"


def network_cases(nets: int, batch: int, widths: Sequence[int], depths: Sequence[int], gen) -> list[dict]:
    rows = []
    for k in range(nets):
        n = widths[int(torch.randint(len(widths), (1,), generator=gen))]
        L = depths[int(torch.randint(len(depths), (1,), generator=gen))]
        act = ["leaky_relu", "tanh"][k % 2]
        mu = 0.5 * float(torch.rand(1, generator=gen, dtype=DTYPE))
        std = 10 ** (float(torch.rand(1, generator=gen, dtype=DTYPE)) - 0.5) / math.sqrt(n)
        Ws = [std * torch.randn(n, n, generator=gen, dtype=DTYPE) for _ in range(L)]
        x = torch.randn(batch, n, generator=gen, dtype=DTYPE)
        y = torch.randn(batch, n, generator=gen, dtype=DTYPE)
        m = MixtureNetwork(Ws, act, mu)
        out = m.forward_pass(x)[-1]
        target = out - 0.5 * (out - y)
        row = {"width": n, "depth": L, "activation": act, "mu": mu, "std": std * math.sqrt(n), "bound": max(toeplitz_spectrum(mu, L))}
        try:
            hs = m.equilibrium(x, target, max_iter=200)  # Newton, restarted from the ODE at t = 100 tau if it fails
        except ConvergenceError:
            traj = m.trajectory(x, target, torch.tensor([0.0, 100.0], dtype=DTYPE), rtol=1e-5, atol=1e-8)
            end = [h[-1] for h in traj]
            speed = max(float(v.abs().max()) for v in m.velocity(x, end, target))
            rows.append({**row, "converged": False, "ode_final_speed": speed})
            continue
        s = spectrum(m.jacobian(x, hs, target))
        rows.append({**row, "converged": True, "max_real_eig": float(s["max_real_eig"].max()), "max_sym_eig": float(s["max_sym_eig"].max()),
                     "unstable_samples": int((s["max_real_eig"] >= 0).sum()), "samples": batch})  # fmt: skip
    return rows


def plot(blocks: dict, nets: list[dict], out):
    fig, ax = subplots(3, 4.0, 3.2)
    rows = blocks["rows"]
    ax[0].scatter([r[2] for r in rows], [r[3] for r in rows], s=2, alpha=0.4, label="random blocks")
    mus = [i / 200 for i in range(1, 100)]
    for L in sorted({r[1] for r in rows}):
        ax[0].plot(mus, [max(toeplitz_spectrum(m, L)) for m in mus], lw=0.8, label=f"closed form L={L}")
    ax[0].axhline(0, color="k", lw=0.5)
    ax[0].set(xlabel="mu", ylabel="max Re eig(J)", title="eigenvalues (random blocks)")
    ax[0].legend(fontsize="xx-small")
    sym = [r[4] for r in rows]
    ax[1].hist([math.copysign(math.log10(1 + abs(v)), v) for v in sym], bins=60)
    ax[1].axvline(0, color="r", lw=0.8)
    ax[1].set(xlabel="sign(l) log10(1+|l|), l = max eig((J+J^T)/2)", ylabel="cases", title="symmetric part (random blocks)")
    ok = [r for r in nets if r["converged"]]
    for act, marker in (("leaky_relu", "o"), ("tanh", "s")):
        sel = [r for r in ok if r["activation"] == act]
        ax[2].scatter([r["mu"] for r in sel], [r["max_real_eig"] - r["bound"] for r in sel], s=10, marker=marker, label=act)
    ax[2].axhline(0, color="k", lw=0.5)
    ax[2].set(xlabel="mu", ylabel="max Re eig - closed form", title="simulated equilibria")
    ax[2].legend(fontsize="x-small")
    return save_figure(fig, out, NAME, dpi=80)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(
        NAME, __doc__.split("\n")[0], argv, module="experiments.dynamics.stability",
        sizes={"cases": (5000, 100000, "random block cases"), "nets": (80, 400, "random networks")},
        extra={"widths": (str, "1,2,4,8", "widths (comma-separated)"), "depths": (str, "2,3,4,6", "depths"),
               "batch": (int, 8, "samples per network")},
    )  # fmt: skip
    widths = [int(v) for v in args.widths.split(",")]
    depths = [int(v) for v in args.depths.split(",")]
    gen = generator(args.seed)
    with single_thread():
        blocks = random_blocks_check(args.cases, widths, depths, generator=gen)
        nets = network_cases(args.nets, args.batch, widths, depths, gen)
    fig = plot(blocks, nets, args.out)
    ok = [r for r in nets if r["converged"]]
    bad = [r for r in nets if not r["converged"]]
    unstable = [r for r in ok if r["unstable_samples"]]
    summary = {
        "random_blocks": {k: v for k, v in blocks.items() if k != "rows"},
        "networks": len(nets), "networks_converged": len(ok),
        "networks_with_unstable_equilibria": len(unstable),
        "unstable_samples": sum(r["unstable_samples"] for r in ok), "samples": sum(r["samples"] for r in ok),
        "networks_with_positive_symmetric_part": sum(r["max_sym_eig"] >= 0 for r in ok),
        "max_excess_over_closed_form": max((r["max_real_eig"] - r["bound"] for r in ok), default=float("nan")),
        "not_converged": [{k: r[k] for k in ("width", "depth", "activation", "mu", "std", "ode_final_speed")} for r in bad],
        "unstable": [{k: r[k] for k in ("width", "depth", "activation", "mu", "std", "max_real_eig", "unstable_samples")} for r in unstable],
    }  # fmt: skip
    save_json(args.out, NAME, {"summary": summary, "networks": nets, "random_block_rows": blocks["rows"][:2000], "seed": args.seed})
    rb = summary["random_blocks"]
    lines = [
        f"random blocks ({rb['cases']} cases, widths {widths}, depths {depths}, mu ~ U(0, 0.5)):",
        f"  eigenvalue claim (all Re < 0): {rb['eigenvalue_counterexamples']} counterexamples; max Re eig {rb['max_real_eig']:.4f}; "
        f"max |max Re eig - closed form| {rb['max_deviation_from_toeplitz']:.2e}",
        f"  symmetric part negative definite: {rb['symmetric_part_counterexamples']} counterexamples "
        f"({100 * rb['symmetric_part_counterexamples'] / rb['cases']:.1f} %); largest max eig((J+J^T)/2) {rb['max_sym_eig']:.3g} "
        f"(width {rb['worst_symmetric_case']['width']}, depth {rb['worst_symmetric_case']['depth']}, mu {rb['worst_symmetric_case']['mu']:.3f})",
        f"simulated networks ({len(nets)} x {args.batch} samples): equilibrium found in {len(ok)}; "
        f"{summary['networks_with_unstable_equilibria']} of them have unstable samples ({summary['unstable_samples']}/{summary['samples']} samples); "
        f"positive symmetric part in {summary['networks_with_positive_symmetric_part']}; max excess of max Re eig over the closed form "
        f"{summary['max_excess_over_closed_form']:.3g}",
    ]  # fmt: skip
    for r in summary["unstable"][:8]:
        lines.append(f"  unstable: {r['activation']} width {r['width']} depth {r['depth']} mu {r['mu']:.3f} std {r['std']:.2f}: "
                     f"max Re eig {r['max_real_eig']:.3f} in {r['unstable_samples']} samples")  # fmt: skip
    for r in summary["not_converged"][:8]:
        lines.append(f"  no equilibrium: {r['activation']} width {r['width']} depth {r['depth']} mu {r['mu']:.3f} std {r['std']:.2f}: "
                     f"ODE speed after t=100: {r['ode_final_speed']:.2g}")  # fmt: skip
    print("\n".join(lines))
    cmd = "python -m experiments.dynamics.stability" + (" --full" if args.full else "") + " --docs"
    rows_t = [
        ["random blocks (thesis' experiment)", rb["cases"], rb["eigenvalue_counterexamples"], rb["symmetric_part_counterexamples"], rb["max_real_eig"], rb["max_sym_eig"]],
        ["simulated networks, converged", len(ok), f"{len(unstable)} ({summary['unstable_samples']}/{summary['samples']} samples)",
         summary["networks_with_positive_symmetric_part"], max((r["max_real_eig"] for r in ok), default=float("nan")),
         max((r["max_sym_eig"] for r in ok), default=float("nan"))],
    ]  # fmt: skip
    table = "\n\n".join([
        f"Written by `{cmd}` (seed {args.seed}; widths {widths}, depths {depths}).",
        markdown_table(["setting", "cases", "eigenvalue counterexamples", "symmetric-part counterexamples", "largest max Re eig", "largest max eig of sym part"], rows_t),
        f"Random blocks: the largest deviation of `max Re eig` from `-1 + 2 sqrt(mu(1-mu)) cos(pi/(L+1))` is "
        f"{rb['max_deviation_from_toeplitz']:.1e}. Simulated networks: {len(bad)} of {len(nets)} had no equilibrium (Newton, restarted from the ODE at t = 100 tau)"
        + (" (final ODE speeds " + ", ".join(f"{r['ode_final_speed']:.2g}" for r in bad[:6]) + (", ..." if len(bad) > 6 else "") + ")" if bad else "")
        + f"; the largest excess of `max Re eig` over the closed form at a converged equilibrium is {summary['max_excess_over_closed_form']:.3g}.",
        f"![stability](figures/{NAME}.png)",
    ])  # fmt: skip
    to_docs(args, NAME, fig, table)
    return summary


if __name__ == "__main__":
    main()
