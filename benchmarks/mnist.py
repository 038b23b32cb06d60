"""MNIST with the fully connected network of thesis table 3.1 (Bartunov et al. 2018), 784-(256×5)-10.

    python -m benchmarks.mnist [--rules R ...] [--epochs N] [--seeds S ...] [--jobs J]
        [--out docs/RESULTS.md] [--record docs/data/mnist_runs.jsonl] [--rerun]
        [--subset N --num-train N --num-val N] [--val-every N] [--json PATH] [--dry-run] [--rewrite] [--verify EPOCHS]

Each run is ``python train.py --config mnist/<rule>.yaml --test_on best <overrides>``: the config's
loggers and its ``ModelCheckpoint`` on ``val/acc`` stay on (each run in its own folder,
``runs/mnist_<rule>/seed<s>-<date>-<time>-<pid>/``, so parallel runs do not collide), and the 10k
test images are scored with the checkpoint of the best validation epoch. One seed ``s`` sets
``seed_everything`` (the initial weights), the shuffling and, for target-propagation rules, the
layer draws and the feedback noise; the 55k/5k train/validation split is the data module's fixed
``split_seed``. A run that diverges (``DivergenceError``) is reported as such.

**Campaigns.** Every run is appended to ``--record`` (a checksummed record file, one run a line, ``common``'s
"Run records") as soon as it finishes,
keyed by the rule, the config file's settings (a digest of its parsed YAML), the seed, the epochs and the
smoke-run flags. The default record file, ``data/mnist_runs.jsonl`` beside ``--out`` (``docs/data/``), is part of
the repository: commit it
as runs land, and a campaign spread over sittings on fresh machines goes on where the last one stopped.
A later invocation takes a recorded run from there instead of training it again (``--rerun`` trains
anyway), so a campaign such as ``--seeds 0 1 2`` survives an interruption: run the same command again.
To spread one over machines, give each a share of the rules (or seeds), then concatenate their record
files into one (``cat``; of two records of one run the later written wins, whatever the order) and run the full
command once more: it trains nothing and writes the table. A run that failed (not by divergence) is not recorded
and is tried again; so is a run whose record line is torn (a kill while it was written) or otherwise bad: the
reader names the line on stderr and skips it, and the next record starts on a line of its own. Changing a config (say, after tuning)
changes its digest, so its runs are done afresh.

**Checking a record.** ``--verify 2`` trains nothing into the record: it reruns the first two epochs of each
selected recorded run (its own config, seed and full learning-rate schedule, stopped after two epochs) and compares
their validation accuracies with the recorded ones, exactly. It prints ``same`` or the first epoch that differs,
with the record's machine and this one's, and exits with status 1 if any run differs. Float32 runs depend on the
CPU kernels torch dispatches to (``common.cpu``): where the record names other kernels than this machine's, set
``ATEN_CPU_CAPABILITY`` to the record's.

Each row gives the mean ± sd over the seeds of the test error at the best-validation epoch. The
validation accuracy of every epoch (read from each run's ``metrics.csv``) is kept with the run, and
``figures/mnist_curves.png`` beside ``--out`` shows it against the epoch, one line per rule (the mean
over seeds), with a band of ± one sd.

**Time to accuracy.** Below the table, ``<!-- mnist-tta:start/end -->`` holds, per rule, the wall time and the training
batches until the validation accuracy first reaches 97 %, 98 % and 98.3 % (median over seeds, a seed that never
reaches a threshold counted as infinitely slow: :func:`censored_median`), its ratio to the BP row's, and the final test
error; ``figures/mnist_time_to_accuracy.png`` shows the validation accuracy against time, one line per rule with a band
over seeds. Both are computed from the same run records (:func:`time_to_accuracy`). Every run carries a
:class:`ValTimer`, which records the training batches and the training seconds (validation excluded) at each
validation; ``--val-every N`` also evaluates every N training batches (Lightning's ``val_check_interval``; part of the
run's key), which gives points within the epoch. Runs recorded before the timer have one point per epoch at ``e *``
their seconds per epoch.

The table is written between ``<!-- mnist:start -->`` and ``<!-- mnist:end -->`` in ``--out``; the
rest of the file is left as it is. The table holds no data of its own: each row is a record of
``data/mnist_table.jsonl`` beside ``--out`` (the rule's runs as the latest invocation for it saw them, with its
command), appended when a row changes, so a later invocation with other ``--rules`` (or other epochs) replaces
only the rows of the rules it runs and keeps the others. Run from the repository
root (``--out``, ``--record`` and the runs' folders are relative to it; MNIST comes from the data cache,
docs/guide.md, "Data").
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import re
import shlex
import statistics
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from tplightning._lightning import pl
import torch
import yaml

from tplightning.cli import main as cli_main
from tplightning.rules.base import DivergenceError

from benchmarks import common
from benchmarks.common import Rule, config_value, seed_overrides

__all__ = ["RULES", "THESIS", "run_args", "run_one", "render", "run_key", "read_runs", "plot_curves", "ValTimer", "curve_points", "time_to",
           "censored_median", "time_to_accuracy", "render_tta", "plot_tta", "write_tta", "main"]

PROG = "python -m benchmarks.mnist"
#: the curves figure, relative to the folder of ``--out``
FIGURE = Path("figures") / "mnist_curves.png"
START, END = "<!-- mnist:start -->", "<!-- mnist:end -->"
#: finished runs of the campaign (committed, so it survives fresh machines): the default ``--record``
RECORD = common.data_file(common.RESULTS, "mnist_runs.jsonl")
#: the table's rows, one record per rule (the latest wins), in this file beside ``--out``
ROWS = "mnist_table.jsonl"

#: what a row keeps of each run, with its JSON types
RUN_TYPES = {"seed": "int", "test_error": "number|null", "best_val_acc": "number|null", "best_epoch": "int|null",
             "epochs_run": "int|null", "seconds": "number", "seconds_per_epoch": "number|null", "diverged": "bool",
             "error": "str|null", "val_acc": "list|null"}  # fmt: skip
RUN_FIELDS = tuple(RUN_TYPES)
#: what a row keeps of each run when the run has it (runs recorded before time to accuracy was measured lack them):
#: ``batches_per_epoch`` (the trainer's training batches per epoch), ``val_every`` (``--val-every``, or None) and
#: ``val_points``, ``[[batches trained, training seconds, val/acc], ...]`` at every validation (:class:`ValTimer`)
OPTIONAL_RUN_FIELDS = ("batches_per_epoch", "val_every", "val_points")


def _curve_problem(record: dict) -> str | None:
    if record["val_acc"] is not None and not all(common._TYPES["number"](v) for v in record["val_acc"]):
        return "field 'val_acc' holds a value that is not a number"
    return None


def _runs_problem(record: dict) -> str | None:
    for i, run in enumerate(record["runs"]):
        problem = common.Kind("run", RUN_TYPES, check=_curve_problem).problem(run)
        if problem is not None:
            return f"run {i}: {problem}"
    return None


#: a finished run of ``--record`` (:func:`record_run`)
RUN_KIND = common.Kind("mnist-run", {"key": "str", "rule": "str", "config": "str", "epochs": "int|null", "overrides": "list",
                                     "date": "str", "machine": "str", **RUN_TYPES}, key=("key",), check=_curve_problem)  # fmt: skip
#: a row of the table (:func:`read_records`)
ROW_KIND = common.Kind("mnist-row", {"rule": "str", "config": "str", "hparams": "str", "command": "str", "date": "str",
                                     "machine": "str", "epochs": "int|null", "runs": "list"}, key=("rule",), check=_runs_problem)  # fmt: skip


#: LeNet-5 rows: (rule name, config stem after ``lenet_``)
LENET_RULES = (("BP", "bp"), ("FA", "fa"), ("DFA", "dfa"), ("USF", "usf"), ("BRSF", "brsf"), ("FRSF", "frsf"), ("KP", "kp"),
               ("WM", "wm"), ("DDTPLinear", "ddtp_linear"), ("LDRL", "ldrl"))  # fmt: skip
#: biotorch's published LeNet MNIST top-1 test errors % (Sanfiz & Akrout 2021, Benchmarks.md; one run each, 100 epochs,
#: checkpoint chosen on the test set); rules it does not have are absent
BIOTORCH_LENET = {"BP": "0.91", "FA": "1.70", "DFA": "1.61", "USF": "0.94", "BRSF": "0.91", "FRSF": "0.97"}

RULES = {
    r.name: r
    for r in [
        Rule("BP", "mnist/bp.yaml"),
        Rule("DTPAI", "mnist/dtp_ai.yaml"),
        Rule("RDTPAI", "mnist/rdtp_ai.yaml"),
        Rule("LeeDTP", "mnist/lee_dtp.yaml"),
        Rule("OriginalDTP", "mnist/original_dtp.yaml"),
        Rule("AOSDTP", "mnist/ao_sdtp.yaml"),
        Rule("FA", "mnist/fa.yaml"),
        Rule("DFA", "mnist/dfa.yaml"),
        Rule("BDFA", "mnist/bdfa.yaml"),
        Rule("DRL", "mnist/drl.yaml"),
        Rule("DDTPLinear", "mnist/ddtp_linear.yaml"),
        Rule("LDRL", "mnist/ldrl.yaml"),
        Rule("FWDTP", "mnist/fw_dtp.yaml"),
        Rule("CCL", "mnist/ccl.yaml"),
        Rule("CNN-BP", "mnist/cnn_bp.yaml"),
        Rule("CNN-LeeDTP", "mnist/cnn_lee_dtp.yaml"),
        *(Rule(f"LeNet-{name}", f"mnist/lenet_{stem}.yaml") for name, stem in LENET_RULES),
    ]
}
#: rows of the convolutional network (mnist/cnn_*.yaml), rendered as a table of their own
CNN = ("CNN-BP", "CNN-LeeDTP")
#: rows of LeNet-5 (mnist/lenet_*.yaml), rendered as a table of their own beside biotorch's published row
LENET = tuple(f"LeNet-{name}" for name, _ in LENET_RULES)

#: thesis table 3.1 (from Bartunov et al. 2018): test error % on MNIST and CIFAR-10, Adam, best of 500 epochs.
THESIS = [("BP", "1.48", "41.32"), ("FA", "1.85", "41.97"), ("DTP", "1.83", "42.32"), ("AO-SDTP", "1.86", "45.40"),
          ("SDTP", "2.28", "54.27"), ("DFA", "2.75", "47.80")]  # fmt: skip


# --------------------------------------------------------------------------------------------- one run
def run_args(config: str, seed: int, epochs: int | None = None, overrides: Sequence[str] = ()) -> list[str]:
    """The ``train.py`` arguments of one run of ``config`` with seed ``seed`` (with a :class:`ValTimer`)."""
    timer = {"class_path": f"{__name__.replace('__main__', 'benchmarks.mnist')}.ValTimer"}
    args = ["--config", common.cli_config(config), "--test_on", "best", "--trainer.enable_progress_bar", "false", *seed_overrides(config, seed),
            f"--trainer.callbacks+={json.dumps(timer)}"]
    if epochs is not None:
        args += ["--trainer.max_epochs", str(epochs)]
    loggers = config_value(config, (), "trainer.logger")
    if isinstance(loggers, list) and loggers:  # one folder per run: runs/<name>/seed<s>-<time>/, safe with --jobs > 1
        version = f"seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        loggers = [{**lg, "init_args": {**lg.get("init_args", {}), "version": version}} for lg in loggers]
        args += ["--trainer.logger", json.dumps(loggers)]
    return [*args, *overrides]


class ValTimer(pl.Callback):
    """Records ``[batches trained, training seconds, val/acc]`` at the end of every validation (not the sanity check):
    the training seconds are the wall time since training started less the time spent validating, so evaluating more
    often (``--val-every``) does not count against a rule. Read back as ``trainer.val_points``."""

    def __init__(self, key: str = "val/acc"):
        self.key = key

    def on_train_start(self, trainer, pl_module):
        self.start, self.validating, self.batches, self.points = time.perf_counter(), 0.0, 0, []
        trainer.val_points = self.points

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def on_validation_start(self, trainer, pl_module):
        self.val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not hasattr(self, "start"):
            return
        now = time.perf_counter()
        self.validating += now - self.val_start
        value = trainer.callback_metrics.get(self.key)
        if value is not None:
            self.points.append([self.batches, round(now - self.start - self.validating, 3), round(float(value), 5)])


def _best_epoch(trainer: pl.Trainer) -> int | None:
    """1-based epoch of the best validation checkpoint (from its ``epoch=E-...`` name or contents)."""
    ckpt = trainer.checkpoint_callback
    path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    if not path:
        return None
    m = re.search(r"epoch=(\d+)", Path(path).name)
    if m:
        return int(m.group(1)) + 1
    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"]) + 1


def val_curve(trainer: pl.Trainer, key: str = "val/acc") -> list[float] | None:
    """``key`` at the end of each validation epoch, from the run's CSV log (``metrics.csv``); None without one."""
    folder = next((lg.log_dir for lg in trainer.loggers if type(lg).__name__ == "CSVLogger"), None)
    path = Path(folder or "") / "metrics.csv"
    if folder is None or not path.is_file():
        return None
    by_epoch = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(key) not in (None, ""):
                by_epoch[int(row["epoch"])] = float(row[key])
    return [round(by_epoch[e], 5) for e in sorted(by_epoch)]


