"""The student-teacher comparisons of thesis sections 5.1.3 and 5.2.2, over several seeds.

    python -m benchmarks.student_teacher [--table exact|equal|contracting|deep ...]
        [--seeds N | --seed-list S ...] [--epochs E] [--full] [--jobs J] [--rules R ...]
        [--num-train N] [--out docs/RESULTS.md] [--json PATH] [--dry-run]

Tables: ``exact`` (fig. 5.7, batch 1), ``equal`` (figs. 5.14/5.15, 6-6-6), ``contracting``
(fig. 5.18, 6-6-4) and ``deep`` (fig. 5.13, 6-6-6-6-6-6). Each run is ``python train.py --config
<rule config> <overrides>`` in which one seed ``s`` sets the teacher and its data, the student's
perturbation (:class:`~tplightning.InitNearTeacher`), the shuffling, the randomized layer draws
and the feedback noise; loggers, checkpoints, validation and testing are off. The final weights
are scored on the whole training set and on the test set by the mean squared error over samples
and outputs (what ``test/mse`` reports). A run that diverges (``DivergenceError`` or a
non-finite final MSE) is counted and left out of mean ± sd, as the thesis dropped its exploding
runs. Each table is written between ``<!-- student_teacher:NAME:start/end -->`` markers in
``--out``; the rest of the file is left as it is. Every run is appended, as it finishes, to the record file
``data/student_teacher_runs.jsonl`` beside ``--out`` (checksummed lines, ``common``'s "Run records"): its table,
rule, seed, MSEs, command, date, machine and invocation (the UTC start time and process id of the command that ran
it). A table is rendered from these records alone, each rule's row from the runs of the latest invocation that ran
it, so a later invocation with ``--rules`` replaces the rows of the rules it runs and keeps the others (each with
its command). Every invocation trains: there is no mode that only rewrites a table (:func:`render` does it from
:func:`read_records`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

from tplightning._lightning import pl
import torch

from tplightning.cli import main as cli_main
from tplightning.rules.base import DivergenceError

from benchmarks import common
from benchmarks.common import RESULTS, Rule, config_value, cpu, quiet, run_all, seed_overrides, write_block

__all__ = ["Rule", "Table", "TABLES", "run_args", "run_one", "mse", "main"]

PROG = "python -m benchmarks.student_teacher"
LR_KEY = "model.init_args.forward_optimizer.init_args.lr"
# no loggers, checkpoints, progress bars, validation or test loop: the script scores the final weights itself
QUIET = [
    "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0",
    "--trainer.num_sanity_val_steps", "0", "--test_on", "none",
]  # fmt: skip


@dataclass(frozen=True)
class Table:
    """A thesis comparison: the rules, the overrides shared by all its runs, default seeds and epochs."""

    name: str
    title: str
    rules: tuple[Rule, ...]
    overrides: tuple[str, ...] = ()
    seeds: int = 5
    epochs: int = 60
    note: str = ""


def _sizes(sizes: list[int]) -> tuple[str, ...]:
    return ("--model.init_args.sizes", json.dumps(sizes), "--data.init_args.sizes", json.dumps(sizes))


#: bidirectional FA and DTP's successors (Meulemans et al. 2020, Ernoult et al. 2022), in the "equal" table only
SUCCESSOR_CONFIGS = {"BDFA": "bdfa.yaml", "DRL": "drl.yaml", "DDTPLinear": "ddtp_linear.yaml", "LDRL": "ldrl.yaml"}
AI_CONFIGS = {
    "TPAI": "tp_ai.yaml", "RTPAI": "rtp_ai.yaml", "DTPAI": "dtp.yaml", "RDTPAI": "rdtp_ai.yaml",
    "OriginalTP": "original_tp.yaml", "OriginalRTP": "original_rtp.yaml", "OriginalDTP": "original_dtp.yaml",
    "OriginalRDTP": "original_rdtp.yaml", "BP": "bp.yaml", "BPFixed": "bp_fixed.yaml", "FA": "fa.yaml", "DFA": "dfa.yaml",
}  # fmt: skip
CONTRACTING_LR = {
    "TPAI": 0.09, "RTPAI": 0.09, "DTPAI": 0.1, "RDTPAI": 0.1, "OriginalTP": 0.005, "OriginalRTP": 0.005,
    "OriginalDTP": 0.1, "OriginalRDTP": 0.1, "BP": 0.05, "BPFixed": 0.05, "FA": 0.05, "DFA": 0.05,
}  # fmt: skip

TABLES = {
    t.name: t
    for t in [
        Table(
            "exact",
            "Student-teacher 6-6-6, exact inverses (thesis fig. 5.7, section 5.1.3)",
            (Rule("TPEI", "tp_ei.yaml"), Rule("RTPEI", "rtp_ei.yaml"), Rule("RMTPEI", "rmtp_ei.yaml"),
             Rule("BP", "bp.yaml", 0.001), Rule("BPFixed", "bp_fixed.yaml", 0.001)),
            ("--data.init_args.batch_size", "1", "--data.init_args.num_train", "2000"),
            seeds=3,
            epochs=20,
            note="Learning rates of the fig. 5.7 caption; BP and BPFixed run bp.yaml/bp_fixed.yaml at batch 1 with "
            "2000 training samples. 20 epochs by default for time (the thesis ran 60: `--full`); the learning "
            "rate decays to 1/5 over the epochs actually run.",
        ),  # fmt: skip
        Table(
            "equal",
            "Student-teacher 6-6-6, approximate inverses (thesis figs. 5.14/5.15, section 5.2.2)",
            tuple(Rule(n, c) for n, c in {**AI_CONFIGS, **SUCCESSOR_CONFIGS}.items()),
            note="The committed configs (learning rates of the fig. 5.14/5.15 captions; feedback learning rate "
            "0.01, which the thesis does not give; lambda 0). FA, DFA and BDFA run BP's setting (lr 0.01); DRL, DDTP-linear "
            "and L-DRL (not in the thesis) original DTP's (lr 0.1), with their own feedback losses (configs' headers).",
        ),
        Table(
            "contracting",
            "Student-teacher contracting 6-6-4, approximate inverses (thesis fig. 5.18, section 5.2.2)",
            tuple(Rule(n, c, CONTRACTING_LR[n]) for n, c in AI_CONFIGS.items()),
            _sizes([6, 6, 4]),
            note="Learning rates of the fig. 5.18 caption, which names the non-randomized rules only; each randomized "
            "variant takes its counterpart's rate (RTPAI = TPAI, RDTPAI = DTPAI, OriginalRTP = OriginalTP, "
            "OriginalRDTP = OriginalDTP). Sizes overridden to [6, 6, 4] in model and data.",
        ),
        Table(
            "deep",
            "Student-teacher 6-6-6-6-6-6 (4 hidden layers), approximate inverses (thesis fig. 5.13, section 5.2.2)",
            (Rule("TPAI", "tp_ai.yaml", 1e-4), Rule("RTPAI", "rtp_ai.yaml", 1e-4),
             Rule("BP", "bp.yaml", 5e-6), Rule("BPFixed", "bp_fixed.yaml", 5e-6)),
            (*_sizes([6] * 6), "--data.init_args.num_train", "3840"),
            note="Learning rates exactly as printed in the fig. 5.13 caption (TP-AI = RTP-AI 1e-4, BP = BP-fixed "
            "5e-6), kept although small; the thesis ran a single seed.",
        ),  # fmt: skip
    ]
}


# --------------------------------------------------------------------------------------------- one run
def seed_args(config: str | Path, seed: int) -> list[str]:
    """Overrides that give every random source of a run of ``config`` the seed ``seed``.

    The ``InitNearTeacher`` callback is replaced by passing the whole ``--trainer.callbacks`` list
    (which also drops the config's ``ModelCheckpoint``).
    """
    callbacks = [
        {**cb, "init_args": {**cb.get("init_args", {}), "seed": seed}}
        for cb in config_value(config, (), "trainer").get("callbacks", [])
        if cb["class_path"].rsplit(".", 1)[-1] == "InitNearTeacher"
    ]
    if not callbacks:
        raise ValueError(f"{config} has no InitNearTeacher callback; it is not a student-teacher config")
    return [*seed_overrides(config, seed), "--data.init_args.teacher_seed", str(seed), "--trainer.callbacks", json.dumps(callbacks)]


def run_args(config: str | Path, seed: int, overrides: Sequence[str] = ()) -> list[str]:
    """The ``train.py`` arguments of one quiet run of ``config`` with seed ``seed`` and ``overrides``."""
    return ["--config", str(config), *QUIET, *seed_args(config, seed), *overrides]


@torch.no_grad()
def mse(model: pl.LightningModule, data) -> float:
    """Mean over samples and outputs of ``(model(x) - y)^2`` on a ``TensorData`` (torchmetrics' MSE)."""
    model.eval()
    out = model(data.x.to(model.device, model.dtype))
    return float(torch.nn.functional.mse_loss(out, data.y.to(out.device, out.dtype)))


def run_one(config: str | Path, seed: int, overrides: Sequence[str] = (), keep: bool = False) -> dict:
    """Train ``config`` with seed ``seed`` and ``overrides``; score the final weights.

    Returns ``{"config", "seed", "args", "train_mse", "test_mse", "diverged", "error", "seconds"}``
    (MSEs ``None`` when diverged) and, with ``keep``, the ``LightningCLI`` as ``"cli"``.
    """
    args = run_args(config, seed, overrides)
    result = {"config": str(config), "seed": seed, "args": args, "train_mse": None, "test_mse": None}
    result.update(diverged=False, error=None)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:  # where LightningCLI saves its config.yaml
        try:
            cli = cli_main([*args, "--trainer.default_root_dir", root])["cli"]
        except DivergenceError as err:
            result.update(diverged=True, error=str(err).split(". ")[0])
        else:
            train, test = mse(cli.model, cli.datamodule.train_data), mse(cli.model, cli.datamodule.test_data)
            result.update(train_mse=train, test_mse=test)
            if not (math.isfinite(train) and math.isfinite(test)):
                result.update(diverged=True, error="non-finite final MSE")
            if keep:
                result["cli"] = cli
    result["seconds"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------- many runs
def _run_task(task: tuple[str, str, str, int, tuple[str, ...]]) -> dict:
    table, rule, config, seed, overrides = task
    return {"table": table, "rule": rule, **run_one(config, seed, overrides)}


# --------------------------------------------------------------------------------------------- tables
def _num(x: float, digits: int) -> str:
    s = f"{x:.{digits}g}"
    return f"{float(s):.0f}" if "e+" in s and x < 1e6 else s


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    sd = _num(statistics.stdev(values), 2) if len(values) > 1 else "n/a"
    return f"{_num(statistics.mean(values), 3)} ± {sd}"


def _rule_overrides(table: Table, rule: Rule, epochs: int, num_train: int | None) -> tuple[str, ...]:
    extra = ("--trainer.max_epochs", str(epochs))
    if num_train is not None:
        extra += ("--data.init_args.num_train", str(num_train))
    lr = () if rule.lr is None else ("--" + LR_KEY, str(rule.lr))
    return (*table.overrides, *lr, *extra)


def render(table: Table, rules: Sequence[Rule], results: Sequence[dict]) -> str:
    """The Markdown block of ``table`` (without markers) with the rows of ``rules`` from the run records ``results``
    (:func:`read_records`): everything it shows comes from them and the table's configs."""
    ov = {}
    for rule in rules:  # the data overrides a rule's runs had (--num-train; absent from records before it was kept)
        runs = [r for r in results if r["rule"] == rule.name] or results
        ov[rule.name] = _rule_overrides(table, rule, runs[0]["epochs"], runs[0].get("num_train"))
    first = rules[0]

    def value(rule: Rule, key: str):
        return config_value(rule.config, ov[rule.name], key)

    sizes = sorted({"-".join(map(str, value(r, "model.init_args.sizes"))) for r in rules})
    epochs = sorted({r["epochs"] for r in results})
    commands: dict[str, list[str]] = {}
    for r in results:
        names = commands.setdefault(r["command"], [])
        if r["rule"] not in names:
            names.append(r["rule"])
    if len(commands) == 1:
        command_line = f"Command: `{next(iter(commands))}`"
    else:
        command_line = "Commands (the rows keep the invocation that ran them): " + "; ".join(
            f"`{c}` ({', '.join(names)})" for c, names in commands.items()
        )
    batch, n = value(first, "data.init_args.batch_size"), value(first, "data.init_args.num_train")
    lrs = ", ".join(f"{r.name} {float(value(r, LR_KEY)):g}" for r in rules)
    seeds = sorted({r["seed"] for r in results})
    rows = []
    for rule in rules:
        runs = [r for r in results if r["rule"] == rule.name]
        ok = [r for r in runs if not r["diverged"]]
        train, test = [r["train_mse"] for r in ok], [r["test_mse"] for r in ok]
        config = f"`{rule.config}`" + ("" if rule.lr is None else f", lr {rule.lr:g}")
        key = statistics.mean(test) if test else math.inf
        rows.append((key, f"| {rule.name} | {config} | {_mean_sd(train)} | {_mean_sd(test)} | {len(runs) - len(ok)}/{len(runs)} |"))
    rows.sort(key=lambda kv: kv[0])
    shared = f" Overrides of every run: `{shlex.join(table.overrides)}`." if table.overrides else ""
    return "\n".join([
        f"### {table.title}",
        "",
        f"Setting: {', '.join(sizes)}, leaky-ReLU 0.35 hidden layers, linear output, batch {batch}, "
        f"{math.ceil(n / batch)} batches per epoch, {'/'.join(map(str, epochs))} epochs, seeds {', '.join(map(str, seeds))}; "
        f"forward learning rates (decaying linearly to 1/5): {lrs}.",
        "",
        "| rule | config | final train MSE (mean ± sd) | final test MSE (mean ± sd) | diverged/n |",
        "|---|---|---|---|---|",
        *(row for _, row in rows),
        "",
        f"{table.note}{shared} MSE: mean over samples and outputs of (h_L − y)² with the final weights, on the whole "
        f"training set and on the {value(first, 'data.init_args.num_test')} test samples (torchmetrics' `test/mse`); "
        "sd over seeds (n − 1). Diverged runs "
        "(NaN/inf) are counted and left out of mean ± sd, as the thesis also dropped its exploding runs. Seed s sets "
        "the teacher and its data, the student's perturbation at Frobenius distance 8, the shuffling, the randomized "
        "layer draws and the feedback noise. Rows sorted by mean test MSE.",
        "",
        command_line,
        "",
        f"Run {', '.join(sorted({r['date'] for r in results}))} on {'; '.join(dict.fromkeys(r['machine'] for r in results))}; "
        f"{len(results)} runs, {sum(r['seconds'] for r in results) / 60:.1f} min of run time in total "
        f"(jobs {', '.join(map(str, sorted({r['jobs'] for r in results})))}).",
    ])  # fmt: skip


#: the record file of the runs, beside ``--out`` (``docs/data/`` for ``docs/RESULTS.md``)
RECORDS = "student_teacher_runs.jsonl"
#: a run as the record file keeps it (more fields may be present: ``num_train``, the ``--num-train`` it ran with)
RUN_KIND = common.Kind(
    "student-teacher-run",
    {"table": "str", "rule": "str", "seed": "int", "train_mse": "number|null", "test_mse": "number|null", "diverged": "bool",
     "error": "str|null", "seconds": "number", "epochs": "int", "command": "str", "date": "str", "machine": "str",
     "jobs": "int", "invocation": "str"},
    key=("table", "rule", "invocation", "seed"),
)  # fmt: skip
#: what a record keeps of a run's result
RECORD_KEYS = ("table", "rule", "seed", "train_mse", "test_mse", "diverged", "error", "seconds")


def read_records(out: Path, table: str) -> list[dict]:
    """The runs shown in table ``table`` of the Markdown file ``out``: from the record file beside it, for each rule
    the runs of the latest invocation that ran it (of two records of one run, the later written: ``common.newest``),
    sorted by rule and seed; empty if none."""
    entries = common.read_records(common.data_file(out, RECORDS), RUN_KIND)
    runs = [r for r in common.newest(entries, key=RUN_KIND.key_of).values() if r["table"] == table]
    latest: dict[str, str] = {}
    for r in runs:
        latest[r["rule"]] = max(latest.get(r["rule"], ""), r["invocation"])
    return sorted((r for r in runs if r["invocation"] == latest[r["rule"]]), key=lambda r: (r["rule"], r["seed"]))


def command(args, name: str) -> str:
    """The command that regenerates table ``name`` with the options of ``args``."""
    parts = ["--table", name]
    if args.seed_list:
        parts += ["--seed-list", *map(str, args.seed_list)]
    elif args.seeds is not None:
        parts += ["--seeds", str(args.seeds)]
    for opt, value in (("--epochs", args.epochs), ("--num-train", args.num_train)):
        if value is not None:
            parts += [opt, str(value)]
    if args.full:
        parts.append("--full")
    if args.rules:
        parts += ["--rules", *args.rules]
    if args.out.resolve() != RESULTS:
        parts += ["--out", str(args.out)]
    return f"{PROG} {shlex.join(parts)}"


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--table", action="append", choices=list(TABLES), help="table(s) to run (default: all)")
    p.add_argument("--rules", nargs="+", help="only these rules (class names, e.g. BP DTPAI)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: 3 for exact, 5 otherwise)")
    p.add_argument("--seed-list", type=int, nargs="+", help="explicit seeds (overrides --seeds)")
    p.add_argument("--epochs", type=int, help="epochs (default: 60, exact 20)")
    p.add_argument("--full", action="store_true", help="the thesis' 60 epochs for the exact table too")
    p.add_argument("--num-train", type=int, help="override the number of training samples (smoke tests)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default: %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="Markdown file (default: %(default)s)")
    p.add_argument("--json", type=Path, help="write the per-run numbers here")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    args = p.parse_args(argv)
    args.table = list(dict.fromkeys(args.table or TABLES))
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    known = {r.name for t in args.table for r in TABLES[t].rules}
    if args.rules and set(args.rules) - known:
        p.error(f"unknown rules {sorted(set(args.rules) - known)}; the selected tables have {sorted(known)}")
    args.epochs_of = lambda t: args.epochs or (60 if args.full or t.name != "exact" else t.epochs)
    args.seeds_of = lambda t: args.seed_list or list(range(args.seeds if args.seeds is not None else t.seeds))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Run the selected tables, write them into ``--out``; returns ``{table: [per-run results]}``."""
    args = parse_args(argv)
    plan = {}
    for name in args.table:
        t = TABLES[name]
        rules = [r for r in t.rules if not args.rules or r.name in args.rules]
        if rules:
            plan[name] = (t, rules)
    tasks = [
        (name, r.name, r.config, seed, _rule_overrides(t, r, args.epochs_of(t), args.num_train))
        for name, (t, rules) in plan.items()
        for r in rules
        for seed in args.seeds_of(t)
    ]
    if args.dry_run:
        for name, rule, config, seed, overrides in tasks:
            print(f"[{name}] {rule} seed {seed}: python train.py {shlex.join(run_args(config, seed, overrides))}")
        print(f"{len(tasks)} runs")
        return {}
    quiet()
    results: dict[str, list[dict]] = {name: [] for name in plan}
    start, today = time.perf_counter(), date.today().isoformat()
    invocation = f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%S.%fZ} pid {os.getpid()}"
    machine = f"{platform.platform()}, {cpu()}; torch {torch.__version__}, pytorch-lightning {pl.__version__}"
    for i, r in enumerate(run_all(_run_task, tasks, args.jobs), start=1):
        r.update(epochs=args.epochs_of(TABLES[r["table"]]), command=command(args, r["table"]), date=today)
        results[r["table"]].append(r)
        common.append_record(common.data_file(args.out, RECORDS), RUN_KIND,
                             {**{k: r[k] for k in RECORD_KEYS}, "epochs": r["epochs"], "command": r["command"], "date": today,
                              "machine": machine, "jobs": args.jobs, "invocation": invocation, "num_train": args.num_train})  # fmt: skip
        score = r["error"] if r["diverged"] else f"train {r['train_mse']:.4g} test {r['test_mse']:.4g}"
        print(f"[{i}/{len(tasks)} {time.perf_counter() - start:.0f}s] {r['table']} {r['rule']} seed {r['seed']}: "
              f"{score} ({r['seconds']:.0f}s)", flush=True)  # fmt: skip
    for name, (t, rules) in plan.items():
        ran = {r.name for r in rules}
        runs = [r for r in read_records(args.out, name) if r["rule"] in {x.name for x in t.rules}]
        kept = [r for r in runs if r["rule"] not in ran]
        shown = [r for r in t.rules if r.name in {x["rule"] for x in runs}]
        write_block(args.out, f"student_teacher:{name}", render(t, shown, runs))
        print(f"wrote table {name!r} to {args.out}" + (f" (kept the rows of {sorted({r['rule'] for r in kept})})" if kept else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r for rs in results.values() for r in rs], indent=1) + "\n")
    print(f"done: {len(tasks)} runs in {time.perf_counter() - start:.0f}s wall")
    return results


if __name__ == "__main__":
    main()
