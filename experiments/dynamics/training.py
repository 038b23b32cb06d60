"""Training with the chapter-6 dynamics against DTP-AI (section 6.8's training predictions).

Student-teacher regression (thesis 5.2.2: batch 32, 60 batches per epoch, students at Frobenius
distance 8 from the teacher) on the 6-6-6 and the deep 6-6-6-6-6-6 network, each rule with its
config (``dtp.yaml`` and ``dynamics/*.yaml``, mu = 0.1, the layer-specific learning
rate of eq. 6.19 on for the mixture networks; the deep network with forward learning rate 1e-4 and
120 batches per epoch, as fig. 5.13's caption and the benchmark's ``deep`` table, and the dynamical
rules' feedback learning rate 1e-5: their ``Q`` rules run on the activations, whose norms are about
30 there, and diverge at the configs' 0.002), ``--seeds`` seeds (teacher, student, shuffling) and
``--epochs`` epochs (the learning rate decays to 1/5 over them). Rules:

* ``DTPAI``: DTP-AI (Alg. A.12), the reference;
* ``SP-exact``: single-phase mixture network, exact inverses (section 6.4) - section 6.8: learns;
* ``SP-learned``: single-phase, learned inverses (section 6.5) - section 6.8: fails;
* ``TwoPhase``: two-phase network, learned inverses (section 6.6) - section 6.8: learns;
* ``Multiplexing``: multiplexing network (section 6.9.2) - section 6.9.2: no depth decay, learns deep networks.

Reported: the final test MSE (mean over samples and outputs; a run whose network stops settling or
whose loss becomes non-finite counts as diverged) and, on a fixed probe batch of 64 training
samples at the start and after every epoch, the cosine of each layer's update ``G_i`` (``dW_i/dt =
-eta G_i``) with DTP-AI's update at the same weights (``Q_i = W_{i+1}^dagger``, as DTP-AI starts) and
with the Gauss-Newton update ``J_theta^+ e_L`` of all weights (``J_theta`` the Jacobian of the
outputs of the batch with respect to all weights; the thesis' Gauss-Newton of section 4.2, on
parameters). ``--mnist``: also ``dynamics/mnist_two_phase.yaml``, ``dynamics/mnist_multiplexing.yaml``
and DTP-AI on the same 784-64-64-10 network and 10k images (test accuracy; DTP-AI angle only).

Default: 2 seeds x 6 epochs (about 6 minutes); ``--full``: 5 seeds x 30 epochs.

    python -m experiments.dynamics.training [--out DIR] [--full] [--seeds N] [--epochs E] [--mnist] [--docs]
"""
from __future__ import annotations

import json
import math
import statistics
from typing import Sequence

from tplightning._lightning import pl
import torch

from tplightning import functional as F
from tplightning.rules import DTPAI

from benchmarks.common import quiet as _quiet
from benchmarks.student_teacher import run_one
from experiments.common import save_figure, save_json, single_thread, subplots
from experiments.dynamics.common import REPO, findings_line, markdown_table, parse_args, to_docs

NAME = "dyn_training"
RULES = {
    "DTPAI": "dtp.yaml",
    "SP-exact": "dynamics/single_phase_exact.yaml",
    "SP-learned": "dynamics/single_phase_learned.yaml",
    "TwoPhase": "dynamics/two_phase.yaml",
    "Multiplexing": "dynamics/multiplexing.yaml",
}
ARCHS = {"6-6-6": [6, 6, 6], "6-6-6-6-6-6": [6, 6, 6, 6, 6, 6]}
# the deep network as the benchmark's "deep" table runs it (fig. 5.13 caption): forward lr 1e-4, 120 batches per epoch
ARCH_OVERRIDES = {"6-6-6-6-6-6": ["--model.init_args.forward_optimizer.init_args.lr", "1e-4", "--data.init_args.num_train", "3840"]}
MNIST = {"DTPAI": "mnist/dtp_ai.yaml", "TwoPhase": "dynamics/mnist_two_phase.yaml", "Multiplexing": "dynamics/mnist_multiplexing.yaml"}


# ------------------------------------------------------------------------------------- updates
@torch.no_grad()
def dtp_ai_update(reference: DTPAI, weights: Sequence[torch.Tensor], x, y) -> list[torch.Tensor]:
    """DTP-AI's ``G_i`` (eq. 4.12 with the difference targets of eq. 4.101) at ``weights``, ``Q = W^dagger``."""
    reference.load_forward_weights([W.detach().to(reference.net.weights[0].dtype) for W in weights])
    hs, targets = reference.compute_targets(x, y)
    out = []
    for i, (W, act) in enumerate(zip(reference.net.weights, reference.net.activations), start=1):
        a = hs[i - 1] @ W.T
        out.append(F.local_update(act.derivative(a, hs[i]), hs[i], targets[i - 1], hs[i - 1]))
    return out