def run_one(rule: str, config: str, seed: int, epochs: int | None = None, overrides: Sequence[str] = ()) -> dict:
    """Train ``config`` with seed ``seed``; test the best validation checkpoint.

    Returns ``{"rule", "config", "seed", "epochs", "overrides", "args", "test_error", "best_val_acc", "best_epoch",
    "epochs_run", "seconds", "seconds_per_epoch", "diverged", "error", "val_acc"}`` (errors in %; ``val_acc``: the
    validation accuracy of each epoch, from the run's ``metrics.csv``).
    """
    args = run_args(config, seed, epochs, overrides)
    result = {"rule": rule, "config": config, "seed": seed, "epochs": epochs, "overrides": list(overrides), "args": args,
              "test_error": None, "best_val_acc": None}  # fmt: skip
    result.update(best_epoch=None, epochs_run=None, diverged=False, error=None, val_acc=None, batches_per_epoch=None,
                  val_every=_val_every(overrides), val_points=None)
    start = time.perf_counter()
    try:
        out = cli_main(args)
    except DivergenceError as err:
        result.update(diverged=True, error=str(err).split(". ")[0])
        fit_seconds = time.perf_counter() - start
    else:
        trainer = out["cli"].trainer
        fit_seconds = getattr(trainer, "_mnist_fit_seconds", None) or time.perf_counter() - start
        acc = out["test_metrics"].get("test/acc")
        ckpt = trainer.checkpoint_callback
        score = getattr(ckpt, "best_model_score", None) if ckpt is not None else None
        result.update(
            test_error=None if acc is None else 100.0 * (1.0 - float(acc)),
            best_val_acc=None if score is None else float(score),
            best_epoch=_best_epoch(trainer),
            epochs_run=int(trainer.current_epoch),
            val_acc=val_curve(trainer),
            batches_per_epoch=int(trainer.num_training_batches) if math.isfinite(trainer.num_training_batches) else None,
            val_points=getattr(trainer, "val_points", None),
        )
    result["seconds"] = time.perf_counter() - start
    result["seconds_per_epoch"] = result["seconds"] / result["epochs_run"] if result["epochs_run"] else None
    return result


