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
* ``contracting``: 6-6-4, batch 32, TP-AI and DTP-AI (fig. 5.18's learning rates).

Each run is :func:`benchmarks.student_teacher.run_one` (one seed sets the teacher, its data, the student's perturbation,
the shuffling, the draws and the noise) with a callback that scores the whole training and test sets before training
and after every epoch and keeps the training wall time. Every finished run is appended to the record file
``<out>/adaptive_steps_runs.jsonl`` (checksummed lines); a run already recorded with the same settings is not run
again, so an interrupted invocation resumes. The summary (``<out>/adaptive_steps.json``) and the figures
(``<out>/adaptive_steps_<table>.png``: training MSE against epochs and against wall time, means over seeds) are made
from the records. "Epochs to BP": the first epoch at which a variant's mean training MSE is at or below BP-SGD's final
mean training MSE.

    python -m experiments.adaptive_steps [--out DIR] [--tables exact,deep,contracting] [--seeds N] [--epochs E]
        [--num-train N] [--variants V,V,...] [--fraction F] [--docs]

``--docs`` also copies the figures to docs/figures/ and writes the tables and verdicts between the markers
``<!-- adaptive_steps:start/end -->`` of docs/experiments.md, from every table's latest records in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Sequence

from tplightning._lightning import pl

from benchmarks import common
from benchmarks.student_teacher import mse, run_one, seed_args
from experiments.common import REPO, save_figure, save_json, single_thread, subplots

NAME = "adaptive_steps"
RECORDS = "adaptive_steps_runs.jsonl"
LR = "--model.init_args.forward_optimizer"
ADAM = json.dumps({"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}})
BASELINES = ("BP-SGD", "BP-Adam", "GN-LM")


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


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "out" / NAME, help="output folder (default: %(default)s)")
    p.add_argument("--tables", default="exact,deep,contracting", help="comma-separated tables (default: %(default)s)")
    p.add_argument("--variants", default="", help="comma-separated variants (default: all of each table)")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=60, help="epochs (default: %(default)s)")
    p.add_argument("--num-train", type=int, default=0, help="training samples (0: the table's)")
    p.add_argument("--fraction", type=float, default=0.1, help="LayerStep fraction (default: %(default)s)")
    p.add_argument("--docs", action="store_true", help="also copy the figures to docs/figures/ and write the block of docs/experiments.md")
    args = p.parse_args(argv)
    args.tables = [t for t in args.tables.split(",") if t]
    unknown = set(args.tables) - set(TABLES)
    if unknown:
        p.error(f"unknown tables {sorted(unknown)}; choose from {', '.join(TABLES)}")
    args.variants = [v for v in args.variants.split(",") if v]
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    common.quiet()
    path = args.out / RECORDS
    done = {RUN_KIND.key_of(e.record) for e in common.read_records(path, RUN_KIND)}
    wanted = []
    for table in args.tables:
        n = args.num_train or TABLES[table][1]
        for variant in variants(table):
            if args.variants and variant not in args.variants:
                continue
            for seed in range(args.seeds):
                key = {"table": table, "variant": variant, "seed": seed, "epochs": args.epochs, "num_train": n, "fraction": args.fraction}
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
    summary = summarise(latest_settings([e.record for e in common.read_records(path, RUN_KIND)]))
    result = {"verdicts": verdicts(summary), "summary": summary}
    save_json(args.out, NAME, result)
    figures = plot(summary, args.out)
    if args.docs:
        import shutil

        from benchmarks.common import write_block
        from experiments.common import DOCS, FIGURES

        FIGURES.mkdir(parents=True, exist_ok=True)
        for f in figures:
            shutil.copy(f, FIGURES / f.name)
        write_block(DOCS, NAME, docs_block(summary, result["verdicts"]))
    print(json.dumps(result["verdicts"]))
    return result


if __name__ == "__main__":
    main()