def gauss_newton_update(net, x, y, loss: str) -> list[torch.Tensor]:
    """``J_theta^+ e_L`` split into the layers' shapes: the minimum-norm Gauss-Newton step of all weights."""
    weights = [W.detach().double() for W in net.weights]
    acts = net.activations
    xd = x.double()

    def outputs(*ws):
        h = xd
        for W, s in zip(ws, acts):
            h = s(h @ W.T)
        return h.reshape(-1)

    J = torch.autograd.functional.jacobian(outputs, tuple(weights))
    J = torch.cat([j.reshape(j.shape[0], -1) for j in J], dim=1)  # (B n_L, P)
    with torch.no_grad():
        e = F.output_error(outputs(*weights).reshape(x.shape[0], -1), y.double() if y.is_floating_point() else y, loss).reshape(-1)
        step = torch.linalg.lstsq(J, e.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    out, k = [], 0
    for W in weights:
        out.append(step[k : k + W.numel()].reshape(W.shape))
        k += W.numel()
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))


def model_update(rule, x, y, reference: DTPAI) -> list[torch.Tensor]:
    if isinstance(rule, DTPAI):
        hs, targets = rule.compute_targets(x, y)
        return [F.local_update(act.derivative(hs[i - 1] @ W.T, hs[i]), hs[i], targets[i - 1], hs[i - 1])
                for i, (W, act) in enumerate(zip(rule.net.weights, rule.net.activations), start=1)]  # fmt: skip
    return rule.weight_updates(x, y)[0]