def _val_every(overrides: Sequence[str]) -> int | None:
    """The ``--val-every`` of a run from its overrides (``--trainer.val_check_interval N``), or None."""
    flag = "--trainer.val_check_interval"
    return int(overrides[list(overrides).index(flag) + 1]) if flag in overrides else None


def _run_task(task: tuple) -> dict:
    """:func:`run_one`; a run that fails (not by divergence) is reported as failed, so one bad run of
    a long benchmark does not lose the others."""
    try:
        return run_one(*task)
    except Exception as err:  # noqa: BLE001 - reported in the table and printed in full
        import traceback

        traceback.print_exc()
        rule, config, seed = task[:3]
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return {"rule": rule, "config": config, "seed": seed, "epochs": task[3], "overrides": list(task[4]),
                "args": run_args(*task[1:]), "test_error": None, "best_val_acc": None, "best_epoch": None,
                "epochs_run": None, "seconds": 0.0, "seconds_per_epoch": None, "diverged": False,
                "error": f"failed: {type(err).__name__}: {first}", "val_acc": None}  # fmt: skip


class StopAfter(pl.Callback):
    """Stop a run after its first ``epochs`` epochs. The run keeps the schedule of its full length, so those epochs
    are the ones a full run trains (``--verify``)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def verify_run(rec: dict, epochs: int) -> str | None:
    """Rerun the first ``epochs`` epochs of the recorded run ``rec``; None if their validation accuracies equal the
    recorded ones exactly, else what differs."""
    want = (rec.get("val_acc") or [])[:epochs]
    if len(want) < epochs:
        return f"the record holds {len(want)} validation epochs, fewer than the {epochs} asked"
    args = run_args(rec["config"], rec["seed"], rec["epochs"], rec["overrides"])
    args[args.index("--test_on") + 1] = "none"
    stop = {"class_path": f"{__name__.replace('__main__', 'benchmarks.mnist')}.StopAfter", "init_args": {"epochs": epochs}}
    try:
        got = val_curve(cli_main([*args, f"--trainer.callbacks+={json.dumps(stop)}"])["cli"].trainer) or []
    except DivergenceError as err:
        return f"diverged here: {str(err).split('. ')[0]}"
    for epoch, (a, b) in enumerate(zip(got, want), start=1):
        if a != b:
            return f"differs at epoch {epoch}: val/acc {a} here, {b} recorded"
    return None if len(got) == epochs else f"ran {len(got)} epochs of the {epochs} asked"


# --------------------------------------------------------------------------------------------- run records
def run_key(rule: str, config: str, seed: int, epochs: int | None, overrides: Sequence[str]) -> str:
    """What makes two runs the same run: rule, the config's settings (its parsed YAML: comments do not count), seed,
    epochs and overrides."""
    settings = yaml.safe_load(common._config_path(config).read_text())
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return json.dumps([rule, config, digest, seed, epochs, list(overrides)])


def read_runs(path: Path) -> dict[str, dict]:
    """The runs recorded in the record file ``path`` by their :func:`run_key` (of two records of a key the later
    written wins, ``common.newest``; a torn, edited or malformed line is named on stderr and skipped)."""
    return common.newest(common.read_records(path, RUN_KIND), key=lambda rec: rec["key"])


def record_run(path: Path, result: dict, machine: str) -> None:
    """Append one finished run to the record file ``path`` (one checksummed line, fsynced, ``common.append_record``)."""
    rec = {"key": run_key(result["rule"], result["config"], result["seed"], result["epochs"], result["overrides"]),
           "date": date.today().isoformat(), "machine": machine, **result}  # fmt: skip
    common.append_record(path, RUN_KIND, rec)


# --------------------------------------------------------------------------------------------- table
def hyper_parameters(config: str, overrides: Sequence[str] = ()) -> str:
    """The optimizer and key hyper-parameters of a run of ``config`` with ``overrides``, in words."""

    def get(key, default=None):
        try:
            return config_value(config, overrides, key)
        except (KeyError, TypeError):
            return default

    def opt(key):
        o = get(f"model.init_args.{key}")
        if not isinstance(o, dict):
            return None
        kw = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in (o.get("init_args") or {}).items())
        return f"{o['class_path'].rsplit('.', 1)[-1]}({kw})"

    act = get("model.init_args.activation", "leaky_relu")
    slope = get("model.init_args.negative_slope", 0.35)
    parts = [f"{act}{f' {slope:g}' if act == 'leaky_relu' else ''}, init {get('model.init_args.init', 'gaussian')}"]
    if (network := get("model.init_args.network")) is not None:  # the layers name their own activation and init
        parts = [f"{len(network)} layers ({', '.join(spec['class_path'].rsplit('.', 1)[-1] for spec in network)}), "
                 f"{network[0]['init_args'].get('activation', 'tanh')}, init {network[0]['init_args'].get('init', 'gaussian')}"]
        if network[0]["class_path"].startswith("torch."):  # torch modules: their own activations, PyTorch's initial weights
            parts = [f"{len(network)} torch modules ({', '.join(spec['class_path'].rsplit('.', 1)[-1] for spec in network)})"]
    parts.append(f"fwd {opt('forward_optimizer')}")
    if (fb := opt("feedback_optimizer")) is not None:
        parts.append(f"fb {fb}")
    for key, label in (
        ("target_stepsize", "η̂"), ("feedback_noise_std", "σ"), ("feedback_weight_decay", "λ"),
        ("feedback_iterations", "fb iters"), ("feedback_init", "fb init"), ("aux_units", "aux"),
        ("lr_final_factor", "lr final"), ("bias", "bias"),
    ):  # fmt: skip
        v = get(f"model.init_args.{key}")
        if v is not None:
            parts.append(f"{label} {v:g}" if isinstance(v, float) else f"{label} {v}")
    for cb in get("trainer.callbacks") or []:
        if isinstance(cb, dict) and cb.get("class_path", "").endswith("StepSchedule"):
            args = cb.get("init_args") or {}
            parts.append(f"lr × {args.get('gamma', 0.1):g} at {', '.join(f'{m:g}' for m in args.get('milestones', (0.5, 0.75)))} of the epochs")
    parts.append(f"batch {get('data.init_args.batch_size')}")
    return ", ".join(parts)


def _fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def command(rule: str, epochs: int | None, seeds: Sequence[int], extra: Sequence[str] = ()) -> str:
    parts = ["--rules", rule]
    if epochs is not None:
        parts += ["--epochs", str(epochs)]
    parts += ["--seeds", *map(str, seeds), *extra]
    return f"{PROG} {shlex.join(parts)}"


def _rows(records: Sequence[dict]) -> list[str]:
    rows = []
    for rec in records:
        runs = rec["runs"]
        ok = [r for r in runs if not r["diverged"] and r["test_error"] is not None]
        errs = [r["test_error"] for r in ok]
        best = ", ".join(f"{r['best_epoch']}/{r['epochs_run']}" for r in ok) or "–"
        spe = [r["seconds_per_epoch"] for r in ok if r["seconds_per_epoch"]]
        div = sum(bool(r["diverged"]) for r in runs)
        failed = [r["error"] for r in runs if not r["diverged"] and r["test_error"] is None]
        err = _fmt(errs) + (f" ({div}/{len(runs)} diverged)" if div else "")
        err += "".join(f" ({e})" for e in failed)
        key = statistics.mean(errs) if errs else math.inf
        seeds = ", ".join(str(r["seed"]) for r in runs)
        rows.append((key, f"| {rec['rule']} | `configs/{rec['config']}` | {err} | {best} | {_fmt(spe, 1)} s | {seeds} | "
                          f"{rec['hparams']} | `{rec['command']}` | {rec['date']}, {rec['machine']} |"))  # fmt: skip
    rows.sort(key=lambda kv: kv[0])
    return [row for _, row in rows]


HEAD = [
    "| rule | config | test error % (best val epoch) | best epoch / epochs run | time per epoch | seed(s) | "
    "optimizer and hyper-parameters | command | run |",
    "|---|---|---|---|---|---|---|---|---|",
]


def curve_bands(records: Sequence[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Per rule with validation curves: the mean over seeds of the validation accuracy (%) at each epoch and its sd
    (0 where one run reaches that epoch); runs of different lengths count where they have the epoch."""
    bands = {}
    for rec in records:
        curves = [r["val_acc"] for r in rec["runs"] if r.get("val_acc")]
        if not curves:
            continue
        mean, sd = [], []
        for e in range(max(map(len, curves))):
            values = [100.0 * c[e] for c in curves if e < len(c)]
            mean.append(statistics.mean(values))
            sd.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        bands[rec["rule"]] = (mean, sd)
    return bands


