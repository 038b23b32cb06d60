"""Local adaptive steps and damping: does target propagation then converge like Gauss-Newton? (thesis 4.2.3, 5.1.3, 7)

The thesis finds that TP-EI, RTP-EI and the learned-inverse rules converge no faster than BP on its student-teacher
problems (figs. 5.7, 5.13-5.15) and blames the fixed, decaying step sizes (section 5.1.3): Gauss-Newton steps to the
minimum of its parabola, TP does not, and the modified rule RMTP-EI "will only have a chance of good performance when
adaptive step sizes are used". This experiment runs each rule with and without the local adaptive pieces of
:mod:`tplightning.adaptive` (``adaptive=Adaptive(LayerDamping(), LayerStep(fraction), OutputStep())``) against BP with
SGD, BP with Adam and the global Gauss-Newton / Levenberg-Marquardt reference
(:class:`~tplightning.rules.gauss_newton.GaussNewton`), on three student-teacher tables:

* ``exact``: 6-6-6, batch 1, TP-EI, RTP-EI, RMTP-EI (fig. 5.7; its learning rates, 2000 samples), and TP-EI and
  RMTP-EI with the layer step alone (``+layer-step``, the ablation);
* ``deep``: 6-6-6-6-6-6, batch 32, TP-AI and DTP-AI (fig. 5.13; TP-AI's 1e-4 for both, BP 5e-6; 3840 samples);
* ``contracting``: 6-6-4, batch 32, TP-AI and DTP-AI (fig. 5.18's learning rates);
* ``mnist`` (hypothesis (c), run only when named): the 784-256x5-10 network of ``mnist/dtp_ai.yaml`` and
  ``mnist/lee_dtp.yaml`` (20 epochs by default), each as shipped (tuned AdamW), with plain SGD at the learning rate(s)
  ``--mnist-lr`` (weight decay 0, the config's schedule) and with the same SGD plus the pieces that apply to the rule
  on cross-entropy (:data:`MNIST_PIECES`: DTP-AI ``LayerDamping`` + ``LayerStep``; LeeDTP ``LayerStep``, its
  original-form maps take no damping; the output step needs the L2 loss). Each run is :func:`benchmarks.mnist.run_one`
  (the test error of the best-validation checkpoint, the validation accuracy of every epoch, :class:`ValTimer`'s
  training seconds at every validation); records ``<out>/adaptive_steps_mnist_runs.jsonl`` (the MNIST benchmark's
  record kind and run key), summary ``adaptive_steps_mnist.json``, figure ``adaptive_steps_mnist.png`` (validation
  accuracy against training seconds and against epochs, mean and band of +- one sd over seeds); the time and epochs to
  90, 95, 97 and 98 % validation accuracy are medians over seeds with a seed that never gets there counted as never
  (:func:`benchmarks.mnist.censored_median`).

Each run is :func:`benchmarks.student_teacher.run_one` (one seed sets the teacher, its data, the student's perturbation,
the shuffling, the draws and the noise) with a callback that scores the whole training and test sets before training
and after every epoch and keeps the training wall time. Every finished run is appended to the record file
``<out>/adaptive_steps_runs.jsonl`` (checksummed lines); a run already recorded with the same settings is not run
again, so an interrupted invocation resumes. The summary (``<out>/adaptive_steps.json``) and the figures
(``<out>/adaptive_steps_<table>.png``: training MSE against epochs and against wall time, means over seeds) are made
from the records. "Epochs to BP": the first epoch at which a variant's mean training MSE is at or below BP-SGD's final
mean training MSE.

    python -m experiments.adaptive_steps [--out DIR] [--tables exact,deep,contracting] [--seeds N] [--epochs E]
        [--num-train N] [--num-val N] [--variants V,V,...] [--fraction F] [--mnist-lr LR,LR,...] [--docs]

``--docs`` also copies the figures to docs/figures/ and writes the tables and verdicts between the markers
``<!-- adaptive_steps:start/end -->`` of docs/experiments.md, from every student-teacher table's latest records in
``--out``; with ``--tables mnist``, the MNIST table (the runs the invocation asked for) between
``<!-- adaptive_steps_mnist:start/end -->``.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import time
from pathlib import Path
from typing import Sequence

from tplightning._lightning import pl

from benchmarks import common
from benchmarks import mnist as mnist_bench
from benchmarks.student_teacher import mse, run_one, seed_args
from experiments.common import REPO, save_figure, save_json, single_thread, subplots

NAME = "adaptive_steps"
RECORDS = "adaptive_steps_runs.jsonl"
LR = "--model.init_args.forward_optimizer"
ADAM = json.dumps({"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}})
BASELINES = ("BP-SGD", "BP-Adam", "GN-LM")
#: the MNIST table (hypothesis (c)); not one of :data:`TABLES` (its runs are the MNIST benchmark's)
MNIST = "mnist"
MNIST_RECORDS = "adaptive_steps_mnist_runs.jsonl"
MNIST_EPOCHS = 20
#: rule -> (config, the adaptive pieces that apply to it on cross-entropy with plain SGD)
MNIST_PIECES = {"DTPAI": ("mnist/dtp_ai.yaml", ("LayerDamping", "LayerStep")), "LeeDTP": ("mnist/lee_dtp.yaml", ("LayerStep",))}
#: validation accuracies whose time and epochs the MNIST table reports
MNIST_THRESHOLDS = (0.9, 0.95, 0.97, 0.98)


def adaptive(fraction: float, mode: str = "all") -> str:
    """The ``--model.init_args.adaptive`` value: all three local pieces (``all``) or the layer step alone
    (``layer-step``)."""
    piece = lambda name, **kw: {"class_path": f"tplightning.adaptive.{name}", "init_args": kw}  # noqa: E731
    step = piece("LayerStep", fraction=fraction)
    if mode == "layer-step":
        return json.dumps(piece("Adaptive", layer_step=step))
    return json.dumps(piece("Adaptive", damping=piece("LayerDamping"), layer_step=step, output_step=piece("OutputStep")))


def _sgd(lr: float) -> list[str]:
    return [LR, json.dumps({"class_path": "torch.optim.SGD", "init_args": {"lr": lr}})]


def _sizes(sizes: list[int]) -> list[str]:
    return ["--model.init_args.sizes", json.dumps(sizes), "--data.init_args.sizes", json.dumps(sizes)]


#: table -> (shared overrides, default samples, {variant: (config, overrides, adaptive?)})
TABLES = {
    "exact": (["--data.init_args.batch_size", "1"], 2000, {
        "TP-EI": ("tp_ei.yaml", [], False), "RTP-EI": ("rtp_ei.yaml", [], False), "RMTP-EI": ("rmtp_ei.yaml", [], False),
        "BP-SGD": ("bp.yaml", _sgd(0.001), False), "BP-Adam": ("bp.yaml", [LR, ADAM], False),
        "GN-LM": ("gauss_newton.yaml", [], False),
    }),
    "deep": (_sizes([6] * 6), 3840, {
        "TP-AI": ("tp_ai.yaml", _sgd(1e-4), False), "DTP-AI": ("dtp.yaml", _sgd(1e-4), False),
        "BP-SGD": ("bp.yaml", _sgd(5e-6), False), "BP-Adam": ("bp.yaml", [LR, ADAM], False),
        "GN-LM": ("gauss_newton.yaml", [], False),
    }),
    "contracting": (_sizes([6, 6, 4]), 1920, {
        "TP-AI": ("tp_ai.yaml", _sgd(0.09), False), "DTP-AI": ("dtp.yaml", _sgd(0.1), False),
        "BP-SGD": ("bp.yaml", _sgd(0.05), False), "BP-Adam": ("bp.yaml", [LR, ADAM], False),
        "GN-LM": ("gauss_newton.yaml", [], False),
    }),
}  # fmt: skip


#: the ablation: the layer step alone, for these rules of the exact table
LAYER_STEP_ONLY = ("TP-EI", "RMTP-EI")


def variants(table: str) -> dict[str, tuple[str, list[str], str | None]]:
    """The table's variants ``{name: (config, overrides, adaptive mode)}``: every TP rule also as ``<rule>+adaptive``
    (all pieces), and in the exact table TP-EI and RMTP-EI also as ``<rule>+layer-step`` (the layer step alone)."""
    out = {}
    for name, (config, overrides, _) in TABLES[table][2].items():
        out[name] = (config, overrides, None)
        if name not in BASELINES:
            out[f"{name}+adaptive"] = (config, overrides, "all")
            if table == "exact" and name in LAYER_STEP_ONLY:
                out[f"{name}+layer-step"] = (config, overrides, "layer-step")
    return out


class TimedCurves(pl.Callback):
    """Train/test MSE of the whole sets before training and after every epoch, and the training wall time so far
    (scoring excluded)."""

    def __init__(self):
        self.train_mse: list[float] = []
        self.test_mse: list[float] = []
        self.seconds: list[float] = []
        self._spent, self._start = 0.0, None

    def _score(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        dm.setup("fit")
        self.train_mse.append(mse(pl_module, dm.train_data))
        self.test_mse.append(mse(pl_module, dm.test_data))
        self.seconds.append(self._spent)
        pl_module.train()

    def on_train_start(self, trainer, pl_module) -> None:
        self._score(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._spent += time.perf_counter() - self._start
        self._score(trainer, pl_module)


RUN_KIND = common.Kind(
    "adaptive-steps-run",
    {"table": "str", "variant": "str", "seed": "int", "epochs": "int", "num_train": "int", "fraction": "number",
     "diverged": "bool", "error": "str|null", "train_mse": "list", "test_mse": "list", "seconds": "list", "args": "list"},
    key=("table", "variant", "seed", "epochs", "num_train", "fraction"),
)  # fmt: skip


def run_variant(table: str, variant: str, seed: int, epochs: int, num_train: int, fraction: float) -> dict:
    """One run; the record of it."""
    shared, _, _ = TABLES[table]
    config, overrides, mode = variants(table)[variant]
    args = seed_args(config, seed)
    callbacks = json.loads(args[args.index("--trainer.callbacks") + 1])
    callbacks.append({"class_path": "experiments.adaptive_steps.TimedCurves"})
    extra = [*shared, *overrides, "--data.init_args.num_train", str(num_train), "--trainer.max_epochs", str(epochs)]
    if mode is not None:
        extra += ["--model.init_args.adaptive", adaptive(fraction, mode)]
    extra += ["--trainer.callbacks", json.dumps(callbacks)]
    result = run_one(config, seed, extra, keep=True)
    record = {"table": table, "variant": variant, "seed": seed, "epochs": epochs, "num_train": num_train, "fraction": fraction,
              "diverged": result["diverged"], "error": result["error"], "train_mse": [], "test_mse": [], "seconds": [],
              "args": [config, *extra]}  # fmt: skip
    cli = result.get("cli")
    if cli is not None:
        curves = next(c for c in cli.trainer.callbacks if type(c).__name__ == "TimedCurves")  # also when run as __main__
        record.update(train_mse=curves.train_mse, test_mse=curves.test_mse, seconds=curves.seconds)
        if not all(math.isfinite(v) for v in curves.train_mse):
            record.update(diverged=True, error="non-finite MSE")
    return record


def latest_settings(records: list[dict]) -> list[dict]:
    """The records the summary shows: per table, the runs with the settings (epochs, samples, fraction) of the table's
    last recorded run (so invocations with other tables or settings keep each table's latest), one per run key."""
    settings = lambda r: (r["epochs"], r["num_train"], r["fraction"])  # noqa: E731
    last = {r["table"]: settings(r) for r in records}
    chosen = {RUN_KIND.key_of(r): r for r in records if settings(r) == last[r["table"]]}  # of a run recorded twice, the last
    return list(chosen.values())


def _mean(rows: list[list[float]]) -> list[float]:
    return [statistics.fmean(c) for c in zip(*rows)]


def summarise(records: list[dict]) -> dict:
    """Per table and variant: mean curves over the seeds that did not diverge, final MSEs, epochs and seconds to reach
    BP-SGD's final mean training MSE; only the seeds that every variant of the table ran count."""
    out: dict = {}
    for table in dict.fromkeys(r["table"] for r in records):
        runs = [r for r in records if r["table"] == table]
        # only the seeds every variant ran, so that means compare like with like (an interrupted invocation leaves some)
        seed_sets = [{r["seed"] for r in runs if r["variant"] == v} for v in dict.fromkeys(r["variant"] for r in runs)]
        common_seeds = set.intersection(*seed_sets)
        runs = [r for r in runs if r["seed"] in common_seeds]
        entries = {}
        for variant in dict.fromkeys(r["variant"] for r in runs):
            mine = [r for r in runs if r["variant"] == variant]
            ok = [r for r in mine if not r["diverged"]]
            e = {"runs": len(mine), "diverged": len(mine) - len(ok), "seeds": sorted(r["seed"] for r in mine)}
            if ok:
                e.update(train_mse=_mean([r["train_mse"] for r in ok]), test_mse=_mean([r["test_mse"] for r in ok]),
                         seconds=_mean([r["seconds"] for r in ok]))  # fmt: skip
                e.update(final_train_mse=e["train_mse"][-1], final_test_mse=e["test_mse"][-1],
                         final_train_per_seed=[r["train_mse"][-1] for r in ok])  # fmt: skip
            entries[variant] = e
        target = entries.get("BP-SGD", {}).get("final_train_mse")
        for e in entries.values():
            if target is None or "train_mse" not in e:
                continue
            reached = next((k for k, v in enumerate(e["train_mse"]) if v <= target), None)
            e["epochs_to_bp_sgd"] = reached
            e["seconds_to_bp_sgd"] = e["seconds"][reached] if reached is not None else None
        first = runs[0]
        out[table] = {"num_train": first["num_train"], "fraction": first["fraction"], "bp_sgd_final_train_mse": target, "epochs": first["epochs"],
                      "variants": entries}  # fmt: skip
    return out


def verdicts(summary: dict) -> dict:
    """(a) TP-EI with adaptive steps (all pieces, or the layer step alone) reaches BP-SGD's final training loss in at
    most half the epochs; (b) RMTP-EI with adaptive steps reaches it at all within the epochs run (competitive).
    ``None``: not run."""
    exact = summary.get("exact")
    if not exact:
        return {"a": None, "b": None}
    epochs, v = exact["epochs"], exact["variants"]

    def reached(rule: str) -> list:
        return [v[k]["epochs_to_bp_sgd"] for k in (f"{rule}+adaptive", f"{rule}+layer-step") if "epochs_to_bp_sgd" in v.get(k, {})]

    tp, rm = reached("TP-EI"), reached("RMTP-EI")
    return {"a": None if not tp else any(e is not None and e <= epochs / 2 for e in tp),
            "b": None if not rm else any(e is not None for e in rm)}  # fmt: skip


def plot(summary: dict, out: Path) -> list[Path]:
    paths = []
    for table, s in summary.items():
        fig, (ax_e, ax_t) = subplots(2, width=5.0, height=3.6)
        rules = list(dict.fromkeys(v.split("+")[0] for v in s["variants"]))
        colors = {r: f"C{k}" for k, r in enumerate(rules)}  # one colour per rule; the line style tells the variant
        for variant, e in s["variants"].items():
            if "train_mse" not in e:
                continue
            style = "--" if variant.endswith("+adaptive") else "-." if variant.endswith("+layer-step") else ":" if variant in BASELINES else "-"
            kw = {"color": colors[variant.split("+")[0]], "label": variant}
            ax_e.plot(range(len(e["train_mse"])), e["train_mse"], style, **kw)
            ax_t.plot(e["seconds"], e["train_mse"], style, **kw)
        if s["bp_sgd_final_train_mse"] is not None:
            for ax in (ax_e, ax_t):
                ax.axhline(s["bp_sgd_final_train_mse"], color="gray", lw=0.6)
        ax_e.set(title=f"{table}: train MSE vs epoch", xlabel="epoch", yscale="log")
        ax_t.set(title=f"{table}: train MSE vs wall time", xlabel="training seconds", yscale="log")
        ax_t.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
        paths.append(save_figure(fig, out, f"{NAME}_{table}", dpi=80))
    return paths


def docs_block(summary: dict, verdicts_: dict) -> str:
    """The block of docs/experiments.md: per table its command, a table of the variants and the verdicts."""
    from experiments.common import markdown_table

    parts = []
    for table, s in summary.items():
        seeds = sorted({k for e in s["variants"].values() for k in e["seeds"]})
        command = (f"python -m experiments.{NAME} --tables {table} --seeds {len(seeds)} --epochs {s['epochs']} "
                   f"--num-train {s['num_train']} --fraction {s['fraction']:g} --out docs/data/{NAME} --docs")  # fmt: skip
        rows = []
        for variant, e in sorted(s["variants"].items(), key=lambda kv: kv[1].get("final_train_mse", math.inf)):
            if "train_mse" not in e:
                rows.append([variant, f"{e['diverged']}/{e['runs']}", "–", "–", "–", "–", "–", "–"])
                continue
            to = e.get("epochs_to_bp_sgd")
            rows.append([variant, f"{e['diverged']}/{e['runs']}", e["train_mse"][1], e["final_train_mse"], e["final_test_mse"],
                         "not reached" if to is None else to, "–" if to is None else f"{e['seconds_to_bp_sgd']:.0f}",
                         f"{e['seconds'][-1]:.0f}"])  # fmt: skip
        target = s["bp_sgd_final_train_mse"]
        parts += [f"**{table}** (seeds {', '.join(map(str, seeds))}; BP-SGD's final mean training MSE "
                  f"{'not run' if target is None else f'{target:.4g}'}). Command: `{command}`", "",
                  markdown_table(["variant", "diverged/runs", "train MSE after epoch 1", f"final train MSE (epoch {s['epochs']})",
                                  "final test MSE", "epochs to BP-SGD's final", "seconds to it", "training seconds"], rows),
                  "", f"![{NAME}_{table}](figures/{NAME}_{table}.png)", ""]  # fmt: skip
    words = {True: "yes", False: "no", None: "not run"}
    exact = summary.get("exact", {})
    parts.append(f"Verdicts (from the exact table, {exact.get('epochs')} epochs): (a) TP-EI with adaptive steps (all pieces or "
                 f"the layer step alone) reaches BP-SGD's final training loss in at most half the epochs: "
                 f"**{words[verdicts_['a']]}**; (b) RMTP-EI with adaptive steps reaches it at all (competitive): "
                 f"**{words[verdicts_['b']]}**.")  # fmt: skip
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- MNIST (hypothesis (c))
def mnist_variants(lrs: Sequence[float], fraction: float) -> dict[str, tuple[str, str, list[str]]]:
    """``{variant: (rule, config, overrides)}`` of the MNIST table: per rule the config as shipped (``<rule> AdamW``),
    and per SGD learning rate ``lr`` plain SGD (``<rule> SGD <lr>``) and SGD with the rule's pieces of
    :data:`MNIST_PIECES` (``<rule> SGD <lr>+adaptive``).

    >>> list(mnist_variants([0.01], 0.1))[:3]
    ['DTPAI AdamW', 'DTPAI SGD 0.01', 'DTPAI SGD 0.01+adaptive']
    """
    out = {}
    for rule, (config, pieces) in MNIST_PIECES.items():
        out[f"{rule} AdamW"] = (rule, config, [])
        for lr in lrs:
            sgd = [LR, json.dumps({"class_path": "torch.optim.SGD", "init_args": {"lr": lr, "weight_decay": 0.0}})]
            out[f"{rule} SGD {lr:g}"] = (rule, config, sgd)
            kw = {"damping": "LayerDamping", "layer_step": "LayerStep"}
            parts = {k: {"class_path": f"tplightning.adaptive.{v}", "init_args": {"fraction": fraction} if v == "LayerStep" else {}}
                     for k, v in kw.items() if v in pieces}  # fmt: skip
            value = json.dumps({"class_path": "tplightning.adaptive.Adaptive", "init_args": parts})
            out[f"{rule} SGD {lr:g}+adaptive"] = (rule, config, [*sgd, "--model.init_args.adaptive", value])
    return out


def mnist_tasks(variants_: dict, seeds: Sequence[int], epochs: int, data: Sequence[str]) -> list[tuple]:
    """The MNIST runs ``(variant, config, seed, epochs, overrides)`` (:func:`benchmarks.mnist.run_key`'s arguments), seed
    by seed (an interrupted campaign leaves whole seeds)."""
    return [(v, config, seed, epochs, tuple([*overrides, *data])) for seed in seeds for v, (_, config, overrides) in variants_.items()]


def _mnist_runs_row(variant: str, config: str, epochs: int, runs: list[dict]) -> dict:
    """A variant's runs as a row of the MNIST benchmark's table (what its curve and band functions read)."""
    return {"rule": variant, "config": config, "epochs": epochs, "runs": runs}


def summarise_mnist(runs: Sequence[dict]) -> dict:
    """Per variant (``runs``: its MNIST benchmark records): the test errors of the best-validation checkpoints, the
    validation curves, the training seconds per epoch (:class:`benchmarks.mnist.ValTimer`'s, validation excluded) and,
    per threshold of :data:`MNIST_THRESHOLDS`, each seed's ``(epochs, seconds)`` to it (None: never) and the censored
    medians over seeds; only the seeds every variant ran count."""
    variants_ = list(dict.fromkeys(r["rule"] for r in runs))
    if not variants_:
        return {}
    seeds = set.intersection(*({r["seed"] for r in runs if r["rule"] == v} for v in variants_))
    out = {}
    for variant in variants_:
        mine = sorted((r for r in runs if r["rule"] == variant and r["seed"] in seeds), key=lambda r: r["seed"])
        ok = [r for r in mine if not r["diverged"] and r["test_error"] is not None]
        e = {"config": mine[0]["config"], "epochs": mine[0]["epochs"], "seeds": [r["seed"] for r in mine], "runs": len(mine),
             "diverged": sum(bool(r["diverged"]) for r in mine), "failed": [r["error"] for r in mine if not r["diverged"] and r["test_error"] is None],
             "test_errors": [r["test_error"] for r in ok], "best_epochs": [r["best_epoch"] for r in ok], "val_acc": [r["val_acc"] for r in ok],
             "train_seconds_per_epoch": [r["val_points"][-1][1] / len(r["val_points"]) for r in ok if r.get("val_points")],
             "machines": list(dict.fromkeys(r["machine"] for r in mine)), "thresholds": {}}  # fmt: skip
        for th in MNIST_THRESHOLDS:
            per_seed = {}
            for r in mine:
                points = mnist_bench.curve_points(r, r["config"]) if r in ok else []
                hit = mnist_bench.time_to(points, th)
                bpe = mnist_bench.batches_per_epoch(r, r["config"]) if hit else None
                per_seed[r["seed"]] = None if hit is None else (math.ceil(hit[0] / bpe), hit[1])
            e["thresholds"][th] = {"per_seed": per_seed, "reached": sum(h is not None for h in per_seed.values()), "of": len(per_seed),
                                   "epochs": mnist_bench.censored_median([None if h is None else h[0] for h in per_seed.values()]),
                                   "seconds": mnist_bench.censored_median([None if h is None else h[1] for h in per_seed.values()])}  # fmt: skip
        out[variant] = e
    return out


def _mean_sd(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def mnist_block(summary: dict, command: str, figure: str | None) -> str:
    """The block of docs/experiments.md for the MNIST table: its command, the table, the per-seed times and the
    machines."""
    from experiments.common import markdown_table

    def cell(t: dict) -> str:
        count = f"({t['reached']}/{t['of']})"
        return f"not reached {count}" if not math.isfinite(t["seconds"]) else f"{t['seconds']:.0f} s · {t['epochs']:.0f} ep {count}"

    rows = []
    for variant, e in summary.items():
        curves = e["val_acc"]
        err = _mean_sd(e["test_errors"]) + (f" ({e['diverged']}/{e['runs']} diverged)" if e["diverged"] else "")
        err += "".join(f" ({f})" for f in e["failed"])
        rows.append([variant, err, _mean_sd([100 * c[0] for c in curves]), _mean_sd([100 * max(c) for c in curves]),
                     *(cell(e["thresholds"][th]) for th in MNIST_THRESHOLDS), _mean_sd(e["train_seconds_per_epoch"], 1)])  # fmt: skip
    seeds = sorted({s for e in summary.values() for s in e["seeds"]})
    epochs = sorted({e["epochs"] for e in summary.values()})
    per_seed = [f"{v}: " + ", ".join(f"seed {s} {'–' if h is None else f'{h[1]:.0f} s/{h[0]} ep'}" for s, h in e["thresholds"][0.98]["per_seed"].items())
                for v, e in summary.items()]  # fmt: skip
    machines = list(dict.fromkeys(m for e in summary.values() for m in e["machines"]))
    return "\n".join([
        f"**mnist** (784-256x5-10, {', '.join(map(str, epochs))} epochs, seeds {', '.join(map(str, seeds))}). Command: `{command}`",
        "",
        "Test error: the 10k test images scored with the checkpoint of the best validation epoch (mean ± sd over seeds). "
        "Time to an accuracy: the training seconds (validation excluded) and the epochs until the validation accuracy "
        "(5k images, once per epoch) first reaches it, the median over seeds with a seed that never does counted as "
        "never (shown only when more than half reach it; reaching seeds in brackets).",
        "",
        markdown_table(["variant", "test error % (best val epoch)", "val acc % after epoch 1", "best val acc %",
                        *(f"to {100 * th:g} % val acc" for th in MNIST_THRESHOLDS), "training s/epoch"], rows),  # fmt: skip
        "",
        "Per seed, to 98 % (training seconds / epochs; – never): " + "; ".join(per_seed) + ".",
        *(["", f"![{NAME}_mnist]({figure})"] if figure else []),
        "",
        "Machine: " + " | ".join(machines) + ".",
    ])  # fmt: skip


def plot_mnist(records: Sequence[dict], out: Path) -> Path | None:
    """Validation accuracy against training seconds (log scale) and against epochs, one line per variant (mean over
    seeds, band of ± one sd; :func:`benchmarks.mnist.tta_bands`, :func:`benchmarks.mnist.curve_bands`); one colour per
    rule and SGD learning rate, the line style tells the variant."""
    times = [t for rec in records for r in rec["runs"] for _, t, _ in mnist_bench.curve_points(r, rec["config"])]
    if not times:
        return None
    lo, hi = min(times), max(times)
    grid = [lo * (hi / lo) ** (k / 400) for k in range(401)] if hi > lo else [lo]
    in_time = mnist_bench.tta_bands([{"rule": rec["rule"]} for rec in records], records, grid)
    in_epochs = mnist_bench.curve_bands(records)
    fig, (ax_t, ax_e) = subplots(2, width=5.0, height=3.8)
    families = list(dict.fromkeys(v.split("+")[0].replace(" AdamW", "") for v in in_epochs))
    colors = {f: f"C{k}" for k, f in enumerate(families)}
    for variant, (mean, sd) in in_epochs.items():
        family = variant.split("+")[0].replace(" AdamW", "")
        style = "-" if variant.endswith("AdamW") else "--" if variant.endswith("+adaptive") else ":"
        kw = {"color": colors[family], "label": variant, "lw": 1.3}
        for ax, (xs, m, d) in ((ax_e, (range(1, len(mean) + 1), mean, sd)), (ax_t, in_time.get(variant, ([], [], [])))):
            ax.plot(list(xs), m, style, **kw)
            ax.fill_between(list(xs), [a - b for a, b in zip(m, d)], [a + b for a, b in zip(m, d)], color=kw["color"], alpha=0.12, lw=0)
    best, worst = max(max(m) for m, _ in in_epochs.values()), min(min(m) for m, _ in in_epochs.values())
    for ax in (ax_t, ax_e):
        ax.axhline(98.0, color="gray", lw=0.6)
        ax.set_ylim(max(50.0, worst - 1), min(100.0, max(best, 98.0) + 0.5))
        ax.set_ylabel("validation accuracy %")
        ax.grid(alpha=0.3)
    ax_t.set(title="MNIST: val acc vs training time", xlabel="training seconds (one torch thread)", xscale="log")
    ax_e.set(title="MNIST: val acc vs epoch", xlabel="epoch")
    ax_e.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, out, f"{NAME}_{MNIST}", dpi=80)


def run_mnist(args: argparse.Namespace) -> dict:
    """The MNIST table: run what is not recorded in ``<out>/adaptive_steps_mnist_runs.jsonl`` (one run at a time,
    each appended as it finishes), then summarise the runs asked for, write the JSON and the figure."""
    epochs = args.epochs or MNIST_EPOCHS
    data = []
    if args.num_train or args.num_val:
        n_train, n_val = args.num_train or 55000, args.num_val or 5000
        data = ["--data.init_args.subset", str(n_train + n_val), "--data.init_args.num_train", str(n_train), "--data.init_args.num_val", str(n_val)]
    variants_ = mnist_variants(args.mnist_lr, args.fraction)
    if args.variants:
        variants_ = {k: v for k, v in variants_.items() if k in args.variants}
    tasks = mnist_tasks(variants_, range(args.seeds), epochs, data)
    path = args.out / MNIST_RECORDS
    recorded = mnist_bench.read_runs(path)
    start = time.perf_counter()
    for k, task in enumerate(tasks, start=1):
        if mnist_bench.run_key(*task) in recorded:
            continue
        variant, config, seed, _, overrides = task
        result = mnist_bench.run_one(*task)
        mnist_bench.record_run(path, result, mnist_bench._machine(1))
        score = result["error"] if result["test_error"] is None else f"test error {result['test_error']:.2f}%, val acc {result['val_acc']}"
        print(f"[{k}/{len(tasks)} {time.perf_counter() - start:.0f}s] {MNIST} {variant} seed {seed}: {score}", flush=True)
    recorded = mnist_bench.read_runs(path)
    runs = [recorded[key] for task in tasks if (key := mnist_bench.run_key(*task)) in recorded]
    summary = summarise_mnist(runs)
    records = [_mnist_runs_row(v, e["config"], e["epochs"], [r for r in runs if r["rule"] == v and r["seed"] in e["seeds"]])
               for v, e in summary.items()]  # fmt: skip
    figure = plot_mnist(records, args.out)
    save_json(args.out, f"{NAME}_{MNIST}", {"summary": summary, "runs": len(runs)})
    command = [f"python -m experiments.{NAME} --tables {MNIST} --seeds {args.seeds} --epochs {epochs}",
               f"--mnist-lr {','.join(f'{lr:g}' for lr in args.mnist_lr)} --fraction {args.fraction:g}"]
    if data:
        command.append(f"--num-train {data[3]} --num-val {data[5]}")
    if args.variants:
        command.append(f"--variants {shlex.quote(','.join(args.variants))}")
    return {"summary": summary, "figure": figure, "command": " ".join([*command, f"--out docs/data/{NAME} --docs"])}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "out" / NAME, help="output folder (default: %(default)s)")
    p.add_argument("--tables", default="exact,deep,contracting",
                   help=f"comma-separated tables, of {', '.join([*TABLES, MNIST])} (default: %(default)s)")
    p.add_argument("--variants", default="", help="comma-separated variants (default: all of each table)")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=0, help=f"epochs (0, the default: 60, and {MNIST_EPOCHS} for mnist)")
    p.add_argument("--num-train", type=int, default=0, help="training samples (0: the table's; mnist: the config's 55000)")
    p.add_argument("--num-val", type=int, default=0, help="mnist: validation images (0: the config's 5000)")
    p.add_argument("--fraction", type=float, default=0.1, help="LayerStep fraction (default: %(default)s)")
    p.add_argument("--mnist-lr", default="0.01", help="mnist: comma-separated SGD learning rates (default: %(default)s)")
    p.add_argument("--docs", action="store_true", help="also copy the figures to docs/figures/ and write the block of docs/experiments.md")
    args = p.parse_args(argv)
    args.tables = [t for t in args.tables.split(",") if t]
    unknown = set(args.tables) - {*TABLES, MNIST}
    if unknown:
        p.error(f"unknown tables {sorted(unknown)}; choose from {', '.join([*TABLES, MNIST])}")
    args.variants = [v for v in args.variants.split(",") if v]
    try:
        args.mnist_lr = [float(v) for v in args.mnist_lr.split(",") if v]
    except ValueError:
        p.error(f"--mnist-lr takes comma-separated numbers, got {args.mnist_lr!r}")
    if not args.mnist_lr or min(args.mnist_lr) <= 0:
        p.error(f"--mnist-lr takes positive learning rates, got {args.mnist_lr}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    common.quiet()
    path = args.out / RECORDS
    done = {RUN_KIND.key_of(e.record) for e in common.read_records(path, RUN_KIND)}
    wanted = []
    for table in (t for t in args.tables if t != MNIST):
        n = args.num_train or TABLES[table][1]
        for variant in variants(table):
            if args.variants and variant not in args.variants:
                continue
            for seed in range(args.seeds):
                key = {"table": table, "variant": variant, "seed": seed, "epochs": args.epochs or 60, "num_train": n, "fraction": args.fraction}
                wanted.append(key)
    start = time.perf_counter()
    with single_thread():
        for k, key in enumerate(wanted, start=1):
            if RUN_KIND.key_of(key) in done:
                continue
            record = run_variant(**key)
            common.append_record(path, RUN_KIND, record)
            last = "diverged: " + str(record["error"]) if record["diverged"] else f"train MSE {record['train_mse'][-1]:.4g}"
            print(f"[{k}/{len(wanted)} {time.perf_counter() - start:.0f}s] {key['table']} {key['variant']} seed {key['seed']}: {last}", flush=True)
        mnist = run_mnist(args) if MNIST in args.tables else None
    summary = summarise(latest_settings([e.record for e in common.read_records(path, RUN_KIND)]))
    result = {"verdicts": verdicts(summary), "summary": summary}
    if mnist is not None:
        result["mnist"] = mnist["summary"]
    if wanted:
        save_json(args.out, NAME, result)
    figures = plot(summary, args.out) if wanted else []
    if mnist is not None and mnist["figure"] is not None:
        figures.append(mnist["figure"])
    if args.docs:
        import shutil

        from benchmarks.common import write_block
        from experiments.common import DOCS, FIGURES

        FIGURES.mkdir(parents=True, exist_ok=True)
        for f in figures:
            shutil.copy(f, FIGURES / f.name)
        if wanted:
            write_block(DOCS, NAME, docs_block(summary, result["verdicts"]))
        if mnist is not None:
            figure = None if mnist["figure"] is None else f"figures/{mnist['figure'].name}"
            write_block(DOCS, f"{NAME}_{MNIST}", mnist_block(mnist["summary"], mnist["command"], figure))
    print(json.dumps(result["verdicts"]))
    return result


if __name__ == "__main__":
    main()
