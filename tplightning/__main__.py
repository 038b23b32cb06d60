"""The stock Lightning CLI with subcommands: ``python -m tplightning fit --config configs/dtp.yaml``.

``fit``, ``validate``, ``test`` and ``predict`` work as in any LightningCLI project; the config
comes after the subcommand. ``train.py`` (fit, then test, in one call) is the simpler entry.
Configuration errors print a few lines and exit with status 2 (``--traceback`` for the full one).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli import StockCLI, _cli_kwargs, _quiet_lightning, report, resolve_config_args


def stock_cli(args: Sequence[str] | None = None) -> StockCLI:
    """Run ``LightningCLI`` with subcommands (a bare ``--config`` name resolves inside ``configs/``)."""
    _quiet_lightning()
    args = resolve_config_args([a for a in (sys.argv[1:] if args is None else args) if a != "--traceback"])
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return StockCLI(parser_kwargs={"exit_on_error": False}, **_cli_kwargs(args))
    finally:
        sys.argv = argv


def run() -> None:
    report(stock_cli, list(sys.argv[1:]))


if __name__ == "__main__":
    run()
