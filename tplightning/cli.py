"""The training entry point: ``python train.py --config dtp.yaml`` fits, then tests.

Built on ``LightningCLI(run=False)``: any rule (``--model``) and any data module (``--data``),
configs that compose (several ``--config``, later wins), overrides such as
``--trainer.max_epochs 3`` and ``--model.init_args.target_stepsize 0.05``, and ``--print_config``.
A bare config name (``--config dtp.yaml``) is looked up in ``configs/``.

What the CLI adds to the stock ``LightningCLI`` (also used by ``python -m tplightning``):

* every logger of a run writes to one ``<save_dir>/<name>/version_N`` folder (the checkpoints land
  in its ``checkpoints/``); ``validate``/``test``/``predict`` of a checkpoint log next to it, in
  ``<run folder>/<subcommand>-<checkpoint name>/``;
* ``--reapply_optimizer_config true`` resumes with the configured optimizer hyper-parameters
  (:class:`~tplightning.callbacks.ReapplyOptimizerConfig`); without it a warning names each
  configured value the checkpoint overrides;
* a run that diverges raises :class:`~tplightning.rules.base.DivergenceError` whose message ends
  with the exact command that resumes from the last good checkpoint with a smaller learning rate;
* the default progress bar redraws every :data:`PROGRESS_REFRESH` batches, not after each;
* ``--threads N`` sets torch's CPU threads; by default one thread for networks of small dense layers
  (:func:`default_threads`), which keeps a run steady on a machine whose other cores are busy;
* configuration errors print a few lines and exit with status 2 (``--traceback`` or
  ``TPLIGHTNING_TRACEBACK=1`` for the full traceback); integer ``--trainer.limit_*_batches``
  stay integers (a number of batches, not a fraction).
"""
from __future__ import annotations

import logging
import os
import shlex
import warnings
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ._lightning import LightningCLI, pl
from .callbacks import ReapplyOptimizerConfig
from .checkpoints import check_fits, read as read_checkpoint
from .config_files import CONFIG_DIR, resolve_config_args
from .errors import ConfigError, is_config_error, short_error
from .rules.base import RESUME_HINT, DivergenceError, LearningRule

__all__ = ["main", "build", "run", "TPLightningCLI", "CONFIG_DIR", "resolve_config_args", "align_loggers", "default_threads"]

TRACEBACK_ENV = "TPLIGHTNING_TRACEBACK"
#: trainer options whose integer value means "batches" and whose float means "fraction"
_COUNT_OR_FRACTION = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches", "overfit_batches", "val_check_interval")


class _DropTips(logging.Filter):
    """Lightning's advertising line ("Tip: ... litlogger") adds nothing to a run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud logging" not in record.getMessage()


def _quiet_lightning() -> None:
    """A short console: drop Lightning's logger advertisement and a deprecation warning of its own internals."""
    for name in (f"{pl.__name__}.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def _int_literals(args: Sequence[str]) -> dict[str, int]:
    """``{name: n}`` for ``--trainer.<name> n`` given as an integer literal on the command line."""
    found, args = {}, list(args)
    for k, a in enumerate(args):
        for name in _COUNT_OR_FRACTION:
            opt = f"--trainer.{name}"
            value = a.split("=", 1)[1] if a.startswith(opt + "=") else args[k + 1] if a == opt and k + 1 < len(args) else None
            if value is not None and value.strip().lstrip("+").isdigit():
                found[name] = int(value)
    return found


def align_loggers(trainer, subcommand: str | None = None, ckpt_path: str | None = None) -> Path | None:
    """One folder per run: give every logger of ``trainer`` the same version; returns that folder.

    CSVLogger and TensorBoardLogger each pick ``version_N`` by counting the folders they find, so
    two loggers of one run ended up in ``version_N`` and ``version_N+1``. For ``validate``,
    ``test`` and ``predict`` of a checkpoint ``.../version_N/checkpoints/X.ckpt`` the loggers write
    to ``.../version_N/<subcommand>-X/`` instead of starting a new version.
    """
    loggers = [lg for lg in trainer.loggers if hasattr(lg, "_version") and getattr(lg, "root_dir", None) is not None]
    if not loggers:
        return None
    if subcommand in ("validate", "test", "predict") and ckpt_path and Path(ckpt_path).is_file():
        ckpt = Path(ckpt_path).resolve()
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        version: int | str = str(run_dir / f"{subcommand}-{ckpt.stem}")  # absolute: os.path.join keeps it
    else:
        explicit = [lg._version for lg in loggers if lg._version is not None]
        version = explicit[0] if explicit else max(lg.version for lg in loggers)
    for lg in loggers:
        lg._version = version
    return Path(loggers[0].log_dir) if loggers[0].log_dir is not None else None


#: batches between redraws of the default progress bar (Lightning's default, 1, redraws after every batch)
PROGRESS_REFRESH = 10
#: the largest weight (entries) of a network that :func:`default_threads` runs on one thread
SMALL_LAYER = 1024 * 1024


def default_threads(model) -> int | None:
    """The torch CPU threads ``train.py`` uses unless ``--threads`` says otherwise: 1 for a network of dense layers
    whose weights have at most :data:`SMALL_LAYER` entries (widths up to 1024), ``None`` (torch's default, one per
    core) otherwise.

    A small network's step is many small operations. Split over two threads, each waits at every operation's end
    for the other; when another process holds a core, that wait is a scheduler time slice. Measured on this
    project's 2-core machine with other jobs running (``python scripts/ab_step_time.py --threads 1 2``, steps
    interleaved), the MNIST network's ``training_step`` took 3 times longer on 2 threads than on 1 for BP and 20-28
    times for DTP-AI, OriginalDTP, LeeDTP and AO-SDTP; on a quiet machine 2 threads gain BP about 1.2-1.4 times
    (issue 16). Convolutions and wide layers keep torch's default.
    """
    from .layers import Dense

    layers = list(getattr(getattr(model, "net", None), "layers", []))
    if layers and all(isinstance(layer, Dense) and layer.weight.numel() <= SMALL_LAYER for layer in layers):
        return 1
    return None


def apply_threads(threads: int | None, model) -> None:
    """``torch.set_num_threads``: ``threads`` if given (0: one per core), else :func:`default_threads` of ``model``."""
    if threads is not None and threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: one per core), got {threads}")
    n = threads if threads is not None else default_threads(model)
    if n == 0:
        n = os.cpu_count() or 1
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)