class UpdateAngles(pl.Callback):
    """Cosines of the rule's per-layer update with DTP-AI's and Gauss-Newton's on a fixed probe batch."""

    def __init__(self, probe: int = 64, gauss_newton: bool = True):
        self.probe, self.gauss_newton = probe, gauss_newton
        self.history: list[dict] = []
        self._ref = None
        self.initial_test_mse = None

    def _measure(self, trainer, rule) -> None:
        dm = trainer.datamodule
        x, y = dm.train_data.x[: self.probe], dm.train_data.y[: self.probe]
        if self._ref is None:
            hp = rule.hparams
            self._ref = DTPAI(sizes=list(rule.net.sizes), activation=hp.activation, output_activation=hp.output_activation,
                              negative_slope=hp.negative_slope, loss=hp.loss, target_stepsize=getattr(rule, "target_stepsize", 0.1))  # fmt: skip
        try:
            G = model_update(rule, x, y, self._ref)
        except Exception:  # the network no longer settles: nothing to measure
            return
        D = dtp_ai_update(self._ref, rule.net.weights, x, y)
        entry = {"epoch": trainer.current_epoch, "cos_dtp": [_cos(a, b) for a, b in zip(G, D)]}
        if self.gauss_newton:
            N = gauss_newton_update(rule.net, x, y, rule.loss)
            entry["cos_gn"] = [_cos(a.double(), b) for a, b in zip(G, N)]
        self.history.append(entry)

    def on_train_start(self, trainer, pl_module) -> None:
        if getattr(trainer.datamodule, "task", None) == "regression":
            from benchmarks.student_teacher import mse

            self.initial_test_mse = mse(pl_module, trainer.datamodule.test_data)
            pl_module.train()
        self._measure(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._measure(trainer, pl_module)


# ------------------------------------------------------------------------------------- runs
def run(rule: str, config: str, arch: str, seed: int, epochs: int, mnist: bool = False) -> dict:
    cb = f"{__name__.replace('__main__', 'experiments.dynamics.training')}.UpdateAngles"
    if mnist:
        return run_mnist(rule, config, seed, epochs, cb)
    from benchmarks.student_teacher import seed_args

    sizes = json.dumps(ARCHS[arch])
    args = seed_args(config, seed)
    callbacks = json.loads(args[args.index("--trainer.callbacks") + 1]) + [{"class_path": cb}]
    overrides = ["--trainer.max_epochs", str(epochs), "--model.init_args.sizes", sizes, "--data.init_args.sizes", sizes,
                 "--trainer.callbacks", json.dumps(callbacks), *ARCH_OVERRIDES.get(arch, [])]  # fmt: skip
    if arch in ARCH_OVERRIDES and rule != "DTPAI":  # Q rules on the activations themselves (norms ~30 here)
        overrides += ["--model.init_args.feedback_optimizer.init_args.lr", "1e-5"]
    r = run_one(config, seed, overrides, keep=True)
    out = {"rule": rule, "arch": arch, "seed": seed, "test_mse": r["test_mse"], "diverged": r["diverged"], "error": r["error"], "seconds": r["seconds"]}
    if r.get("cli") is not None:
        angles = next(c for c in r["cli"].trainer.callbacks if type(c).__name__ == "UpdateAngles")
        out["angles"] = angles.history
        out["initial_test_mse"] = angles.initial_test_mse
    return out


def run_mnist(rule: str, config: str, seed: int, epochs: int, cb: str) -> dict:
    import time

    from tplightning.cli import main as cli_main
    from tplightning.rules.base import DivergenceError

    data = str(REPO.parent / "shared" / "data")
    args = ["--config", config, "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--seed_everything", str(seed), "--trainer.max_epochs", str(epochs), "--trainer.callbacks",
            json.dumps([{"class_path": cb, "init_args": {"probe": 64, "gauss_newton": False}}]),
            "--data.init_args.data_dir", data, "--data.init_args.download", "false"]  # fmt: skip
    if config.startswith("mnist/"):  # the thesis-size DTP-AI config, shrunk to the dynamical runs' network and data
        args += ["--model.init_args.sizes", "[784, 64, 64, 10]", "--data.init_args.num_train", "10000", "--data.init_args.num_val", "2000",
                 "--data.init_args.subset", "12000", "--model.init_args.lr_final_factor", "0.2"]  # fmt: skip
    start = time.perf_counter()
    out = {"rule": rule, "arch": "MNIST 784-64-64-10", "seed": seed, "diverged": False, "error": None}
    try:
        res = cli_main(args)
    except DivergenceError as err:
        out.update(diverged=True, error=str(err)[:200], test_acc=None)
    else:
        out["test_acc"] = float(res["test_metrics"].get("test/acc", float("nan")))
        angles = next(c for c in res["cli"].trainer.callbacks if type(c).__name__ == "UpdateAngles")
        out["angles"] = angles.history
    out["seconds"] = time.perf_counter() - start
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else float("nan")


def summarize(runs: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["arch"], r["rule"]) for r in runs):
        rs = [r for r in runs if (r["arch"], r["rule"]) == key]
        ok = [r for r in rs if not r["diverged"]]
        row = {"arch": key[0], "rule": key[1], "runs": len(rs), "diverged": len(rs) - len(ok)}
        metric = "test_acc" if "MNIST" in key[0] else "test_mse"
        row[metric] = _mean([r.get(metric) for r in ok])
        if metric == "test_mse":
            row["initial_test_mse"] = _mean([r.get("initial_test_mse") for r in rs])
        for name in ("cos_dtp", "cos_gn"):
            for when, idx in (("start", 0), ("end", -1)):
                vals = [statistics.fmean(r["angles"][idx][name]) for r in ok if r.get("angles") and name in r["angles"][idx]]
                row[f"{name}_{when}"] = _mean(vals)
            first = [r["angles"][0][name][0] for r in ok if r.get("angles") and name in r["angles"][0]]
            row[f"{name}_layer1_start"] = _mean(first)
        out.append(row)
    return out


