"""The training entry point: ``python train.py --config dtp.yaml`` fits, then tests.

Built on ``LightningCLI(run=False)``: any rule (``--model``) and any data module (``--data``),
configs that compose (several ``--config``, later wins), overrides such as
``--trainer.max_epochs 3`` and ``--model.init_args.target_stepsize 0.05``, and ``--print_config``.
A bare config name (``--config dtp.yaml``) is looked up in ``configs/``.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from .rules.base import DivergenceError, LearningRule

__all__ = ["main", "TPLightningCLI", "CONFIG_DIR", "resolve_config_args"]

CONFIG_DIR = Path(os.environ.get("TPLIGHTNING_CONFIGS", Path(__file__).resolve().parent.parent / "configs"))


def available_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(str(p.relative_to(config_dir)) for p in config_dir.rglob("*.yaml")) if config_dir.is_dir() else []


def resolve_config_args(args: Sequence[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """Rewrite ``--config NAME`` to ``configs/NAME`` when ``NAME`` is not a path that exists.

    Raises ``FileNotFoundError`` listing the available configs when neither exists.
    """
    out, it = [], iter(args)
    for a in it:
        if a == "--config" or a.startswith("--config="):
            value = a.split("=", 1)[1] if "=" in a else next(it, None)
            if value is None:
                raise ValueError("--config needs a file name")
            if not Path(value).exists():
                candidate = config_dir / value
                if not candidate.exists():
                    raise FileNotFoundError(
                        f"config file {value!r} not found (neither as a path nor in {config_dir}); available: "
                        + ", ".join(available_configs(config_dir))
                    )
                value = str(candidate)
            out += ["--config", value]
        else:
            out.append(a)
    return out


class TPLightningCLI(LightningCLI):
    """LightningCLI with ``--ckpt_path`` (resume) and ``--test_on`` (``final`` or ``best`` weights)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume training from this checkpoint")
        parser.add_argument(
            "--test_on",
            type=str,
            default="final",
            help="test the 'final' weights, the 'best' validation checkpoint, or 'none' to skip testing",
        )


def _build_cli(args: list[str]) -> TPLightningCLI:
    return TPLightningCLI(
        LearningRule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        auto_configure_optimizers=False,
        args=args,
        parser_kwargs={"exit_on_error": False},
        save_config_kwargs={"overwrite": True},
    )


def main(args: Sequence[str] | None = None) -> dict:
    """Fit and test as configured; returns ``{"cli", "fit_metrics", "test_metrics"}``.

    Raises ``DivergenceError`` when training diverges (the last good checkpoint stays on disk).
    """
    args = resolve_config_args(list(sys.argv[1:] if args is None else args))
    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI reads ``args``; keep it from also seeing argv
    try:
        cli = _build_cli(args)
    finally:
        sys.argv = argv
    cfg = cli.config
    test_on = cfg.get("test_on", "final")
    if test_on not in ("final", "best", "none"):
        raise ValueError(f"--test_on must be 'final', 'best' or 'none', got {test_on!r}")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    test_metrics = {}
    if test_on != "none":
        ckpt = "best" if test_on == "best" and not cli.trainer.fast_dev_run else None
        results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
        test_metrics = results[0] if results else {}
    return {"cli": cli, "fit_metrics": fit_metrics, "test_metrics": test_metrics}


def run() -> None:
    """Console entry: like :func:`main`, but a diverged run ends with its message and exit code 1."""
    try:
        main()
    except DivergenceError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
