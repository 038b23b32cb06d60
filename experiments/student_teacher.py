"""Figs. 5.7/5.8 and 5.13-5.19: student-teacher training curves and the learning-signal diagnostics.

Each run is the benchmark's run (:func:`benchmarks.student_teacher.run_one`: the
rule's config in ``configs/``, one seed setting the teacher, its data, the student's perturbation
at Frobenius distance 8, the shuffling, the layer draws and the feedback noise) with two extra
callbacks: :class:`EpochCurves` scores the weights on the whole training and test sets before
training and after every epoch (MSE over samples and outputs), and
:class:`tplightning.diagnostics.TargetPropDiagnostics` records, every ``--diag-every`` batches on
the whole batch, the cosines between the hidden layer's learning signal ``h^_1 - h_1`` and
``e^TP_1``, ``e^GN_1``, ``e^BP_1`` and the norm of ``e^approx_1`` (eqs. 5.57-5.61). Curves are
means over seeds; the diagnostics are averaged per epoch.

Default: the rules DTPAI, RTPAI, OriginalDTP and OriginalTP of figs. 5.14-5.17 on the 6-6-6
network (their committed configs: batch 32, 60 batches per epoch, the captions' learning rates),
3 seeds and 8 epochs (the learning rate decays to 1/5 over the epochs run), one to two minutes.
The thesis grid-searched the feedback learning rates but does not give them; the configs use
0.01, at which ``Q_1`` lags far behind ``W_2^dagger`` while the forward weights move fast (mean cos
to ``e^GN`` about 0.25 for DTP-AI). The thesis-form rules (``g = Q s^{-1}``: TP-AI, DTP-AI and their
randomized variants) therefore run here with feedback learning rate 0.05 and 4 Alg. A.8 steps per
batch (``--feedback-lr``, ``--feedback-iterations``; the remedy section 5.2.2 itself proposes);
``--feedback-lr 0 --feedback-iterations 1`` runs the configs as they are.
``--full``: 15 seeds and 60 epochs as in the thesis. ``--rules`` takes any of
:data:`CONFIGS`, comma-separated (e.g. ``--rules RTPAI,RDTPAI,OriginalRTP,OriginalRDTP`` for exactly
the randomized set of figs. 5.16/5.17, ``--rules TPEI,RTPEI,RMTPEI --batch-size 1 --num-train 2000``
for figs. 5.7/5.8), ``--sizes 6,6,4`` the contracting network of figs. 5.18/5.19 (the learning rates
stay the configs'; the benchmark's ``contracting`` table has the fig. 5.18 ones).

The thesis' findings checked here (figs. 5.16/5.17): original TP's signal is misaligned with
``e^TP`` (large ``e^approx``, its reconstruction errors) and with ``e^BP`` (about 90 degrees or
more), while DTP-AI's signal is aligned with ``e^TP`` and ``e^GN``. Beyond the thesis, Meulemans et al. (2020) claim
that the difference reconstruction loss aligns DTP's signal better with ``e^GN``: ``--rules DTPAI,OriginalDTP,DRL,DDTPLinear``
reports it (DRL and DDTP-linear against DTP-AI and original DTP, whose map DRL shares).

    python -m experiments.student_teacher [--out DIR] [--full] [--seeds N] [--epochs E] [--rules R,R,...]
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import warnings
from collections import defaultdict
from typing import Sequence

from tplightning._lightning import pl

from benchmarks.student_teacher import AI_CONFIGS, SUCCESSOR_CONFIGS, mse, run_one, seed_args
from experiments.common import findings_line, markdown_table, parse_docs_args, save_figure, save_json, single_thread, to_docs

NAME = "student_teacher"
CONFIGS = {**AI_CONFIGS, **SUCCESSOR_CONFIGS, "TPEI": "tp_ei.yaml", "RTPEI": "rtp_ei.yaml", "RMTPEI": "rmtp_ei.yaml", "LeeDTP": "lee_dtp.yaml"}
DEFAULT_RULES = ["DTPAI", "RTPAI", "OriginalDTP", "OriginalTP"]
DIAG_KEYS = ["cos_tp", "cos_gn", "cos_bp", "norm_approx", "norm_signal", "q_pinv_error"]
THESIS_FORM = {"TPAI", "RTPAI", "DTPAI", "RDTPAI"}  # g_i = Q_i s^{-1}, Q_i trained towards W_{i+1}^dagger (Alg. A.8)


class EpochCurves(pl.Callback):
    """Train and test MSE of the current weights before training and after every epoch.

    Scores the whole ``train_data`` and ``test_data`` of the data module like the benchmark's
    :func:`~benchmarks.student_teacher.mse`; reads only, and puts the module back in
    training mode.
    """

    def __init__(self):
        self.train_mse: list[float] = []
        self.test_mse: list[float] = []

    def _score(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        dm.setup("fit")
        self.train_mse.append(mse(pl_module, dm.train_data))
        self.test_mse.append(mse(pl_module, dm.test_data))
        pl_module.train()

    def on_train_start(self, trainer, pl_module) -> None:
        self._score(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._score(trainer, pl_module)


def run_rule(rule: str, seed: int, epochs: int, diag_every: int, extra: Sequence[str] = ()) -> dict:
    """One run of ``rule`` with seed ``seed``: per-epoch MSEs and per-epoch mean diagnostics of layer 1.

    ``extra``: more ``train.py`` overrides (before the callbacks, which this function sets).
    """
    config = CONFIGS[rule]
    args = seed_args(config, seed)
    callbacks = json.loads(args[args.index("--trainer.callbacks") + 1])  # the seeded InitNearTeacher
    callbacks += [
        {"class_path": "tplightning.diagnostics.TargetPropDiagnostics",
         "init_args": {"every_n_steps": diag_every, "max_samples": 1024, "layers": [1]}},
        {"class_path": f"{__name__.replace('__main__', 'experiments.student_teacher')}.EpochCurves"},
    ]  # fmt: skip
    overrides = ["--trainer.max_epochs", str(epochs), *extra, "--trainer.callbacks", json.dumps(callbacks)]
    result = run_one(config, seed, overrides, keep=True)
    out = {"rule": rule, "seed": seed, "diverged": result["diverged"], "error": result["error"], "seconds": result["seconds"]}
    cli = result.get("cli")
    if cli is None:
        return out
    found = {type(c).__name__: c for c in cli.trainer.callbacks}
    curves, diag = found["EpochCurves"], found["TargetPropDiagnostics"]
    out.update(train_mse=curves.train_mse, test_mse=curves.test_mse)
    per_epoch = defaultdict(lambda: defaultdict(list))
    for entry in diag.history:
        for key in DIAG_KEYS:
            if f"diag/{key}_1" in entry:
                per_epoch[key][entry["epoch"]].append(entry[f"diag/{key}_1"])
    out["diagnostics"] = {
        key: [statistics.fmean(v[e]) if v.get(e) else float("nan") for e in range(epochs)] for key, v in per_epoch.items()
    }
    out["diagnostics_mean"] = {key: statistics.fmean(x for e in v.values() for x in e) for key, v in per_epoch.items()}
    return out


def _mean(rows: list[list[float]]) -> list[float]:
    cols = list(zip(*rows))
    return [statistics.fmean(c) if all(math.isfinite(x) for x in c) else float("nan") for c in cols]


def aggregate(runs: list[dict]) -> dict:
    """Means over seeds per rule (diverged runs left out) and the overall mean cosines."""
    out = {}
    for rule in dict.fromkeys(r["rule"] for r in runs):
        ok = [r for r in runs if r["rule"] == rule and not r["diverged"] and "train_mse" in r]
        entry = {"runs": len([r for r in runs if r["rule"] == rule]), "diverged": sum(r["diverged"] for r in runs if r["rule"] == rule)}
        if ok:
            entry["train_mse"] = _mean([r["train_mse"] for r in ok])
            entry["test_mse"] = _mean([r["test_mse"] for r in ok])
            entry["final_test_mse"] = [r["test_mse"][-1] for r in ok]
            keys = set.intersection(*(set(r["diagnostics"]) for r in ok))
            entry["diagnostics"] = {k: _mean([r["diagnostics"][k] for r in ok]) for k in sorted(keys)}
            entry["diagnostics_mean"] = {k: statistics.fmean(r["diagnostics_mean"][k] for r in ok) for k in sorted(keys)}
            entry["diagnostics_last"] = {k: [r["diagnostics"][k][-1] for r in ok] for k in sorted(keys)}  # per seed
        out[rule] = entry
    return out


def plot(summary: dict, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(15, 6.2))
    panels = [
        ("train_mse", "train MSE", True), ("test_mse", "test MSE", True), ("norm_approx", r"$\|e^{approx}_1\|$", True),
        ("q_pinv_error", r"$\|Q_1 - W_2^\dagger\|_F$ (thesis form)", True),
        ("cos_tp", r"cos($\hat h_1 - h_1$, $e^{TP}_1$)", False), ("cos_gn", r"cos($\hat h_1 - h_1$, $e^{GN}_1$)", False),
        ("cos_bp", r"cos($\hat h_1 - h_1$, $e^{BP}_1$)", False), ("norm_signal", r"$\|\hat h_1 - h_1\|$", True),
    ]  # fmt: skip
    for ax, (key, title, log) in zip([a for row in axes for a in row], panels):
        for rule, s in summary.items():
            values = s.get(key) if key.endswith("mse") else s.get("diagnostics", {}).get(key)
            if not values:
                continue
            start = 0 if key.endswith("mse") else 1  # MSE from epoch 0 (before training), diagnostics per epoch
            ax.plot(range(start, start + len(values)), values, marker=".", ms=4, label=rule)
        ax.set(title=title, xlabel="epoch", yscale="log" if log else "linear")
        if not log:
            ax.axhline(0, color="gray", lw=0.5)
            ax.set_ylim(-1.05, 1.05)
    axes[0][0].legend(fontsize="small")
    return save_figure(fig, out, NAME, dpi=75)


def docs_block(summary: dict, findings: dict[str, bool], argv: Sequence[str] | None) -> str:
    """The table and findings of a run, with the command that made them, for docs/experiments.md (``--docs``)."""
    import shlex
    import sys

    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--docs"]
    rows = []
    for rule, s in summary.items():
        if "diagnostics_mean" not in s:
            rows.append([f"{rule} (all {s['runs']} runs diverged)", "–", "–", "–", "–", "–", "–"])
            continue
        m = s["diagnostics_mean"]
        rows.append([rule, statistics.fmean(s["final_test_mse"]), f"{m['cos_tp']:.3f}", f"{m['cos_gn']:.2f}", f"{m['cos_bp']:.2f}",
                     m.get("norm_approx", "–"), ", ".join(f"{c:.2f}" for c in s["diagnostics_last"]["cos_gn"])])  # fmt: skip
    table = markdown_table(["rule", "final test MSE", "cos(Δ, e^TP)", "cos(Δ, e^GN)", "cos(Δ, e^BP)", "‖e^approx‖",
                            "cos(Δ, e^GN), last epoch, per seed"], rows)  # fmt: skip
    command = shlex.join(["python", "-m", f"experiments.{NAME}", *args, "--docs"])
    return f"Command: `{command}` (cosines: means over training and seeds, layer 1).\n\n{table}\n\n{findings_line(findings)}"


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_docs_args(
        NAME, __doc__.split("\n")[0], argv,
        sizes={"seeds": (3, 15, "seeds 0..N-1 per rule"), "epochs": (8, 60, "training epochs")},
        extra={
            "diag-every": (int, 10, "batches between two diagnostics"),
            "num-train": (int, 0, "training samples (0: the config's 1920 = 60 batches of 32)"),
            "batch-size": (int, 0, "training batch size (0: the config's)"),
            "rules": (str, ",".join(DEFAULT_RULES), f"comma-separated rules, of {','.join(CONFIGS)}"),
            "feedback-lr": (float, 0.05, "feedback learning rate of the thesis-form rules (0: the configs' 0.01)"),
            "feedback-iterations": (int, 4, "Alg. A.8 steps per batch for the thesis-form rules"),
            "feedback-weight-decay": (float, 0.0, "lambda of eq. 4.97 for the thesis-form rules (the configs' 0)"),
            "sizes": (str, "", "layer sizes, comma-separated, e.g. 6,6,4 (default: the configs' 6,6,6)"),
        },
    )  # fmt: skip
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in rules if r not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown rules {unknown}; choose from {list(CONFIGS)}")
    extra: list[str] = []
    if args.num_train:
        extra += ["--data.init_args.num_train", str(args.num_train)]
    if args.batch_size:
        extra += ["--data.init_args.batch_size", str(args.batch_size)]
    if args.sizes:
        sizes = json.dumps([int(n) for n in args.sizes.split(",")])
        extra += ["--model.init_args.sizes", sizes, "--data.init_args.sizes", sizes]
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    runs = []
    with single_thread():
        for rule in rules:
            for seed in range(args.seeds):
                fb = []
                if rule in THESIS_FORM and args.feedback_lr:
                    fb = ["--model.init_args.feedback_optimizer.init_args.lr", str(args.feedback_lr)]
                if rule in THESIS_FORM:
                    fb += ["--model.init_args.feedback_iterations", str(args.feedback_iterations)]
                    if args.feedback_weight_decay:
                        fb += ["--model.init_args.feedback_weight_decay", str(args.feedback_weight_decay)]
                r = run_rule(rule, seed, args.epochs, args.diag_every, extra + fb)
                runs.append(r)
                status = r["error"] if r["diverged"] else f"test MSE {r['test_mse'][-1]:.3g}"
                print(f"  {rule} seed {seed}: {status} ({r['seconds']:.0f}s)", flush=True)
    summary = aggregate(runs)
    findings = {}
    means = {r: s["diagnostics_mean"] for r, s in summary.items() if "diagnostics_mean" in s}
    if "OriginalTP" in means:
        o = means["OriginalTP"]
        findings["OriginalTP misaligned with e^TP (mean cos < 0.5; fig. 5.16b)"] = o["cos_tp"] < 0.5
        findings["OriginalTP nearly orthogonal to e^BP (|mean cos| < 0.2; fig. 5.17b: below 0)"] = abs(o["cos_bp"]) < 0.2
    if "DTPAI" in means:
        d = means["DTPAI"]
        findings["DTPAI aligned with e^TP (mean cos > 0.99; fig. 5.16b)"] = d["cos_tp"] > 0.99
        findings["DTPAI aligned with e^GN (mean cos > 0.5; fig. 5.17a)"] = d["cos_gn"] > 0.5
        last = summary["DTPAI"]["diagnostics_last"]["cos_gn"]
        findings["DTPAI aligned with e^GN once Q catches up: last-epoch cos > 0.9 in most seeds (thesis 5.2.2)"] = (
            sum(c > 0.9 for c in last) > len(last) / 2
        )
        for other in ("OriginalDTP", "OriginalTP"):
            if other in means:
                findings[f"DTPAI closer to e^GN than {other} (fig. 5.17a)"] = d["cos_gn"] > means[other]["cos_gn"]
    for new in ("DRL", "DDTPLinear"):  # Meulemans et al. 2020's claim: the DRL brings DTP's signal closer to Gauss-Newton's
        for dtp in ("DTPAI", "OriginalDTP"):
            if new in means and dtp in means:
                findings[f"{new} closer to e^GN than {dtp} (Meulemans et al. 2020)"] = means[new]["cos_gn"] > means[dtp]["cos_gn"]
    result = {
        "rules": rules, "seeds": args.seeds, "epochs": args.epochs, "extra_overrides": extra,
        "thesis_form_feedback": {"lr": args.feedback_lr or "config", "iterations": args.feedback_iterations, "weight_decay": args.feedback_weight_decay},
        "summary": summary, "findings": findings, "runs": runs,
    }  # fmt: skip
    save_json(args.out, NAME, result)
    figure = plot(summary, args.out)
    if args.docs:
        to_docs(args, NAME, figure, docs_block(summary, findings, argv))
    print(f"{NAME}: {len(rules)} rules x {args.seeds} seeds x {args.epochs} epochs -> {args.out}")
    print(f"  {'rule':<12} {'test MSE':>9} {'cos e^TP':>9} {'cos e^GN':>9} {'cos e^BP':>9} {'|e^approx|':>10}  (means over training)"
          "  cos e^GN in the last epoch, per seed")  # fmt: skip
    for rule, s in summary.items():
        if "diagnostics_mean" not in s:
            print(f"  {rule:<12} all {s['runs']} runs diverged")
            continue
        m = s["diagnostics_mean"]
        print(f"  {rule:<12} {statistics.fmean(s['final_test_mse']):>9.3g} {m['cos_tp']:>9.3f} {m['cos_gn']:>9.3f} "
              f"{m['cos_bp']:>9.3f} {m['norm_approx']:>10.3g}  {' '.join(f'{c:.2f}' for c in s['diagnostics_last']['cos_gn'])}")  # fmt: skip
    for text, ok in findings.items():
        print(f"  {'OK ' if ok else 'NOT'} {text}")
    return result


if __name__ == "__main__":
    main()
