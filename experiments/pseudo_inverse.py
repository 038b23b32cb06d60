"""Figs. 5.9-5.11: feedback weights ``Q`` learning ``W^{-1}`` / ``W^dagger`` by Alg. A.8 (section 5.2.1).

Two layers ``h_2 = f(h_1) = s(W h_1)`` with leaky-ReLU 0.35 and the thesis' feedback map
``g(h_2) = Q s^{-1}(h_2)`` (eq. 5.42-5.43); ``W`` stays fixed, ``Q`` takes SGD steps on the
(regularised) inverse loss as in Alg. A.8, ``Q <- (1 - eta lambda) Q - eta mean_b (g(f(h_1)) - h_1)
s^{-1}(h_2)^T`` (eq. 4.91, 4.97), with the step size decaying linearly over the iterations. The
inputs ``h_1`` are white (``N(0, I)``) or coloured, ``h_1 = C h_0`` with ``h_0`` white and ``C`` a fixed
Gaussian matrix (rank-deficient when ``h_0`` is shorter than ``h_1``). We draw ``C`` with entries
``N(0, 1/k)`` (``k`` = length of ``h_0``) so ``h_1`` has the white inputs' average variance; with
unit entries batch-1 SGD at step 0.01 diverges for some draws (``||W h_1||^2`` about 25 times larger). ``W`` and the initial ``Q`` are
Gaussian with ``sigma_min * sigma_max > 0.4``. The cases of the figure captions:

(a) equal layers 5-5, batch 1, step 0.01 -> 0.008 over 2500 iterations, lambda 0: white;
    coloured ``C`` 5x5; coloured ``C`` 5x2 (singular covariance).
(b) contracting 5-3, step 0.01 -> 0.0001 over 2000 iterations, lambda 0: coloured ``C`` 5x5
    (batch 1); white, batch 1; white, batch 16.
(c) expanding 3-5, batch 1, step 0.01 -> 0.008 over 2000 iterations: white lambda 0; white
    lambda 0.2; coloured ``C`` 3x5 (the caption's "5x5" cannot map to 3 units), lambda 0.2.
(d) fig. 5.11, the original form ``f(h) = tanh(W h)``, ``g(h) = tanh(Q h)`` (eq. 5.46-5.47, Alg. A.9):
    contracting 5-3, equal 5-5, expanding 3-5, white inputs, batch 8, step 0.002 -> 0.0001 over
    2000 iterations, lambda 0.

Curves (median over ``--reps`` independent draws of ``W``, ``Q`` and ``C``): the infinity norm
``||Q - W^dagger||_inf`` (fig. 5.9), the RMS reconstruction error ``sqrt(E ||g(f(h_1)) - h_1||^2)``
(fig. 5.10, 5.11; exact ``||(Q W - I) C||_F`` for the thesis form, 1000 fixed samples for the
original form), and the distance to the limit that theorems 4.6/4.7 predict,
``Q_inf = Gamma W^T (W Gamma W^T + lambda I)^{-1}`` with ``Gamma = E[h_1 h_1^T]`` (``W^dagger`` for
white noise and lambda 0, ``W^T (W W^T + lambda/sigma^2 I)^{-1}`` for white noise, theorem 4.7),
where that limit is unique.

    python -m experiments.pseudo_inverse [--out DIR] [--reps N] [--seed S]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from tplightning import functional as F
from tplightning.functional import LeakyReLU, Tanh

from experiments.common import DTYPE, generator, parse_args, robust_gaussian, save_figure, save_json, single_thread

NAME = "pseudo_inverse"


@dataclass(frozen=True)
class Case:
    panel: str
    label: str
    n1: int
    n2: int
    noise_dim: int | None = None  # None: white h_1; else h_1 = C h_0 with h_0 of this dimension
    batch: int = 1
    lam: float = 0.0
    lr: tuple[float, float] = (0.01, 0.008)
    iterations: int = 2000
    form: str = "thesis"


CASES = [
    Case("a", "white", 5, 5, lr=(0.01, 0.008), iterations=2500),
    Case("a", "coloured C 5x5", 5, 5, 5, lr=(0.01, 0.008), iterations=2500),
    Case("a", "coloured C 5x2", 5, 5, 2, lr=(0.01, 0.008), iterations=2500),
    Case("b", "coloured C 5x5", 5, 3, 5, lr=(0.01, 0.0001)),
    Case("b", "white, batch 1", 5, 3, lr=(0.01, 0.0001)),
    Case("b", "white, batch 16", 5, 3, batch=16, lr=(0.01, 0.0001)),
    Case("c", "white, lambda 0", 3, 5),
    Case("c", "white, lambda 0.2", 3, 5, lam=0.2),
    Case("c", "coloured C 3x5, lambda 0.2", 3, 5, 5, lam=0.2),
    Case("d", "original, contracting 5-3", 5, 3, batch=8, lr=(0.002, 0.0001), form="original"),
    Case("d", "original, equal 5-5", 5, 5, batch=8, lr=(0.002, 0.0001), form="original"),
    Case("d", "original, expanding 3-5", 3, 5, batch=8, lr=(0.002, 0.0001), form="original"),
]
PANELS = {
    "a": "(a) equal 5-5", "b": "(b) contracting 5-3", "c": "(c) expanding 3-5", "d": "(d) original form (fig. 5.11)",
}  # fmt: skip
LEAKY, TANH = LeakyReLU(0.35), Tanh()


def inverse_loss_grad(Q: Tensor, W: Tensor, h: Tensor, form: str = "thesis") -> Tensor:
    """Batch-mean gradient of ``1/2 ||g(f(h_1)) - h_1||^2`` w.r.t. ``Q`` for batched ``Q (..., n1, n2)``,
    ``W (..., n2, n1)``, ``h (..., B, n1)``: the library's feedback gradients, batched over draws.

    ``thesis``: ``f = leaky-ReLU(W h)``, ``g = Q s^{-1}(h_2)``, Alg. A.8
    (:func:`tplightning.functional.inverse_loss_grad` at ``s^{-1}(h_2) = W h``); ``original``:
    ``f = tanh(W h)``, ``g = tanh(Q h_2)`` (eq. 5.46-5.47, Alg. A.9,
    :func:`tplightning.functional.original_inverse_loss_grad`).
    """
    if form == "thesis":
        return F.inverse_loss_grad(Q, LEAKY.inverse(LEAKY(h @ W.transpose(-1, -2))), h)
    return F.original_inverse_loss_grad(Q, TANH(h @ W.transpose(-1, -2)), h, TANH)


def predicted_limit(W: Tensor, Gamma: Tensor, lam: float) -> Tensor | None:
    """``Gamma W^T (W Gamma W^T + lambda I)^{-1}``, the unique minimiser of the expected loss, or
    ``None`` where it is not unique (``lambda = 0`` and ``W Gamma W^T`` singular)."""
    M = W @ Gamma @ W.transpose(-1, -2) + lam * torch.eye(W.shape[-2], dtype=W.dtype)
    if lam == 0 and bool((torch.linalg.svdvals(M)[..., -1] < 1e-10 * torch.linalg.svdvals(M)[..., 0]).any()):
        return None
    return Gamma @ W.transpose(-1, -2) @ torch.linalg.inv(M)


def run_case(case: Case, reps: int, gen: torch.Generator, record_every: int = 50) -> dict:
    """Train ``reps`` independent ``Q`` (batched) and record the curves every ``record_every`` iterations."""
    W = robust_gaussian(reps, case.n2, case.n1, 0.4, gen)
    Q = robust_gaussian(reps, case.n1, case.n2, 0.4, gen)
    if case.noise_dim is None:
        C = torch.eye(case.n1, dtype=DTYPE).expand(reps, -1, -1)
    else:
        C = torch.randn(reps, case.n1, case.noise_dim, generator=gen, dtype=DTYPE) / case.noise_dim**0.5
    k = C.shape[-1]
    Gamma = C @ C.transpose(-1, -2)
    W_pinv = torch.linalg.pinv(W)
    limit = predicted_limit(W, Gamma, case.lam) if case.form == "thesis" else None
    eye = torch.eye(case.n1, dtype=DTYPE)
    h_eval = torch.randn(reps, 1000, k, generator=gen, dtype=DTYPE) @ C.transpose(-1, -2)

    def metrics() -> dict[str, Tensor]:
        out = {"pinv_error": torch.linalg.matrix_norm(Q - W_pinv, ord=float("inf"))}
        if case.form == "thesis":  # s^-1(s(W h)) = W h: the error is (Q W - I) h
            out["reconstruction"] = torch.linalg.matrix_norm((Q @ W - eye) @ C)
        else:
            rec = TANH(TANH(h_eval @ W.transpose(-1, -2)) @ Q.transpose(-1, -2)) - h_eval
            out["reconstruction"] = (rec**2).sum(-1).mean(-1).sqrt()
        if limit is not None:
            out["limit_error"] = torch.linalg.matrix_norm(Q - limit, ord=float("inf"))
        return out

    curves: dict[str, list] = {"iteration": []}
    T = case.iterations
    for t in range(T + 1):
        if t % record_every == 0 or t == T:
            curves["iteration"].append(t)
            for key, v in metrics().items():
                curves.setdefault(key, []).append(v)
        if t == T:
            break
        lr = case.lr[0] + (case.lr[1] - case.lr[0]) * t / max(T - 1, 1)
        h = torch.randn(reps, case.batch, k, generator=gen, dtype=DTYPE) @ C.transpose(-1, -2)  # (R, B, n1)
        Q = (1 - lr * case.lam) * Q - lr * inverse_loss_grad(Q, W, h, case.form)
    out = {"case": case.__dict__, "reps": reps, "iteration": curves.pop("iteration")}
    for key, values in curves.items():
        stacked = torch.stack(values)  # (points, reps)
        out[key] = {
            "median": _round(stacked.median(1).values),
            "q25": _round(stacked.quantile(0.25, dim=1)),
            "q75": _round(stacked.quantile(0.75, dim=1)),
            "final_median": float(stacked[-1].median()),
        }
    return out


def _round(t: Tensor) -> list[float]:
    return [float(f"{v:.4g}") for v in t.tolist()]


def plot(results: list[dict], out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(13, 5.8))
    for col, (panel, title) in enumerate(PANELS.items()):
        rows = [r for r in results if r["case"]["panel"] == panel]
        for row, key in enumerate(["pinv_error" if panel != "d" else "limit_error", "reconstruction"]):
            ax = axes[row][col]
            for r in rows:
                if key not in r:
                    continue
                ax.semilogy(r["iteration"], r[key]["median"], label=r["case"]["label"])
                ax.fill_between(r["iteration"], r[key]["q25"], r[key]["q75"], alpha=0.2)
            ylabel = {
                "pinv_error": r"$\|Q - W^\dagger\|_\infty$",
                "limit_error": r"$\|Q - Q_\infty\|_\infty$ (thesis form)",
                "reconstruction": r"RMS $\|g(f(h_1)) - h_1\|$",
            }[key]
            ax.set(title=title if row == 0 else None, xlabel="iteration", ylabel=ylabel)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="x-small")
    ax = axes[0][3]  # the theorems' limits for the thesis-form cases
    ax.cla()
    for r in results:
        if "limit_error" in r:
            ax.semilogy(r["iteration"], r["limit_error"]["median"], lw=0.9, label=f"({r['case']['panel']}) {r['case']['label']}")
    ax.set(title="to the predicted limit (thm 4.6/4.7)", xlabel="iteration", ylabel=r"$\|Q - Q_\infty\|_\infty$")
    ax.legend(fontsize="xx-small")
    save_figure(fig, out, NAME, dpi=70)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(
        NAME, __doc__.split("\n")[0], argv,
        sizes={"reps": (10, 50, "independent draws of W, Q, C per case (curves are medians)")},
        extra={"iterations": (int, 0, "override every case's iterations (0: the thesis')")},
    )  # fmt: skip
    gen = generator(args.seed)
    with single_thread():
        results = []
        for case in CASES:
            if args.iterations:
                case = Case(**{**case.__dict__, "iterations": args.iterations})
            results.append(run_case(case, args.reps, gen))
    summary = {
        f"({r['case']['panel']}) {r['case']['label']}": {
            k: r[k]["final_median"] for k in ("pinv_error", "reconstruction", "limit_error") if k in r
        }
        for r in results
    }
    save_json(args.out, NAME, {"reps": args.reps, "final_medians": summary, "runs": results})
    plot(results, args.out)
    print(f"{NAME}: {args.reps} draws per case, final medians -> {args.out}")
    for label, s in summary.items():
        parts = ", ".join(f"{k} {v:.3g}" for k, v in s.items())
        print(f"  {label:<38} {parts}")
    return {"final_medians": summary, "runs": results}


if __name__ == "__main__":
    main()