def _local_checkpoint(ckpt_path) -> bool:
    """Whether ``--ckpt_path`` names a local file to check, rather than one of Lightning's own values (``last``,
    ``best``, ``hpc``, ``registry...``) or a remote URL, which Lightning resolves itself."""
    if not ckpt_path:
        return False
    text = str(ckpt_path)
    return text not in ("last", "best", "hpc") and not text.startswith("registry") and "://" not in text


class TPLightningCLI(LightningCLI):
    """LightningCLI with ``--ckpt_path`` (resume), ``--test_on`` and ``--reapply_optimizer_config``."""

    subcommand_mode = False

    def add_arguments_to_parser(self, parser) -> None:
        if not self.subcommand_mode:
            parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume training from this checkpoint")
            parser.add_argument(
                "--test_on",
                type=str,
                default="final",
                help="test the 'final' weights, the 'best' validation checkpoint, or 'none' to skip testing",
            )
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help="torch CPU threads (0: one per core); default: 1 for networks of dense layers up to 1024 wide, "
            "whose many small operations lose far more to a busy core than they gain from a second thread, else torch's default",
        )
        parser.add_argument(
            "--reapply_optimizer_config",
            type=bool,
            default=False,
            help="on resume, use the configured optimizer hyper-parameters (learning rates, momentum, weight decay) "
            "instead of the checkpoint's; the optimizer state and the schedule's position are kept",
        )

    def parse_arguments(self, parser, args) -> None:
        self._raw_args = list(args or [])
        try:
            super().parse_arguments(parser, args)
        except BaseException as err:
            err.tplightning_parser = parser  # for close matches of unknown options
            raise

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        ckpt_path = (self.config[sub] if sub else self.config).get("ckpt_path")
        self._checkpoint = None
        if _local_checkpoint(ckpt_path):  # a missing, foreign, truncated or corrupt file: a short error, before torch's
            self._checkpoint = read_checkpoint(ckpt_path)
        # The stock CLI overlays the checkpoint's hyper-parameters on the config, which silently
        # undoes command-line changes on a resumed ``fit``; keep it for validate/test/predict only.
        if sub != "fit":
            super()._parse_ckpt_path()

    def _section(self) -> dict:
        return self.config[self.subcommand] if self.subcommand else self.config

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        apply_threads(self._section().get("threads"), self.model)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # Lightning's default progress bar redraws after every batch: 7-13 % of a BP batch on the MNIST network in
        # paired runs through the speed benchmark's trainer_run; every PROGRESS_REFRESH batches costs a tenth of that
        given = config.get("callbacks") or []
        given = [*(given if isinstance(given, list) else [given]), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, pl.callbacks.ProgressBar) for c in given):
            callbacks = [*callbacks, pl.callbacks.TQDMProgressBar(refresh_rate=PROGRESS_REFRESH)]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs):
        # jsonargparse reads ``int | float`` "1" as 1.0, which Lightning takes as a fraction (all batches)
        kwargs = {**_int_literals(getattr(self, "_raw_args", [])), **kwargs}
        trainer = super().instantiate_trainer(**kwargs)
        section = self._section()
        align_loggers(trainer, self.subcommand, section.get("ckpt_path"))
        if getattr(self, "_checkpoint", None) is not None:  # another rule's or another network's weights: a short error
            check_fits(self.model, section["ckpt_path"], self._checkpoint)
            self._checkpoint = None  # Lightning reads the file itself
        if section.get("ckpt_path") and self.subcommand in (None, "fit"):  # only a resumed fit restores optimizers
            trainer.callbacks.append(ReapplyOptimizerConfig(reapply=bool(section.get("reapply_optimizer_config", False))))
        return trainer


