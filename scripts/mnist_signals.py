"""Angle of a rule's learning signal to the backprop and Gauss-Newton signals per layer, on MNIST, over a short run.

    python scripts/mnist_signals.py mnist/dtp_ai.yaml [--epochs 3] [--subset 10000] [--every 10] [-- OVERRIDES ...]

Trains the config (a proxy: ``--epochs`` epochs on the first ``--subset`` training images, a tenth of them for
validation) with :class:`tplightning.TargetPropDiagnostics` and prints, per hidden layer, the mean cosine of the
signal ``h^_i - h_i`` with ``e^BP`` and ``e^GN`` (thesis eqs. 5.60-5.61), the signal's norm and, for thesis-form
rules, ``||Q_i - W_{i+1}^dagger||``: over the first five diagnostic steps and over the last epoch, with the
validation accuracy of every epoch. Trailing ``train.py`` overrides change the rule, e.g.
``-- --model.init_args.negative_slope 0.8``. Issue 14 used it to find why DTP-AI trails LeeDTP on MNIST.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: its tplightning and the lab's benchmarks

from tplightning._lightning import pl  # noqa: E402
from tplightning.cli import main as train_main  # noqa: E402
from tplightning.diagnostics import TargetPropDiagnostics  # noqa: E402

from benchmarks.common import quiet  # noqa: E402

QUANTITIES = ("cos_bp", "cos_gn", "norm_signal", "q_pinv_error")


class _ValAcc(pl.Callback):
    def __init__(self):
        self.values: list[float] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics["val/acc"]))


def main(argv: Sequence[str] | None = None) -> dict:
    """Run and print; returns ``{"val_acc": [...], "start": {key: mean}, "last": {key: mean}}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python scripts/mnist_signals.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--subset", type=int, default=10000)
    p.add_argument("--every", type=int, default=10, help="training batches between two diagnostics (default: 10)")
    p.add_argument("--samples", type=int, default=128, help="rows of the batch the diagnostics use (default: 128)")
    args = p.parse_args(argv)
    quiet()
    diag, acc = TargetPropDiagnostics(every_n_steps=args.every, max_samples=args.samples), _ValAcc()
    num_val = args.subset // 10
    train_main(["--config", args.config, "--test_on", "none", "--trainer.enable_progress_bar", "false",
                "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
                "--trainer.max_epochs", str(args.epochs), "--data.init_args.subset", str(args.subset),
                "--data.init_args.num_train", str(args.subset - num_val), "--data.init_args.num_val", str(num_val),
                *overrides], callbacks=[diag, acc])  # fmt: skip
    history = diag.history
    last_epoch = max(h["epoch"] for h in history)
    parts = {"start": history[:5], "last": [h for h in history if h["epoch"] == last_epoch]}
    keys = sorted({k for h in history for k in h if k.startswith("diag/")})
    means = {name: {k: statistics.mean(h[k] for h in part if k in h) for k in keys} for name, part in parts.items()}
    layers = sorted({int(k.rsplit("_", 1)[1]) for k in keys})
    print(f"{args.config} {' '.join(overrides)}: validation accuracy per epoch {[round(a, 4) for a in acc.values]}")
    print(f"{'':14s} {'first 5 diagnostics (layers ' + ', '.join(map(str, layers)) + ')':44s} last epoch")
    for q in QUANTITIES:
        if any(f"diag/{q}_{i}" in keys for i in layers):
            row = {name: " ".join(f"{means[name].get(f'diag/{q}_{i}', float('nan')):7.3f}" for i in layers) for name in parts}
            print(f"{q:14s} {row['start']:44s} {row['last']}")
    return {"val_acc": acc.values, **means}


if __name__ == "__main__":
    main()
