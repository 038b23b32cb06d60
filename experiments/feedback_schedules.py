"""Feedback schedules on MNIST: what spending fewer feedback updates saves in time and costs in alignment.

Each rule that learns its feedback weights runs its tuned MNIST config (``tplightning/configs/mnist/<rule>.yaml``,
784-256x5-10) as it is (``full``) and with a :class:`~tplightning.schedules.FeedbackSchedule`
(``model.init_args.feedback_schedule``):

* ``every2``, ``every4``: feedback updates on every 2nd / 4th batch;
* ``decreasing``: the config's ``feedback_iterations`` per batch at the start, a quarter of it after half the epochs
  (linear; a count below one spreads over the batches);
* ``stopping``: the stopping rule with ``plateau=0`` and ``rest=3``: an update whose feedback loss is not above the
  running mean of the losses of the updates taken is skipped, with the next 3 batches;
* ``closed-form`` (DDTP-linear only): ``Q_i = (W_L ... W_{i+1})^dagger`` set at every batch instead of trained.

BP runs beside them, in the same invocation, for the time ratios. Each run is :func:`benchmarks.mnist.run_one` (the
benchmark's run: its :class:`~benchmarks.mnist.ValTimer` measures the training seconds at every validation, validation
excluded) with ``--epochs`` epochs (the learning rate decays over them) and an :class:`AngleLog`, the library's
:class:`~tplightning.diagnostics.TargetPropDiagnostics` every ``--diag-every`` batches on 64 samples, which keeps the
angles to ``e^BP`` and ``e^GN`` per hidden layer (degrees, from ``diag/cos_bp_i`` and ``diag/cos_gn_i``) and its own
seconds, which are taken off the training seconds. Every finished run is appended to ``<out>/feedback_schedules_runs.jsonl``
(checksummed lines); a run recorded with the same settings is not run again, so an interrupted invocation resumes.

    python -m experiments.feedback_schedules [--rules BP DDTPLinear DRL] [--variants full every2 ...] [--seeds 0 1]
        [--epochs 20] [--diag-every 215] [--out DIR] [--subset N --num-train N --num-val N] [--docs]

``--docs`` writes the table (per rule and variant: seconds per epoch, feedback optimizer steps per epoch, time to 97 %
and 98 % validation accuracy with its ratio to BP's of the same invocation, final test error, the angle to ``e^BP`` per
layer and to ``e^GN`` averaged over the layers, both over the last half of training) between the markers
``<!-- feedback_schedules:start/end -->`` of docs/experiments.md, from the records in ``--out``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

from tplightning.diagnostics import TargetPropDiagnostics

from benchmarks import common
from benchmarks.common import config_value
from benchmarks.mnist import censored_median, run_one, time_to
from experiments.common import REPO, single_thread

NAME = "feedback_schedules"
RECORDS = "feedback_schedules_runs.jsonl"
CONFIGS = {"BP": "mnist/bp.yaml", "DDTPLinear": "mnist/ddtp_linear.yaml", "DRL": "mnist/drl.yaml", "LDRL": "mnist/ldrl.yaml"}
VARIANTS = ("full", "every2", "every4", "decreasing", "stopping", "closed-form")
THRESHOLDS = (0.97, 0.98)


def schedule(variant: str, rule: str, epochs: int) -> dict | None:
    """The ``FeedbackSchedule`` arguments of ``variant`` for ``rule`` (None: the config as it is); raises ValueError for a
    variant the rule does not take (BP has none; the closed form is DDTP-linear's)."""
    if variant == "full":
        return None
    if rule == "BP" or (variant == "closed-form" and rule != "DDTPLinear"):
        raise ValueError(f"{rule} has no variant {variant}")
    try:
        base = config_value(CONFIGS[rule], (), "model.init_args.feedback_iterations")
    except KeyError:  # the rule's default
        base = inspect.signature(common.rule_class(CONFIGS[rule])).parameters["feedback_iterations"].default
    return {"every2": {"every": 2}, "every4": {"every": 4},
            "decreasing": {"iterations": base, "final_iterations": base / 4, "decay_epochs": max(1, epochs // 2)},
            "stopping": {"plateau": 0.0, "rest": 3}, "closed-form": {"closed_form": True}}[variant]  # fmt: skip


class AngleLog(TargetPropDiagnostics):
    """:class:`~tplightning.diagnostics.TargetPropDiagnostics` that also times itself (its seconds up to each validation,
    to take off the training seconds), counts the feedback optimizer's steps and writes all of it to ``path`` (JSON)
    when training ends."""

    def __init__(self, path: str, every_n_steps: int = 215, max_samples: int = 64):
        super().__init__(every_n_steps=every_n_steps, max_samples=max_samples)
        self.path, self.spent, self.at_validation, self.feedback_steps = path, 0.0, [], 0

    def on_train_start(self, trainer, pl_module):
        if len(trainer.optimizers) > 1:
            trainer.optimizers[1].register_step_post_hook(lambda *_: setattr(self, "feedback_steps", self.feedback_steps + 1))
        elif not hasattr(pl_module, "feedback_schedule"):
            self.feedback_steps = None  # BP: no feedback weights (the closed form has none to step either, and counts 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.spent += time.perf_counter() - start

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.at_validation.append(round(self.spent, 3))

    def on_train_end(self, trainer, pl_module):
        Path(self.path).write_text(json.dumps({"history": self.history, "diag_seconds": self.at_validation,
                                               "feedback_steps": self.feedback_steps}))  # fmt: skip


RUN_KIND = common.Kind(
    "feedback-schedule-run",
    {"rule": "str", "variant": "str", "seed": "int", "epochs": "int", "data": "list", "schedule": "object|null",
     "diverged": "bool", "error": "str|null", "test_error": "number|null", "best_val_acc": "number|null",
     "seconds_per_epoch": "number|null", "val_points": "list|null", "feedback_steps": "int|null", "angles": "list",
     "machine": "str", "args": "list"},
    key=("rule", "variant", "seed", "epochs", "data"),
)  # fmt: skip


def _degrees(cos: float) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def run_variant(rule: str, variant: str, seed: int, epochs: int, data: list[str], diag_every: int) -> dict:
    """One run; its record."""
    sched = schedule(variant, rule, epochs)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "angles.json"
        angle_log = {"class_path": "experiments.feedback_schedules.AngleLog", "init_args": {"path": str(log), "every_n_steps": diag_every}}
        overrides = [*data, f"--trainer.callbacks+={json.dumps(angle_log)}"]
        if sched is not None:
            overrides += ["--model.init_args.feedback_schedule", json.dumps({"class_path": "tplightning.FeedbackSchedule", "init_args": sched})]
        r = run_one(rule, CONFIGS[rule], seed, epochs, overrides)
        logged = json.loads(log.read_text()) if log.is_file() else {"history": [], "diag_seconds": [], "feedback_steps": None}
    points = r.get("val_points")
    if points:  # the diagnostics' own seconds (up to each validation) are not training
        spent = logged["diag_seconds"] or [0.0]
        points = [[b, round(t - spent[min(k, len(spent) - 1)], 3), a] for k, (b, t, a) in enumerate(points)]
    angles = []
    for h in logged["history"]:
        layers = sorted(int(k.rsplit("_", 1)[1]) for k in h if k.startswith("diag/cos_bp_"))
        angles.append({"step": h["step"], "epoch": h["epoch"], "bp": [_degrees(h[f"diag/cos_bp_{i}"]) for i in layers],
                       "gn": [_degrees(h[f"diag/cos_gn_{i}"]) for i in layers if f"diag/cos_gn_{i}" in h]})  # fmt: skip
    steps = logged["feedback_steps"]
    return {"rule": rule, "variant": variant, "seed": seed, "epochs": epochs, "data": list(data), "schedule": sched,
            "diverged": r["diverged"], "error": r["error"], "test_error": r["test_error"], "best_val_acc": r["best_val_acc"],
            "seconds_per_epoch": r["seconds_per_epoch"], "val_points": points, "val_acc": r["val_acc"],
            "feedback_steps": steps, "angles": angles, "machine": common.machine(), "args": r["args"]}  # fmt: skip


# --------------------------------------------------------------------------------------------- summary
def _fmt_time(seconds: float, bp: float | None, batches: float) -> str:
    if not math.isfinite(seconds):
        return "not reached"
    ratio = f" ({seconds / bp:.2f}×)" if bp and math.isfinite(bp) else ""
    return f"{seconds:.0f} s{ratio}, {batches:.0f} b"


def summarise(records: list[dict]) -> list[dict]:
    """Per rule and variant (in the order of :data:`CONFIGS` and :data:`VARIANTS`): the seeds, medians of the seconds per
    epoch (training seconds of the last validation over the epochs) and of the feedback steps per epoch, censored
    medians of the times to each threshold, the test errors, and the angles per layer averaged over the logs of the last
    half of training and over the seeds."""
    rows = []
    for rule in CONFIGS:
        for variant in VARIANTS:
            runs = [r for r in records if r["rule"] == rule and r["variant"] == variant]
            if not runs:
                continue
            ok = [r for r in runs if not r["diverged"] and r["val_points"]]
            row = {"rule": rule, "variant": variant, "seeds": sorted(r["seed"] for r in runs), "diverged": len(runs) - len(ok),
                   "epochs": runs[0]["epochs"]}  # fmt: skip
            if ok:
                row["seconds_per_epoch"] = statistics.median(r["val_points"][-1][1] / r["epochs"] for r in ok)
                steps = [r["feedback_steps"] / r["epochs"] for r in ok if r["feedback_steps"] is not None]
                row["feedback_steps_per_epoch"] = statistics.median(steps) if steps else None
                row["tta"] = {th: censored_median([(time_to(r["val_points"], th) or (None, None))[1] for r in ok] + [None] * row["diverged"])
                              for th in THRESHOLDS}  # fmt: skip
                row["batches_to"] = {th: censored_median([(time_to(r["val_points"], th) or (None, None))[0] for r in ok] + [None] * row["diverged"])
                                     for th in THRESHOLDS}  # fmt: skip
                row["test_error"] = [r["test_error"] for r in ok]
                late = [a for r in ok for a in r["angles"] if a["epoch"] >= r["epochs"] / 2 and a["bp"]]
                if late:
                    row["angle_bp"] = [statistics.fmean(a["bp"][i] for a in late) for i in range(len(late[0]["bp"]))]
                    gn = [statistics.fmean(a["gn"]) for a in late if a["gn"]]
                    row["angle_gn"] = statistics.fmean(gn) if gn else None
            rows.append(row)
    return rows


def docs_block(rows: list[dict], records: list[dict], command: str) -> str:
    """The block of docs/experiments.md: the command, the machine and the table."""
    from experiments.common import markdown_table

    bp = next((r for r in rows if r["rule"] == "BP" and r["variant"] == "full" and "tta" in r), None)
    table = []
    for r in rows:
        if "tta" not in r:
            table.append([r["rule"], r["variant"], ", ".join(map(str, r["seeds"])), "diverged", "–", "–", "–", "–", "–", "–"])
            continue
        errors = r["test_error"]
        err = f"{statistics.fmean(errors):.2f} ± {statistics.stdev(errors):.2f}" if len(errors) > 1 else f"{errors[0]:.2f}"
        steps = r.get("feedback_steps_per_epoch")
        angle = " / ".join(f"{v:.0f}" for v in r["angle_bp"]) if r.get("angle_bp") else "–"
        gn = f"{r['angle_gn']:.0f}" if r.get("angle_gn") is not None else "–"
        table.append([r["rule"], r["variant"], ", ".join(map(str, r["seeds"])) + (f" ({r['diverged']} diverged)" if r["diverged"] else ""),
                      f"{r['seconds_per_epoch']:.2f}", "–" if steps is None else f"{steps:.0f}",
                      *[_fmt_time(r["tta"][th], bp["tta"][th] if bp else None, r["batches_to"][th]) for th in THRESHOLDS], err, angle, gn])  # fmt: skip
    machines = sorted({r["machine"] for r in records})
    return "\n".join([
        f"Command: `{command}`. Machine: {'; '.join(machines)}. One torch thread; all rows from one invocation's records.", "",
        markdown_table(["rule", "variant", "seeds", "s / epoch", "feedback steps / epoch", "time to 97 %", "time to 98 %",
                        "test error %", "∠e^BP per layer (°)", "∠e^GN (°)"], table),  # fmt: skip
        "", "Times: training seconds (validation and the diagnostics excluded) until the validation accuracy first reaches "
        "the threshold, median over seeds (a seed that never does counts as infinitely slow), in brackets its ratio to "
        "BP's row, and the training batches (b) until then (same median). Angles: mean over the diagnostics of the last half of training (64 samples every "
        f"few hundred batches) and over the seeds; layers 1 to L-1 from the input. `feedback steps / epoch`: the feedback "
        "optimizer's steps (none for the closed form, which sets the maps at every batch).",
    ])  # fmt: skip


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__.split("\n")[0])
    p.add_argument("--rules", nargs="+", default=["BP", "DDTPLinear", "DRL"], choices=list(CONFIGS), help="rules (default: %(default)s)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="variants (default: all a rule takes)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per run (default: %(default)s)")
    p.add_argument("--diag-every", type=int, default=215, help="batches between two diagnostics (default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPO / "out" / NAME, help="output folder of the records (default: %(default)s)")
    p.add_argument("--subset", type=int, help="smoke runs: use only this many training images")
    p.add_argument("--num-train", type=int, help="smoke runs: training images")
    p.add_argument("--num-val", type=int, help="smoke runs: validation images")
    p.add_argument("--docs", action="store_true", help="also write the table into docs/experiments.md")
    p.add_argument("--rewrite", action="store_true", help="run nothing: summarise (and with --docs write) the recorded runs of the selection")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse(argv)
    common.quiet()
    data = [f for name in ("subset", "num_train", "num_val") if getattr(args, name) is not None
            for f in (f"--data.init_args.{name}", str(getattr(args, name)))]  # fmt: skip
    path = args.out / RECORDS
    done = {RUN_KIND.key_of(e.record) for e in common.read_records(path, RUN_KIND)}
    wanted = []
    for seed in args.seeds:  # seed by seed: an interrupted campaign has whole seeds of every variant
        for rule in args.rules:
            for variant in args.variants:
                try:
                    schedule(variant, rule, args.epochs)
                except ValueError:
                    continue
                wanted.append({"rule": rule, "variant": variant, "seed": seed, "epochs": args.epochs, "data": data})
    start = time.perf_counter()
    if args.rewrite:
        wanted = [w for w in wanted if RUN_KIND.key_of(w) in done]
    with single_thread():
        for k, key in enumerate(wanted, start=1):
            if RUN_KIND.key_of(key) in done:
                continue
            record = run_variant(**key, diag_every=args.diag_every)
            common.append_record(path, RUN_KIND, record)
            note = "diverged" if record["diverged"] else f"test error {record['test_error']:.2f} %, {record['seconds_per_epoch']:.1f} s/epoch"
            print(f"[{k}/{len(wanted)} {time.perf_counter() - start:.0f}s] {key['rule']} {key['variant']} seed {key['seed']}: {note}", flush=True)
    keys = {RUN_KIND.key_of(w) for w in wanted}
    records = [e.record for e in common.read_records(path, RUN_KIND) if RUN_KIND.key_of(e.record) in keys]
    records = list({RUN_KIND.key_of(r): r for r in records}.values())  # of a run recorded twice, the last
    rows = summarise(records)
    if args.docs:
        from benchmarks.common import write_block
        from experiments.common import DOCS

        seeds = " ".join(map(str, args.seeds))
        command = (f"python -m experiments.{NAME} --rules {' '.join(args.rules)} --seeds {seeds} --epochs {args.epochs} "
                   f"--diag-every {args.diag_every} --out {common.shown(args.out)} --docs")  # fmt: skip
        write_block(DOCS, NAME, docs_block(rows, records, command))
    print(json.dumps(rows, default=str))
    return rows


if __name__ == "__main__":
    main()