class StockCLI(TPLightningCLI):
    """The subcommand CLI of ``python -m tplightning`` (``fit``, ``validate``, ``test``, ``predict``)."""

    subcommand_mode = True


def _cli_kwargs(args: list[str]) -> dict:
    return dict(
        model_class=LearningRule,
        datamodule_class=pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


def _build_cli(args: list[str]) -> TPLightningCLI:
    return TPLightningCLI(run=False, parser_kwargs={"exit_on_error": False}, **_cli_kwargs(args))


def _divergence_advice(cli, err: DivergenceError, args: Sequence[str]) -> str:
    """The command that resumes from the last good checkpoint with a tenth of the forward learning rate."""
    ckpt = getattr(cli.trainer.checkpoint_callback, "last_model_path", "") or ""
    if not ckpt or not Path(ckpt).is_file():
        return (
            ". No checkpoint had been written yet: rerun with a smaller learning rate "
            "(--model.init_args.forward_optimizer.init_args.lr) or target_stepsize."
        )
    lr = None
    fwd = cli.config.get("model", {}).get("init_args", {}).get("forward_optimizer")
    if fwd is not None and hasattr(fwd, "get") and fwd.get("init_args") is not None:
        lr = fwd["init_args"].get("lr")
    keep, it = [], iter(args)
    for a in it:  # drop options the advice sets itself
        key = a.split("=", 1)[0]
        if key in ("--ckpt_path", "--reapply_optimizer_config", "--model.init_args.forward_optimizer.init_args.lr"):
            if "=" not in a:
                next(it, None)
            continue
        keep.append(a)
    new = ["--ckpt_path", ckpt, "--reapply_optimizer_config", "true"]
    if lr:
        new += ["--model.init_args.forward_optimizer.init_args.lr", f"{lr / 10:g}"]
    return (". No checkpoint was written after this step. To continue from the last good one with a tenth of the learning "
            "rate: python train.py " + shlex.join([*keep, *new]))  # fmt: skip


def build(args: Sequence[str]) -> TPLightningCLI:
    """The CLI of ``train.py args`` with its model, data module and trainer built (and torch's threads set), not run."""
    _quiet_lightning()
    args = resolve_config_args(args)
    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI reads ``args``; keep it from also seeing argv
    try:
        return _build_cli(args)
    finally:
        sys.argv = argv


def main(args: Sequence[str] | None = None, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """Fit and test as configured; returns ``{"cli", "fit_metrics", "test_metrics"}``.

    ``callbacks`` are added to the configured trainer's (objects a config cannot name, such as the tuning
    command's pruning callback that holds an Optuna trial).

    Raises ``DivergenceError`` when training diverges (the last good checkpoint stays on disk);
    its message ends with the command that resumes from it with a smaller learning rate.
    """
    raw = list(sys.argv[1:] if args is None else args)
    raw = [a for a in raw if a != "--traceback"]
    cli = build(raw)
    cli.trainer.callbacks.extend(callbacks)
    cfg = cli.config
    test_on = cfg.get("test_on", "final")
    if test_on not in ("final", "best", "none"):
        raise ConfigError(f"--test_on must be 'final', 'best' or 'none', got {test_on!r}")
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cfg.get("ckpt_path"))
    except DivergenceError as err:
        raise DivergenceError(str(err).removesuffix(RESUME_HINT) + _divergence_advice(cli, err, raw)) from err
    fit_metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    test_metrics = {}
    if test_on != "none":
        ckpt = "best" if test_on == "best" and not cli.trainer.fast_dev_run else None
        results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
        test_metrics = results[0] if results else {}
    return {"cli": cli, "fit_metrics": fit_metrics, "test_metrics": test_metrics}


def wants_traceback(args: Sequence[str]) -> bool:
    return "--traceback" in args or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def report(fn, args: list[str]):
    """Run ``fn(args)``; a configuration error prints a few lines and exits 2, a divergence exits 1."""
    if wants_traceback(args):
        return fn([a for a in args if a != "--traceback"])
    try:
        return fn(args)
    except DivergenceError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except SystemExit:
        raise
    except BaseException as err:
        if not is_config_error(err):
            raise
        print(short_error(err, args, getattr(err, "tplightning_parser", None)), file=sys.stderr)
        raise SystemExit(2) from None


def run() -> None:
    """Console entry (``train.py``, ``tplightning-train``): :func:`main` with short errors."""
    report(main, list(sys.argv[1:]))
