"""The stock Lightning CLI with subcommands: ``python -m tplightning fit --config dtp.yaml``.

``fit``, ``validate``, ``test`` and ``predict`` work as in any LightningCLI project; the config
comes after the subcommand. ``train.py`` (fit, then test, in one call) is the simpler entry.
Errors are reported as by ``train.py`` (:func:`tplightning.cli.report`).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli import StockCLI, _cli_kwargs, _quiet_lightning, report
from .config_files import resolve_config_args
from .errors import ConfigError

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def stock_cli(args: Sequence[str] | None = None) -> StockCLI:
    """Run ``LightningCLI`` with subcommands (a bare ``--config`` name resolves among the shipped configs)."""
    _quiet_lightning()
    args = [a for a in (sys.argv[1:] if args is None else args) if a != "--traceback"]
    if not any(a in SUBCOMMANDS for a in args) and not any(a in ("-h", "--help") for a in args):
        raise ConfigError(f"python -m tplightning needs a subcommand ({', '.join(SUBCOMMANDS)}) before the options, e.g. "
                          "python -m tplightning fit --config dtp.yaml (train.py fits and tests in one call)")  # fmt: skip
    sub = next((a for a in args if a in SUBCOMMANDS), None)
    if sub in ("validate", "test", "predict") and not any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in args) \
            and not any(a in ("-h", "--help") for a in args):  # fmt: skip
        raise ConfigError(f"python -m tplightning {sub} evaluates a trained rule: give --ckpt_path (a run's "
                          "checkpoints/last.ckpt); without one it would use the untrained initial weights",
                          option="--ckpt_path")  # fmt: skip
    args = resolve_config_args(args)
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return StockCLI(**_cli_kwargs(args))
    finally:
        sys.argv = argv


def run() -> None:
    report(stock_cli, list(sys.argv[1:]))


if __name__ == "__main__":
    run()