def plot_curves(records: Sequence[dict], path: Path) -> Path | None:
    """Validation accuracy against epoch of the fully connected rows, one line per rule with a band of ± one sd over
    seeds, written to ``path``; None (nothing written) when no record has curves."""
    bands = curve_bands([rec for rec in records if rec["rule"] not in CNN + LENET])
    if not bands:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 4.2))
    for rule, (mean, sd) in bands.items():
        epochs = range(1, len(mean) + 1)
        for a in (ax, zoom):
            (line,) = a.plot(epochs, mean, label=rule, lw=1.3)
            a.fill_between(epochs, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                           color=line.get_color(), alpha=0.2, lw=0)  # fmt: skip
    best = max(max(m) for m, _ in bands.values())
    zoom.set_ylim(best - 6, best + 0.5)
    ax.set_title("MNIST validation accuracy (mean ± sd over seeds)")
    zoom.set_title("the same, top 6 points")
    for a in (ax, zoom):
        a.set_xlabel("epoch")
        a.set_ylabel("validation accuracy %")
        a.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(records: Sequence[dict], figure: Path | None = None) -> str:
    """The Markdown block (without markers) of the per-rule records (:func:`read_records`); ``figure``: the
    curves figure to show below the table (a path whose last two parts are its link from the Markdown file)."""
    fc = [rec for rec in records if rec["rule"] not in CNN + LENET]
    cnn = [rec for rec in records if rec["rule"] in CNN]
    cnn_table = [
        "",
        "### MNIST, a small convolutional network (`configs/mnist/cnn_*.yaml`)",
        "",
        "conv 5x5 1->16 + 2x2 max-pool, conv 5x5 16->32 + 2x2 max-pool, dense 1568->256, dense 256->10, tanh, biases, "
        "orthogonal initial weights; AdamW 1e-3 to 5 % over 10 epochs; same split, batch and scoring as above. "
        "LeeDTP's convolutions learn from difference targets through learned transposed convolutions.",
        "",
        *HEAD,
        *_rows(cnn),
    ] if cnn else []
    return "\n".join([
        "### MNIST, fully connected 784-256-256-256-256-256-10 (thesis table 3.1, Bartunov et al. 2018)",
        "",
        "tanh hidden layers (each row names its activation and initialisation), linear output (logits), cross-entropy, "
        "55k/5k train/validation split of the training "
        "images (`split_seed` 0), batch 128; test error on the 10k test images with the weights of the best "
        "validation-accuracy epoch. Time per epoch: wall time of the run (training, validation and the final test) "
        "divided by the epochs run. Rows sorted by test error; one row per rule, from the latest invocation for that rule, "
        "the error as mean ± sd over its seeds.",
        "",
        *HEAD,
        *_rows(fc),
        *(["", f"![validation accuracy against epoch, mean ± sd over seeds]({Path(*figure.parts[-2:]).as_posix()})"] if figure else []),
        "",
        "Thesis table 3.1 (numbers of Bartunov et al. 2018 as quoted in the thesis; Adam, best of 500 epochs). Its CIFAR-10 "
        "column (fully connected 3072-1024-1024-1024-10) is not run here: CIFAR-10 is not on this project's machines. "
        "`tplightning.CIFAR10DataModule` and `configs/cifar10/` (BP, LeeDTP) run it where the data is.",
        "",
        "| rule (thesis) | MNIST test error % | CIFAR-10 test error % |",
        "|---|---|---|",
        *(f"| {n} | {e} | {c} |" for n, e, c in THESIS),
        *cnn_table,
        *lenet_table(records),
    ])  # fmt: skip


