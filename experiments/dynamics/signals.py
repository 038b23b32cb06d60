"""Section 6.8's predictions on the learning signal, measured at simulated equilibria (no training).

Random networks of square leaky-ReLU (0.35) layers of width ``--width`` (orthogonal weights, so
no layer is ill-conditioned) with a linear output, ``--batch`` Gaussian inputs, Gaussian targets
``y``, MSE, output nudge ``eta^ = 0.1`` (eq. 6.10), ``--nets`` networks per setting. Four parts:

A. **Depth decay, exact inverses** (eq. 6.15): at layer ``i`` the measured signal
   ``||h_i^* - f_i(h_{i-1}^*)||`` divided by ``||eta^ [prod J_{f_{k+1}}^{-1}] e_L||`` (the same
   expression without the factor), averaged over samples, should be ``(mu/(1-mu))^{L+1-i}``. We fit
   ``log(ratio) = (L+1-i) log(r_fit)`` per ``mu`` over layers and depths ``--depths`` and compare ``r_fit``
   with ``mu/(1-mu)``.
B. **Approximate inverses, single phase** (eq. 6.22): ``Q_i = W_{i+1}^{-1} + eps ||W^{-1}|| N/sqrt(n)``
   (relative perturbation ``eps``). The reconstruction part of the signal is the free-phase
   equilibrium's ``h_i^{f*} - f_i`` (eq. 6.31: no target); the target part is the rest. Their norm
   ratio and the cosine of the single-phase signal with the clean signal
   ``-eta^ r^{L+1-i} [prod J_{g_k}] e_L`` (eq. 6.22's last term).
C. **Two phases** (eq. 6.36): ``e^phase_i = (h_i^{f*} - h_i^{l*}) - eta^ r^{L+1-i} [prod J_{g_k}] e_L``
   against the clean signal, and the cosine of ``h^l - h^f`` with it. Eqs. 6.31/6.33 expand around
   ``f_i(h_{i-1}^{f*})`` and ``f_i(h_{i-1}^{l*})`` and the thesis drops their difference, which is
   ``r`` times the signal of layer ``i-1``, so even exact inverses leave ``|e^phase| ~ r |signal|``; the
   prediction is that ``e^phase`` does not grow with the reconstruction errors.
D. **Multiplexing** (eq. 6.59): with ``Q_i = W_{i+1}^dagger`` (``t_i = s_i``), the per-layer signal
   ``||h^_i^f - h^_i^l|| / ||eta^ e_L||`` against depth: eq. 6.59 predicts no factor ``r^{L+1-i}``.

Defaults: width 6, depths 2-6, mu 0.05/0.1/0.2/0.3, eps 0.01/0.1, 8 networks x 64 samples (about 10 s).
``--full``: 32 networks.

    python -m experiments.dynamics.signals [--out DIR] [--full] [--docs]
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

import torch

from tplightning.dynamics.models import ConvergenceError, MixtureNetwork, MultiplexingNetwork, TwoPhaseNetwork, nudged_target
from tplightning.dynamics.theory import mixture_first_order, multiplexing_first_order

from experiments.common import generator, save_figure, save_json, single_thread, subplots
from experiments.dynamics.common import DTYPE, findings_line, markdown_table, orthogonal_network, parse_args, to_docs

NAME = "dyn_signals"
ETA = 0.1
MUS = [0.05, 0.1, 0.2, 0.3]
EPS = [0.01, 0.1]


def _mean_norm(t) -> float:
    return float(t.norm(dim=-1).mean())


def _cos(a, b) -> float:
    return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)).mean())


def depth_decay(nets: int, width: int, batch: int, depths: Sequence[int], gen) -> dict:
    """Part A: ratio of measured signal to ``||eta^ prod J^-1 e_L||`` per layer, and fitted ``r``."""
    rows, fits, failures = [], {}, {}
    for mu in MUS:
        xs, ys = [], []
        for L in depths:
            for _ in range(nets):
                Ws = orthogonal_network(L, width, 1.0, gen)
                x = torch.randn(batch, width, generator=gen, dtype=DTYPE)
                y = torch.randn(batch, width, generator=gen, dtype=DTYPE)
                m = MixtureNetwork(Ws, "leaky_relu", mu)
                try:
                    hs = m.equilibrium(x, nudged_target(y, "mse", ETA), tol=1e-14)
                except ConvergenceError:
                    failures[mu] = failures.get(mu, 0) + 1
                    continue
                sig = m.learning_signals(x, hs)
                e_L = m.forward_pass(x)[-1] - y
                unit = MixtureNetwork(Ws, "leaky_relu", 0.5)  # r = 1: the bare product [prod J^-1] e_L
                bare = mixture_first_order(unit, x, -ETA * e_L)["signal"]
                for i in range(1, L + 1):
                    ratio = float((sig[i - 1].norm(dim=-1) / bare[i - 1].norm(dim=-1)).mean())
                    rows.append({"mu": mu, "L": L, "layer": i, "ratio": ratio, "predicted": (mu / (1 - mu)) ** (L + 1 - i)})
                    xs.append(L + 1 - i)
                    ys.append(math.log(ratio))
        slope = sum(a * b for a, b in zip(xs, ys)) / sum(a * a for a in xs)  # least squares through 0
        fits[mu] = {"r": mu / (1 - mu), "r_fit": math.exp(slope), "no_equilibrium": failures.get(mu, 0), "networks": nets * len(depths)}
    return {"rows": rows, "fits": fits}


def approximate(nets: int, width: int, batch: int, L: int, mu: float, gen) -> dict:
    """Parts B and C for one depth and ``mu``: per layer and ``eps``."""
    out = {}
    for eps in [0.0, *EPS]:
        acc = {k: [[] for _ in range(L)] for k in ("recon", "target", "cos_single", "phase", "clean", "cos_two")}
        for _ in range(nets):
            Ws = orthogonal_network(L, width, 1.0, gen)
            Qs = []
            for W in Ws[1:]:
                inv = torch.linalg.inv(W)
                Qs.append(inv + eps * inv.norm() / width * torch.randn(W.shape, generator=gen, dtype=DTYPE))
            x = torch.randn(batch, width, generator=gen, dtype=DTYPE)
            y = torch.randn(batch, width, generator=gen, dtype=DTYPE)
            m = TwoPhaseNetwork(Ws, "leaky_relu", mu, feedback=Qs)
            free, learn = m.equilibrium(x, nudged_target(y, "mse", ETA), tol=1e-14)
            sf, sl = m.learning_signals(x, free), m.learning_signals(x, learn)
            e_L = m.forward_pass(x)[-1] - y
            clean = mixture_first_order(m, x, -m.ratio * ETA * e_L)["signal"]  # -eta^ r^{L+1-i} prod J_g e_L
            for i in range(L):
                acc["recon"][i].append(_mean_norm(sf[i]))
                acc["target"][i].append(_mean_norm(sl[i] - sf[i]))
                acc["cos_single"][i].append(_cos(sl[i], clean[i]))
                diff = learn[i] - free[i]  # the two-phase signal, h^l - h^f = -(h^f - h^l)
                acc["phase"][i].append(_mean_norm(diff - clean[i]))
                acc["clean"][i].append(_mean_norm(clean[i]))
                acc["cos_two"][i].append(_cos(diff, clean[i]))
        out[eps] = {k: [statistics.fmean(v) for v in vals] for k, vals in acc.items()}
    return out


def multiplexing(nets: int, width: int, batch: int, depths: Sequence[int], gen) -> dict:
    """Part D: ``||h^f_i - h^l_i|| / ||eta^ e_L||`` per layer and depth, and the first-order check."""
    rows = []
    for L in depths:
        for _ in range(nets):
            Ws = orthogonal_network(L, width, 1.0, gen)
            Qs = [torch.linalg.pinv(W) for W in Ws[1:]]
            x = torch.randn(batch, width, generator=gen, dtype=DTYPE)
            y = torch.randn(batch, width, generator=gen, dtype=DTYPE)
            m = MultiplexingNetwork(Ws, Qs, "leaky_relu")
            hs, free, learn = m.phases(x, nudged_target(y, "mse", ETA))
            e_L = hs[-1] - y
            pred = multiplexing_first_order(m, x, -ETA * e_L)["signal"]
            for i in range(1, L + 1):
                d = free[i - 1] - learn[i - 1]
                rows.append({
                    "L": L, "layer": i, "ratio": float((d.norm(dim=-1) / (ETA * e_L.norm(dim=-1))).mean()),
                    "first_order_rel_error": float(((d + pred[i - 1]).norm(dim=-1) / pred[i - 1].norm(dim=-1)).mean()),
                })  # fmt: skip
    xs = [r["L"] + 1 - r["layer"] for r in rows]
    ys = [math.log(r["ratio"]) for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return {"rows": rows, "per_layer_factor_fit": math.exp(slope)}


def plot(res: dict, out) -> object:
    fig, ax = subplots(4, 3.8, 3.2)
    for mu in MUS:
        rows = [r for r in res["depth"]["rows"] if r["mu"] == mu]
        k = [r["L"] + 1 - r["layer"] for r in rows]
        ax[0].scatter(k, [r["ratio"] for r in rows], s=8, label=f"mu={mu}")
        kk = sorted(set(k))
        ax[0].plot(kk, [(mu / (1 - mu)) ** j for j in kk], lw=0.8)
    ax[0].set(yscale="log", xlabel="L+1-i", ylabel="signal / |eta^ prod J^-1 e_L|", title="A: decay (lines: (mu/(1-mu))^(L+1-i))")
    ax[0].legend(fontsize="x-small")
    ap = res["approximate"]
    layers = list(range(1, len(ap[0.0]["recon"]) + 1))
    for eps, v in ap.items():
        if eps == 0.0:
            continue
        ax[1].plot(layers[:-1], v["recon"][:-1], "o-", label=f"reconstruction, eps={eps}")  # zero at layer L
    ax[1].plot(layers, ap[0.0]["target"], "k^--", label="target part")
    ax[1].set(yscale="log", xlabel="layer i", ylabel="mean norm", title=f"B: single phase, L={len(layers)}, mu={res['mu']}")
    ax[1].legend(fontsize="x-small")
    for eps, v in ap.items():
        ax[2].plot(layers, v["cos_single"], "o-", label=f"single, eps={eps}")
        ax[2].plot(layers, v["cos_two"], "s--", label=f"two-phase, eps={eps}")
    ax[2].set(xlabel="layer i", ylabel="cos with clean signal", title="B/C: alignment", ylim=(-1.05, 1.05))
    ax[2].legend(fontsize="xx-small")
    rows = res["multiplexing"]["rows"]
    ax[3].scatter([r["L"] + 1 - r["layer"] for r in rows], [r["ratio"] for r in rows], s=8, label="multiplexing")
    kk = sorted({r["L"] + 1 - r["layer"] for r in rows})
    ax[3].plot(kk, [(0.1 / 0.9) ** j for j in kk], "r-", lw=0.8, label="mixture decay, mu=0.1")
    ax[3].set(yscale="log", xlabel="L+1-i", ylabel="|h^f - h^l| / |eta^ e_L|", title="D: multiplexing vs mixture decay")
    ax[3].legend(fontsize="x-small")
    return save_figure(fig, out, NAME, dpi=80)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(
        NAME, __doc__.split("\n")[0], argv, module="experiments.dynamics.signals", sizes={"nets": (8, 32, "random networks per setting")},
        extra={"width": (int, 6, "layer width"), "batch": (int, 64, "samples per network"),
               "depths": (str, "2,3,4,5,6", "depths L (comma-separated)"), "depth": (int, 4, "depth of parts B/C"),
               "mu": (float, 0.1, "mu of parts B/C")},
    )  # fmt: skip
    depths = [int(d) for d in args.depths.split(",")]
    gen = generator(args.seed)
    with single_thread():
        res = {
            "depth": depth_decay(args.nets, args.width, args.batch, depths, gen),
            "approximate": approximate(args.nets, args.width, args.batch, args.depth, args.mu, gen),
            "multiplexing": multiplexing(args.nets, args.width, args.batch, depths, gen),
            "mu": args.mu, "depths": depths, "width": args.width, "nets": args.nets, "batch": args.batch, "seed": args.seed,
        }  # fmt: skip
    ap = res["approximate"]
    L = args.depth
    findings = {
        "A: r_fit within 10% of mu/(1-mu) for every mu": all(abs(f["r_fit"] / f["r"] - 1) < 0.1 for f in res["depth"]["fits"].values()),
        f"B: reconstruction part > target part at layer 1 for every eps>0 (L={L})": all(ap[e]["recon"][0] > ap[e]["target"][0] for e in EPS),
        "C: two-phase |e^phase| <= 1.5 mu/(1-mu) |clean signal| at every layer and eps, cos > 0.99": all(
            p <= 1.5 * args.mu / (1 - args.mu) * c for e in ap for p, c in zip(ap[e]["phase"], ap[e]["clean"]))
            and all(c > 0.99 for e in ap for c in ap[e]["cos_two"]),
        "D: multiplexing per-layer factor within [0.5, 2] (mixture: mu/(1-mu) = 0.11)": 0.5 <= res["multiplexing"]["per_layer_factor_fit"] <= 2,
    }  # fmt: skip
    res["findings"] = findings
    save_json(args.out, NAME, res)
    fig = plot(res, args.out)
    lines = ["A. depth decay with exact inverses: fitted per-layer factor r_fit vs mu/(1-mu)"]
    rows_a = [[mu, f["r"], f["r_fit"], f"{f['no_equilibrium']}/{f['networks']}"] for mu, f in res["depth"]["fits"].items()]
    for r in rows_a:
        lines.append(f"  mu={r[0]:<5} mu/(1-mu)={r[1]:.4f}  r_fit={r[2]:.4f}  networks without a converged equilibrium: {r[3]}")
    rows_b = []
    for eps, v in ap.items():
        for i in range(L):
            rows_b.append([eps, i + 1, v["recon"][i], v["target"][i], v["cos_single"][i], v["phase"][i], v["clean"][i], v["cos_two"][i]])
    hdr_b = ["eps", "layer", "‖reconstruction‖", "‖target part‖", "cos single", "‖e^phase‖", "‖clean signal‖", "cos two-phase"]
    lines.append(f"B/C. approximate inverses, L={L}, mu={args.mu} (means over samples and networks)")
    lines += ["  " + " ".join(f"{h:>16}" for h in hdr_b)] + ["  " + " ".join(f"{c:>16.4g}" for c in r) for r in rows_b]
    mp = res["multiplexing"]
    worst = max(r["first_order_rel_error"] for r in mp["rows"])
    lines.append(f"D. multiplexing: fitted per-layer factor of |h^f - h^l|/|eta^ e_L| = {mp['per_layer_factor_fit']:.3f} "
                 f"(no decay: 1; mixture at mu=0.1: 0.111); worst relative error of eq. 6.59 = {worst:.3g}")  # fmt: skip
    lines += [f"  {'OK ' if ok else 'NOT'} {t}" for t, ok in findings.items()]
    print("\n".join(lines))
    cmd = "python -m experiments.dynamics.signals" + (" --full" if args.full else "") + " --docs"
    table = "\n\n".join([
        f"Written by `{cmd}` (width {args.width}, {args.nets} networks x {args.batch} samples per setting, seed {args.seed}).",
        "**A.** Fitted per-layer factor of the exact-inverse learning signal (eq. 6.15 predicts `mu/(1-mu)`):\n\n"
        + markdown_table(["mu", "mu/(1-mu)", "r_fit", "networks without a converged equilibrium"], rows_a),
        f"**B/C.** Approximate inverses (`Q = W^-1` + relative noise `eps`), L={L}, mu={args.mu}: single-phase "
        "reconstruction part vs target part of `h^* - f(h^*)`, cosines with the clean signal of eq. 6.22, and the two-phase "
        "`e^phase` of eq. 6.36:\n\n" + markdown_table(hdr_b, rows_b),
        f"**D.** Multiplexing: fitted per-layer factor of `‖h^f - h^l‖ / ‖eta^ e_L‖` = {mp['per_layer_factor_fit']:.3f} "
        f"(no decay: 1; the mixture's at mu = 0.1: 0.111); worst mean relative error of eq. 6.59's first-order signal {worst:.3g}.",
        findings_line(findings),
        f"![signals](figures/{NAME}.png)",
    ])  # fmt: skip
    to_docs(args, NAME, fig, table)
    return res


if __name__ == "__main__":
    main()