def plot(runs: list[dict], out):
    archs = list(dict.fromkeys(r["arch"] for r in runs))
    fig, ax = subplots(len(archs), 4.0, 3.2)
    for a, arch in zip(ax, archs):
        for rule in dict.fromkeys(r["rule"] for r in runs if r["arch"] == arch):
            rs = [r for r in runs if r["arch"] == arch and r["rule"] == rule and r.get("angles")]
            if not rs:
                continue
            n = min(len(r["angles"]) for r in rs)
            key = "cos_gn" if "cos_gn" in rs[0]["angles"][0] else "cos_dtp"
            color = f"C{list(RULES).index(rule)}" if rule in RULES else None
            a.plot(range(n), [statistics.fmean(statistics.fmean(r["angles"][k][key]) for r in rs) for k in range(n)], marker=".", label=rule, color=color)
        a.set(title=f"{arch}: mean cos({'GN' if 'MNIST' not in arch else 'DTP-AI'})", xlabel="epoch", ylim=(-1.05, 1.05))
        a.axhline(0, color="gray", lw=0.5)
        a.legend(fontsize="x-small")
    return save_figure(fig, out, NAME, dpi=80)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(
        NAME, __doc__.split("\n")[0], argv, module="experiments.dynamics.training", sizes={"seeds": (2, 5, "seeds per rule"), "epochs": (6, 30, "epochs")},
        extra={"rules": (str, ",".join(RULES), "comma-separated rules"), "mnist-epochs": (int, 2, "MNIST epochs (with --mnist)")},
        flags=("mnist",),
    )  # fmt: skip
    mnist = args.mnist
    rules = [r for r in args.rules.split(",") if r]
    _quiet()
    runs = []
    with single_thread():
        for arch in ARCHS:
            for rule in rules:
                for seed in range(args.seeds):
                    r = run(rule, RULES[rule], arch, seed, args.epochs)
                    runs.append(r)
                    status = r["error"] if r["diverged"] else f"test MSE {r['test_mse']:.3g}"
                    print(f"  {arch} {rule} seed {seed}: {status} ({r['seconds']:.0f}s)", flush=True)
        if mnist:
            for rule, config in MNIST.items():
                r = run(rule, config, "MNIST", 0, args.mnist_epochs, mnist=True)
                runs.append(r)
                status = r["error"] if r["diverged"] else f"test acc {r['test_acc']:.4f}"
                print(f"  MNIST {rule}: {status} ({r['seconds']:.0f}s)", flush=True)
    summary = summarize(runs)
    by = {(s["arch"], s["rule"]): s for s in summary}
    findings = {}
    def learns(s, ref):  # no divergence, final test MSE below half the initial one and within 2x of DTP-AI's
        return s["diverged"] == 0 and s["test_mse"] < 0.5 * s["initial_test_mse"] and s["test_mse"] <= 2 * ref

    for arch in ARCHS:
        ref = by.get((arch, "DTPAI"), {}).get("test_mse", float("nan"))
        crit = "no run diverges, test MSE < initial/2 and <= 2x DTP-AI's"
        for rule, text in (("SP-exact", "single phase with exact inverses learns"), ("TwoPhase", "two-phase with learned inverses learns"),
                           ("Multiplexing", "multiplexing learns")):  # fmt: skip
            if (arch, rule) in by:
                findings[f"{arch}: {text} ({crit})"] = learns(by[(arch, rule)], ref)
        if (arch, "SP-learned") in by:
            findings[f"{arch}: single phase with learned inverses fails (not: {crit})"] = not learns(by[(arch, "SP-learned")], ref)
    result = {"seeds": args.seeds, "epochs": args.epochs, "rules": rules, "summary": summary, "findings": findings, "runs": runs}
    save_json(args.out, NAME, result)
    fig = plot(runs, args.out)
    hdr = ["network", "rule", "runs", "diverged", "initial test MSE", "test MSE / acc", "cos DTP-AI start", "cos DTP-AI end", "cos GN start", "cos GN end"]
    rows = [[s["arch"], s["rule"], s["runs"], s["diverged"], s.get("initial_test_mse", "-"), s.get("test_mse", s.get("test_acc")), s["cos_dtp_start"], s["cos_dtp_end"],
             s["cos_gn_start"], s["cos_gn_end"]] for s in summary]  # fmt: skip
    print(f"{NAME}: {args.seeds} seeds x {args.epochs} epochs -> {args.out}")
    print("  " + " | ".join(hdr))
    for row in rows:
        print("  " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in row))
    for t, ok in findings.items():
        print(f"  {'OK ' if ok else 'NOT'} {t}")
    cmd = "python -m experiments.dynamics.training" + (" --full" if args.full else "") + (" --mnist" if mnist else "") + " --docs"
    table = "\n\n".join([
        f"Written by `{cmd}` ({args.seeds} seeds x {args.epochs} epochs on student-teacher"
        + (f", {args.mnist_epochs} epochs on MNIST" if mnist else "") + "). Test MSE (student-teacher) or test accuracy (MNIST), "
        "mean over the runs that did not diverge; cosines are means over layers and runs of the per-layer update's cosine with "
        "DTP-AI's update (Q = W^dagger) and with the Gauss-Newton update at the same weights, on a 64-sample probe batch, "
        "before training and after the last epoch.",
        markdown_table(hdr, rows),
        findings_line(findings),
        f"![training](figures/{NAME}.png)",
    ])  # fmt: skip
    to_docs(args, NAME, fig, table)
    return result


if __name__ == "__main__":
    main()