def lenet_table(records: Sequence[dict]) -> list[str]:
    """The Markdown lines of the LeNet-5 section (empty without LeNet rows): our runs, then our mean error beside
    biotorch's published one per rule."""
    lenet = [rec for rec in records if rec["rule"] in LENET]
    if not lenet:
        return []
    epochs = sorted({rec["epochs"] for rec in lenet if rec["epochs"] is not None})
    ours = {}
    for rec in lenet:
        errs = [r["test_error"] for r in rec["runs"] if not r["diverged"] and r["test_error"] is not None]
        ours[rec["rule"]] = f"{_fmt(errs)} ({len(errs)} seed{'s' * (len(errs) != 1)}, {rec['epochs']} epochs)" if errs else "–"
    return [
        "",
        "### LeNet-5 on MNIST, beside biotorch (`configs/mnist/lenet_*.yaml`)",
        "",
        "biotorch's LeNetMNIST written as torch modules and converted into blocks (conv 5x5 1->6 with padding 2 on the 28x28 "
        "images, ReLU, max-pool 2; conv 5x5 6->16, ReLU, max-pool 2; conv 5x5 16->120, ReLU; linear 120->84, ReLU; "
        "linear 84->10), torch's default initial weights; SGD with momentum 0.9 and weight decay 1e-3, batch 64, the "
        "learning rate divided by 10 at 50 % and 75 % of the epochs run "
        f"({', '.join(map(str, epochs))} epochs here against biotorch's 100: this machine's CPU budget; the configs' headers "
        "and docs/RESULTS.md's LeNet section say how they and the learning rates were chosen); same 55k/5k split, scoring "
        "and selection on the validation images as above.",
        "",
        *HEAD,
        *_rows(lenet),
        "",
        "| rule | test error % here (mean ± sd) | biotorch, published (one run, 100 epochs, best epoch chosen on the test set) |",
        "|---|---|---|",
        *(f"| {name} | {ours.get(f'LeNet-{name}', '–')} | {BIOTORCH_LENET.get(name, 'not in biotorch')} |" for name, _ in LENET_RULES),
    ]


def read_records(out: Path) -> list[dict]:
    """The rows of the MNIST table of the Markdown file ``out``: the latest record of each rule in
    ``data/mnist_table.jsonl`` beside it, in the order of :data:`RULES` (empty if none)."""
    return _ordered(common.newest(common.read_records(common.data_file(out, ROWS), ROW_KIND), key=lambda rec: rec["rule"]).values())


def write_rows(out: Path, rows: Sequence[dict]) -> None:
    """Append each of ``rows`` that differs from its rule's current row to the table's records beside ``out``."""
    current = {rec["rule"]: rec for rec in read_records(out)}
    for row in rows:
        if current.get(row["rule"]) != row:
            common.append_record(common.data_file(out, ROWS), ROW_KIND, row)


# --------------------------------------------------------------------------------------------- time to accuracy
#: validation accuracies the time-to-accuracy table reports
THRESHOLDS = (0.97, 0.98, 0.983)
#: the time-to-accuracy figure, relative to the folder of ``--out``
TTA_FIGURE = Path("figures") / "mnist_time_to_accuracy.png"


def batches_per_epoch(run: dict, config: str) -> int:
    """Training batches per epoch of ``run``: recorded (:class:`ValTimer`'s runs), else ``ceil(num_train / batch_size)``
    from its config (the data module keeps the last, smaller batch)."""
    if run.get("batches_per_epoch"):
        return int(run["batches_per_epoch"])
    return math.ceil(config_value(config, (), "data.init_args.num_train") / config_value(config, (), "data.init_args.batch_size"))


def curve_points(run: dict, config: str) -> list[tuple[int, float, float]]:
    """``[(batches trained, seconds, validation accuracy)]`` of ``run`` at each of its validations, in order.

    Runs with :class:`ValTimer` points use them (measured training seconds, validation excluded). Older runs have one
    accuracy per epoch and only the run's total time: epoch ``e`` is put at ``e * seconds_per_epoch`` seconds (the run's
    wall time, validation, checkpoints and the final test included, divided by its epochs) and ``e * batches_per_epoch``
    batches. A diverged or failed run has none.

    >>> curve_points({"val_acc": [0.9, 0.95], "seconds_per_epoch": 4.0, "batches_per_epoch": 430}, "mnist/bp.yaml")
    [(430, 4.0, 0.9), (860, 8.0, 0.95)]
    """
    if run.get("val_points"):
        return [(int(b), float(t), float(a)) for b, t, a in run["val_points"]]
    if not run.get("val_acc") or not run.get("seconds_per_epoch"):
        return []
    bpe, spe = batches_per_epoch(run, config), float(run["seconds_per_epoch"])
    return [(e * bpe, e * spe, float(a)) for e, a in enumerate(run["val_acc"], start=1)]


