"""The stock Lightning CLI with subcommands: ``python -m tplightning fit --config configs/dtp.yaml``.

``fit``, ``validate``, ``test`` and ``predict`` work as in any LightningCLI project; the config
comes after the subcommand. ``train.py`` (fit, then test, in one call) is the simpler entry.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from .cli import resolve_config_args
from .rules.base import LearningRule


def stock_cli(args: Sequence[str] | None = None) -> LightningCLI:
    """Run ``LightningCLI`` with subcommands (a bare ``--config`` name resolves inside ``configs/``)."""
    args = resolve_config_args(list(sys.argv[1:] if args is None else args))
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return LightningCLI(
            LearningRule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    finally:
        sys.argv = argv


if __name__ == "__main__":
    stock_cli()