def time_to(points: Sequence[tuple[int, float, float]], threshold: float) -> tuple[int, float] | None:
    """``(batches, seconds)`` at the first validation whose accuracy is at least ``threshold``; None if none is.

    >>> time_to([(430, 4.0, 0.96), (860, 8.0, 0.981)], 0.98), time_to([(430, 4.0, 0.96)], 0.98)
    ((860, 8.0), None)
    """
    return next(((b, t) for b, t, a in points if a >= threshold), None)


def censored_median(values: Sequence[float | None]) -> float:
    """The median of ``values`` over all seeds, a seed that never reached the threshold (None) counted as infinitely
    slow: finite when more than half of the seeds reached it (then it is the median of all seeds, not of those that
    reached), ``inf`` otherwise. Never the median of the reaching seeds alone, which would flatter a rule that often fails.

    >>> censored_median([10.0, None, 30.0]), censored_median([10.0, None, None]), censored_median([])
    (30.0, inf, inf)
    """
    if not values:
        return math.inf
    return statistics.median([math.inf if v is None else v for v in values])


def time_to_accuracy(records: Sequence[dict]) -> list[dict]:
    """Per rule (the table's rows ``records``, fully connected only): for every threshold, each seed's ``(batches,
    seconds)`` or None, and the censored medians over seeds (:func:`censored_median`)."""
    out = []
    for rec in records:
        if rec["rule"] in CNN:
            continue
        runs = [r for r in rec["runs"] if not r["diverged"] and r["test_error"] is not None]
        per_seed = {r["seed"]: curve_points(r, rec["config"]) for r in runs}
        row = {"rule": rec["rule"], "config": rec["config"], "epochs": rec["epochs"], "seeds": sorted(per_seed), "machine": rec["machine"],
               "diverged": sum(bool(r["diverged"]) for r in rec["runs"]), "runs": len(rec["runs"]),
               "test_errors": [r["test_error"] for r in runs], "seconds_per_epoch": [r["seconds_per_epoch"] for r in runs if r["seconds_per_epoch"]],
               "measured": sum(bool(r.get("val_points")) for r in runs), "val_every": sorted({r.get("val_every") for r in runs if r.get("val_every")}),
               "thresholds": {}}  # fmt: skip
        for th in THRESHOLDS:
            hits = {seed: time_to(points, th) for seed, points in per_seed.items()}
            hits.update({r["seed"]: None for r in rec["runs"] if r["diverged"]})  # a diverged seed never reaches it
            row["thresholds"][th] = {
                "per_seed": hits, "reached": sum(h is not None for h in hits.values()), "of": len(hits),
                "seconds": censored_median([None if h is None else h[1] for h in hits.values()]),
                "batches": censored_median([None if h is None else h[0] for h in hits.values()]),
            }
        out.append(row)
    return out


def _tta_cell(entry: dict, bp: dict | None) -> str:
    count = f"{entry['reached']}/{entry['of']}"
    if not math.isfinite(entry["seconds"]):
        return f"not reached ({count})"
    ratio = f" ({entry['seconds'] / bp['seconds']:.1f}× BP)" if bp is not None and math.isfinite(bp["seconds"]) else ""
    return f"{entry['seconds']:.0f} s{ratio} · {entry['batches'] / 1000:.1f}k ({count})"


def render_tta(rows: Sequence[dict], figure: Path | None = None) -> str:
    """The Markdown block (without markers) of the time-to-accuracy table of :func:`time_to_accuracy`'s ``rows``."""
    bp = next((r for r in rows if r["rule"] == "BP"), None)
    head = ["| rule | epochs | " + " | ".join(f"to {100 * th:g} %: seconds (× BP) · batches (seeds reached)" for th in THRESHOLDS)
            + " | test error % | s/epoch | how timed |", "|---|---|" + "---|" * len(THRESHOLDS) + "---|---|---|"]  # fmt: skip
    body = []
    for r in rows:
        cells = [_tta_cell(r["thresholds"][th], bp["thresholds"][th] if bp else None) for th in THRESHOLDS]
        k, n = r["measured"], len(r["test_errors"])
        how = "measured" if k == n and n else "per epoch, derived" if not k else f"measured ({k} of {n} seeds; the others per epoch, derived)"
        how += f", val every {', '.join(map(str, r['val_every']))} batches" if r["val_every"] else ""
        err = _fmt(r["test_errors"]) + (f" ({r['diverged']}/{r['runs']} diverged)" if r["diverged"] else "")
        key = r["thresholds"][0.98]["seconds"]
        body.append((key, f"| {r['rule']} | {r['epochs']} | " + " | ".join(cells) + f" | {err} | {_fmt(r['seconds_per_epoch'], 1)} | {how} |"))
    body.sort(key=lambda kv: kv[0])
    seeds = ["", "Per seed, seconds to 98 % (– never reached):", "", "| rule | " + " | ".join(["seeds"]) + " |", "|---|---|"]
    for r in rows:
        per = r["thresholds"][0.98]["per_seed"]
        seeds.append(f"| {r['rule']} | " + ", ".join(f"{s}: {'–' if h is None else f'{h[1]:.0f}'}" for s, h in sorted(per.items())) + " |")
    machines = sorted({r["machine"] for r in rows})
    return "\n".join([
        "### MNIST: time to accuracy (fully connected 784-256x5-10)",
        "",
        "From the MNIST table's runs (its records, `docs/data/mnist_table.jsonl`; no run of its own): for each rule the wall time "
        "and the training batches until the validation accuracy first reaches 97 %, 98 % and 98.3 %, as the median over its "
        "seeds, and that median over BP's (× BP, this table's BP row). A seed that never reaches a threshold within its "
        "epochs counts as infinitely slow, so the median is over all seeds and is shown only when more than half of them "
        "reached the threshold (\"not reached\" otherwise); the reaching seeds are counted in brackets. How timed: *per epoch, "
        "derived* runs were recorded with one validation per epoch and their total time only, so epoch e sits at e × "
        "(the run's wall time, validation, checkpoints and the final test included, / its epochs); *measured* runs "
        "(recorded with the benchmark's `ValTimer`) carry the training time at every validation, validation time excluded, "
        "and with `--val-every N` points within the epoch. Rows sorted by the time to 98 %. Runs have the epochs of their "
        "config (FW-DTP and CCL: 20; the others: 100), so a rule that needs more epochs than it ran is \"not reached\". "
        "The seconds depend on the load of the shared machine while a run ran (compare the s/epoch column with the trainer "
        "speed table's epoch, measured paired with BP); the batches do not.",
        "",
        *head,
        *(row for _, row in body),
        *seeds,
        *(["", f"![validation accuracy against training time, mean ± sd over seeds]({Path(*figure.parts[-2:]).as_posix()})"] if figure else []),
        "",
        "Machines (as the records name them, per row): " + " | ".join(machines) + ".",
        "",
        f"Command: `{PROG} --rewrite` (rewrites this block and the MNIST table from the records).",
    ])  # fmt: skip


def tta_bands(rows: Sequence[dict], records: Sequence[dict], grid: Sequence[float]) -> dict[str, tuple[list[float], list[float], list[float]]]:
    """Per rule: ``(times, mean, sd)`` of the validation accuracy (%) over seeds on ``grid`` (seconds), each seed's curve a
    step function (the accuracy of its last validation at or before the time), up to the time every seed still has a
    point."""
    by_rule = {rec["rule"]: rec for rec in records}
    bands = {}
    for row in rows:
        rec = by_rule[row["rule"]]
        curves = [curve_points(r, rec["config"]) for r in rec["runs"] if not r["diverged"] and r["test_error"] is not None]
        curves = [c for c in curves if c]
        if not curves:
            continue
        start, end = max(c[0][1] for c in curves), min(c[-1][1] for c in curves)
        ts = [t for t in grid if start <= t <= end]
        mean, sd = [], []
        for t in ts:
            values = [100.0 * next(a for b, tt, a in reversed(c) if tt <= t) for c in curves]
            mean.append(statistics.mean(values))
            sd.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        if ts:
            bands[row["rule"]] = (ts, mean, sd)
    return bands


def plot_tta(rows: Sequence[dict], records: Sequence[dict], path: Path) -> Path | None:
    """Validation accuracy against training time (log scale), one line per rule (mean over seeds, band ± one sd), with
    the 98 % line, written to ``path``; None (nothing written) when no run has a curve."""
    times = [t for rec in records if rec["rule"] not in CNN for r in rec["runs"] for _, t, _ in curve_points(r, rec["config"])]
    if not times:
        return None
    lo, hi = min(times), max(times)
    grid = [lo * (hi / lo) ** (k / 400) for k in range(401)]
    bands = tta_bands(rows, records, grid)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.get_cmap("tab20").colors
    for k, (rule, (ts, mean, sd)) in enumerate(bands.items()):
        (line,) = ax.plot(ts, mean, label=rule, lw=1.3, color=colors[(2 * k) % 20 + (2 * k) // 20], ls=("-", "--", ":")[k % 3])
        ax.fill_between(ts, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)], color=line.get_color(), alpha=0.15, lw=0)
    ax.axhline(98.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_ylim(93, 99)
    ax.set_xlabel("wall time, seconds (one torch thread; see the table for how each rule was timed)")
    ax.set_ylabel("validation accuracy %")
    ax.set_title("MNIST 784-256x5-10: validation accuracy against time (mean ± sd over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_tta(out: Path, records: Sequence[dict]) -> list[dict]:
    """Write the time-to-accuracy block (``mnist-tta``) of ``out`` and its figure from the table's ``records``."""
    rows = time_to_accuracy(records)
    figure = plot_tta(rows, records, out.parent / TTA_FIGURE) if rows else None
    common.write_block(out, "mnist-tta", render_tta(rows, figure))
    return rows


# --------------------------------------------------------------------------------------------- CLI
def _rule_name(name: str, p: argparse.ArgumentParser) -> str:
    by_stem = {Path(r.config).stem: r.name for r in RULES.values()}
    lower = {n.lower(): n for n in RULES}
    key = by_stem.get(name) or lower.get(name.lower())
    if key is None:
        p.error(f"unknown rule {name!r}; choose from {sorted(RULES)} (or config names {sorted(by_stem)})")
    return key


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", nargs="+", help=f"rules to run (default: all): {' '.join(RULES)}, or config names")
    p.add_argument("--epochs", type=int, help="epochs of every run (default: each config's max_epochs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes, one torch thread each when > 1 (default: 1)")
    p.add_argument("--out", type=Path, default=common.RESULTS, help="Markdown file (default: %(default)s)")
    p.add_argument("--subset", type=int, help="smoke runs: use only this many training images")
    p.add_argument("--num-train", type=int, help="smoke runs: training images")
    p.add_argument("--num-val", type=int, help="smoke runs: validation images")
    p.add_argument("--data-dir", help="MNIST folder (default: the data cache, $TPLIGHTNING_DATA)")
    p.add_argument("--val-every", type=int, metavar="N",
                   help="also evaluate the validation set every N training batches (Lightning's val_check_interval; part of the run's key), "
                        "for time to accuracy within the epoch")
    p.add_argument("--json", type=Path, help="also write the per-run results here")
    p.add_argument("--record", type=Path,
                   help="record file of finished runs; recorded runs are not trained again (default: data/mnist_runs.jsonl beside --out)")
    p.add_argument("--rerun", action="store_true", help="train every run even if recorded (and record it again)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    p.add_argument("--rewrite", action="store_true",
                   help="run nothing: rewrite the block of --out from the run records it keeps (after a change of the table's layout)")
    p.add_argument("--verify", type=int, metavar="EPOCHS",
                   help="run nothing new: rerun the first EPOCHS epochs of the selected recorded runs and compare them with the record")
    args = p.parse_args(argv)
    args.rules = list(dict.fromkeys(_rule_name(r, p) for r in (args.rules or RULES)))
    if args.record is None:
        args.record = common.data_file(args.out, RECORD.name)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.val_every is not None and args.val_every < 1:
        p.error(f"--val-every must be >= 1 batch, got {args.val_every}")
    if args.verify is not None and args.verify < 1:
        p.error(f"--verify must be >= 1 epoch, got {args.verify}")
    return args


def _extra(args) -> tuple[list[str], list[str]]:
    """(train.py overrides, benchmark options) of the smoke-run flags."""
    overrides, options = [], []
    for opt, key, value in (
        ("--subset", "subset", args.subset), ("--num-train", "num_train", args.num_train),
        ("--num-val", "num_val", args.num_val), ("--data-dir", "data_dir", args.data_dir),
    ):  # fmt: skip
        if value is not None:
            overrides += [f"--data.init_args.{key}", str(value)]
            options += [opt, str(value)]
    if args.val_every is not None:
        overrides += ["--trainer.val_check_interval", str(args.val_every)]
        options += ["--val-every", str(args.val_every)]
    return overrides, options


def _ordered(records) -> list[dict]:
    order = list(RULES)
    return sorted(records, key=lambda rec: order.index(rec["rule"]) if rec["rule"] in order else len(order))


def _machine(jobs: int = 1) -> str:
    threads = torch.get_num_threads() if jobs == 1 else 1
    return f"{platform.platform()}, {common.cpu()}; torch {torch.__version__}, jobs {jobs} × {threads} torch thread(s)"


def _report(i: int, n: int, start: float, r: dict, note: str = "") -> None:
    score = r["error"] if r["test_error"] is None else f"test error {r['test_error']:.2f}% (best epoch {r['best_epoch']}/{r['epochs_run']})"
    print(f"[{i}/{n} {time.perf_counter() - start:.0f}s] {r['rule']} seed {r['seed']}: {score} ({r['seconds']:.0f}s){note}", flush=True)


def _verify(args, done: dict, todo: list) -> list[dict]:
    """``--verify``: each recorded run of ``done`` rerun for ``args.verify`` epochs; exits with 1 if any differs."""
    common.quiet()
    here, differ = _machine(1), 0
    for rule, _, seed, *_ in todo:
        print(f"{rule} seed {seed}: not recorded in {args.record}")
    for (rule, _, seed, *_), rec in done.items():
        problem = verify_run(rec, args.verify)
        if problem is None:
            n = args.verify
            print(f"{rule} seed {seed}: same over {n} epoch{'s' * (n > 1)} ({', '.join(map(str, rec['val_acc'][:n]))})", flush=True)
            continue
        differ += 1
        print(f"{rule} seed {seed}: {problem}\n  recorded on: {rec.get('machine')}\n  here:        {here}", flush=True)
        theirs, ours = (re.search(r"torch kernels (\w+)", m or "") for m in (rec.get("machine"), here))
        if theirs and ours and theirs[1] != ours[1]:
            print(f"  other kernels: rerun with ATEN_CPU_CAPABILITY={theirs[1].lower()}", flush=True)
    if differ:
        print(f"{differ} of {len(done)} runs differ from the record. The same code and seed give other float32 results under other "
              "CPU kernels: set ATEN_CPU_CAPABILITY (avx2, avx512, default) to the record's kernels (docs/guide.md, 'Reproducing a "
              "recorded run exactly').")  # fmt: skip
        raise SystemExit(1)
    return list(done.values())


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the selected rules and seeds (taking recorded runs from ``--record``), write the MNIST block of ``--out``
    and the curves figure beside it; returns the per-run results."""
    args = parse_args(argv)
    figure = args.out.parent / FIGURE
    if args.rewrite:
        records = read_records(args.out)
        common.write_block(args.out, "mnist", render(records, plot_curves(records, figure)))
        write_tta(args.out, records)
        print(f"rewrote the MNIST and time-to-accuracy blocks of {args.out} from its {len(records)} rule records in {common.data_file(args.out, ROWS)}")
        return []
    overrides, options = _extra(args)
    tasks = [(r, RULES[r].config, s, args.epochs, tuple(overrides)) for r in args.rules for s in args.seeds]
    recorded = {} if args.rerun else read_runs(args.record)
    done = {t: recorded[k] for t in tasks if (k := run_key(*t)) in recorded}
    todo = [t for t in tasks if t not in done]
    if args.verify is not None:
        return _verify(args, done, todo)
    if args.dry_run:
        for rule, config, seed, epochs, ov in tasks:
            state = "recorded" if (rule, config, seed, epochs, ov) in done else "python train.py " + shlex.join(run_args(config, seed, epochs, ov))
            print(f"{rule} seed {seed}: {state}")
        print(f"{len(todo)} runs to do, {len(done)} recorded in {args.record}")
        return []
    common.quiet()
    results, start = [], time.perf_counter()
    for i, r in enumerate(done.values(), start=1):
        results.append(r)
        _report(i, len(tasks), start, r, f", recorded {r['date']}")
    for i, r in enumerate(common.run_all(_run_task, todo, args.jobs), start=len(done) + 1):
        results.append(r)
        if r["error"] is None or r["diverged"]:
            record_run(args.record, r, _machine(args.jobs))
            r.setdefault("date", date.today().isoformat())  # the record's date: a row's date is its runs' latest, read back or not
        _report(i, len(tasks), start, r)
    records, rows = {rec["rule"]: rec for rec in read_records(args.out)}, []
    for rule in args.rules:
        runs = sorted((r for r in results if r["rule"] == rule), key=lambda r: r["seed"])
        config = RULES[rule].config
        epochs = args.epochs if args.epochs is not None else config_value(config, (), "trainer.max_epochs")
        machines = dict.fromkeys(r.get("machine") or _machine(args.jobs) for r in runs)
        records[rule] = {
            "rule": rule,
            "config": config,
            "hparams": hyper_parameters(config, overrides),
            "command": command(rule, args.epochs, args.seeds, options),
            "date": max(r.get("date") or date.today().isoformat() for r in runs),
            "machine": "; ".join(machines),
            "epochs": epochs,
            "runs": [{**{k: r.get(k) for k in RUN_FIELDS}, **{k: r[k] for k in OPTIONAL_RUN_FIELDS if r.get(k) is not None}} for r in runs],
        }
        rows.append(records[rule])
    write_rows(args.out, rows)
    records = _ordered(records.values())
    common.write_block(args.out, "mnist", render(records, plot_curves(records, figure)))
    for row in write_tta(args.out, records):
        if row["rule"] in args.rules:
            for th in THRESHOLDS:
                per = ", ".join(f"seed {s}: " + ("not reached" if h is None else f"{h[1]:.0f} s, {h[0]} batches") for s, h in row["thresholds"][th]["per_seed"].items())
                print(f"{row['rule']} to {100 * th:g} %: {per}")
    print(f"wrote the MNIST and time-to-accuracy blocks to {args.out}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"done: {len(todo)} runs trained, {len(done)} taken from {args.record}, in {time.perf_counter() - start:.0f}s wall")
    return results


if __name__ == "__main__":
    main()
