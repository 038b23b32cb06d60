"""The training entry point: ``python train.py --config dtp.yaml`` fits, then tests.

``LightningCLI(run=False)`` with any rule (``--model``) and any data module (``--data``), configs that
compose (several ``--config``, later wins), overrides (``--trainer.max_epochs 3``) and
``--print_config``; a bare config name (``--config dtp.yaml``) is looked up in the shipped configs.
What it adds:

* ``--ckpt_path`` resumes a fit (the config's values stay; a checkpoint of another rule or network is
  refused before training; so is it for ``validate``/``test``/``predict``, which evaluate the configured model with
  the checkpoint's weights rather than overlay the checkpoint's hyper-parameters on the config as the stock
  ``LightningCLI`` does) in the folder of the run that wrote it (``.../version_N/checkpoints/x.ckpt`` keeps
  logging to ``version_N``: one run, one folder, however often it is resumed); ``--ckpt_path last`` takes the
  newest ``<save_dir>/<name>/version_*/checkpoints/last.ckpt`` of the config's loggers (by modification time, then
  by version number), says which, and is an error when there is none; ``--reapply_optimizer_config true`` resumes with the configured optimizer
  settings (:class:`~tplightning.callbacks.ReapplyOptimizerConfig`);
* ``--test_on final|best|none`` chooses the weights tested after the fit;
* ``--threads N`` sets torch's CPU threads (default: :func:`default_threads`);
* a diverged run ends with the command that resumes from the last good checkpoint with a smaller
  learning rate, and exit status 1;
* every checkpoint is written atomically and with a content digest
  (:class:`~tplightning.checkpoints.AtomicCheckpointIO`); a fit first removes the temporary files of saves whose
  process is gone (:func:`remove_dead_saves`);
* every logger of a run writes to one ``<save_dir>/<name>/version_N`` folder (loggers configured with different
  ``save_dir`` or ``name`` are refused, :func:`check_one_folder`); ``validate``/``test``/``predict``
  of a checkpoint (``python -m tplightning``) log beside it, in ``<run folder>/<subcommand>-<checkpoint name>/``;
  ``predict`` writes the outputs there, as ``predictions.pt`` (:class:`PredictionWriter`);
* the default progress bar redraws every :data:`PROGRESS_REFRESH` batches.

Errors: an argument or config error (:func:`tplightning.errors.short_message`) prints a few lines and
exits with status 2 (``--traceback`` or ``TPLIGHTNING_TRACEBACK=1`` shows the traceback); a failed DDP process group
(a peer that died or did not answer within the strategy's timeout, :func:`distributed_failure`) prints one line naming
the rank and exits with status 1; any other exception raised while training or testing keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import yaml

from ._lightning import LightningCLI, pl
from .callbacks import ReapplyOptimizerConfig
from .checkpoints import TMP_MARK, check_fits, install_atomic_io, read as read_checkpoint
from .config_files import CONFIG_DIR, resolve_config_args
from .errors import ConfigError, _parser_path, accepted_arguments, exception_chain, short_message
from .rules.base import RESUME_HINT, DivergenceError, LearningRule, build_optimizer

__all__ = ["main", "build", "run", "report", "TPLightningCLI", "PredictionWriter", "CONFIG_DIR", "resolve_config_args", "default_threads"]

TRACEBACK_ENV = "TPLIGHTNING_TRACEBACK"
#: batches between redraws of the default progress bar (Lightning's default, 1, redraws after every batch)
PROGRESS_REFRESH = 10
#: the largest weight (entries) of a network that :func:`default_threads` runs on one thread
SMALL_LAYER = 1024 * 1024
#: trainer options whose integer value means "batches" and whose float means "fraction"
_COUNT_OR_FRACTION = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches", "overfit_batches", "val_check_interval")
#: the subcommands whose ``--ckpt_path`` names the weights to evaluate, not a fit to resume
_EVALUATE = ("validate", "test", "predict")


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
    """``{name: n}`` for ``--trainer.<name> n`` given as an integer literal (jsonargparse reads ``int | float`` "3" as
    3.0, which Lightning would take as a fraction).

    >>> _int_literals(["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches=0.5"])
    {'limit_train_batches': 3}
    >>> _int_literals(["--trainer.limit_train_batches", "3", "--trainer.limit_train_batches", "0.5"])
    {}
    """
    found, args = {}, list(args)
    for k, a in enumerate(args):
        for name in _COUNT_OR_FRACTION:
            opt = f"--trainer.{name}"
            value = a.split("=", 1)[1] if a.startswith(opt + "=") else args[k + 1] if a == opt and k + 1 < len(args) else None
            if value is not None and value.strip().lstrip("+").isdigit():
                found[name] = int(value)
            elif value is not None:  # a later fraction overrides an earlier count
                found.pop(name, None)
    return found


def default_threads(model) -> int | None:
    """The torch CPU threads a run uses unless ``--threads`` says otherwise: 1 for a network of dense layers whose
    weights have at most :data:`SMALL_LAYER` entries, ``None`` (torch's default, one per core) otherwise.

    A small network's step is many small operations; split over threads, each waits for the others at every
    operation's end, which costs a scheduler time slice whenever another process holds a core (docs/guide.md, "Threads and
    speed", has the measurements).

    >>> import tplightning as tp
    >>> default_threads(tp.BP(sizes=[6, 6, 6])), default_threads(tp.BP(sizes=[784, 2048, 10]))
    (1, None)
    """
    from .layers import Dense

    layers = list(getattr(getattr(model, "net", None), "layers", []))
    if layers and all(isinstance(layer, Dense) and layer.weight.numel() <= SMALL_LAYER for layer in layers):
        return 1
    return None


def apply_threads(threads: int | None, model) -> None:
    """``torch.set_num_threads``: ``threads`` if given (0: one per core), else :func:`default_threads` of ``model``.

    >>> apply_threads(-1, None)
    Traceback (most recent call last):
    tplightning.errors.ConfigError: --threads must be >= 0 (0: one per core), got -1
    """
    if threads is not None and threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: one per core), got {threads}", option="--threads")
    n = threads if threads is not None else default_threads(model)
    if n == 0:
        n = os.cpu_count() or 1
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)


def _local_checkpoint(ckpt_path) -> bool:
    """Whether ``--ckpt_path`` names a local file to check, rather than one of Lightning's own values (``last``,
    ``best``, ``hpc``, ``registry...``) or a remote URL, which Lightning resolves itself."""
    text = str(ckpt_path or "")
    return bool(text) and text not in ("last", "best", "hpc") and not text.startswith("registry") and "://" not in text


def _next_version(root: Path) -> int:
    """The ``N`` of the next ``version_N`` folder under ``root`` (0 when there is none)."""
    found = [int(p.name[8:]) for p in root.glob("version_*") if p.is_dir() and p.name[8:].isdigit()]
    return max(found, default=-1) + 1


def _logger_roots(loggers) -> list[Path]:
    """The ``<save_dir>/<name>`` folders of the file loggers' ``init_args``."""
    return [Path(init["save_dir"]) / (init.get("name") or "") for init in loggers]


def newest_last_checkpoint(roots: Sequence[Path]) -> Path:
    """The newest ``version_*/checkpoints/last.ckpt`` under ``roots`` (by modification time, then by version number);
    a :class:`~tplightning.errors.ConfigError` naming ``--ckpt_path`` when there is none.

    >>> newest_last_checkpoint([Path("/nonexistent/dtp")])
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: --ckpt_path last: no /nonexistent/dtp/version_*/checkpoints/last.ckpt to resume from; train without --ckpt_path first, or give a checkpoint file
    """
    found, roots = [], list(dict.fromkeys(roots))  # the CSV and TensorBoard loggers of a run share a folder
    for root in roots:
        for path in root.glob("version_*/checkpoints/last.ckpt"):
            number = path.parent.parent.name[len("version_"):]
            found.append((path.stat().st_mtime_ns, int(number) if number.isdigit() else -1, str(path), path))
    if not found:
        where = " or ".join(str(root / "version_*" / "checkpoints" / "last.ckpt") for root in roots)
        raise ConfigError(f"--ckpt_path last: no {where} to resume from; train without --ckpt_path first, or give a "
                          "checkpoint file", option="--ckpt_path")  # fmt: skip
    return max(found)[-1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_saves(roots: Sequence[Path]) -> list[Path]:
    """Remove (and return) the temporary files of checkpoint saves whose process is gone, in every
    ``<root>/version_*/checkpoints/`` folder: a save killed before its rename leaves
    ``.<name>.tmp-tplightning-<pid>``, which the next save into the same folder removes; a run killed during its first
    save has no ``last.ckpt`` to resume from, so nothing saves into its folder again and the fit that starts afresh
    removes the file here. A file of a process that is still running (another run saving now) is kept.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> folder = root / "version_0" / "checkpoints"
    >>> folder.mkdir(parents=True)
    >>> for pid in (os.getpid(), 2**22 + 1):  # this process, and a pid above Linux's largest
    ...     _ = (folder / f".last.ckpt.tmp-tplightning-{pid}").write_bytes(b"")
    >>> [p.name for p in remove_dead_saves([root])], sorted(p.name.rpartition("-")[2] == str(os.getpid()) for p in folder.iterdir())
    (['.last.ckpt.tmp-tplightning-4194305'], [True])
    """
    removed = []
    for root in dict.fromkeys(roots):
        for path in root.glob(f"version_*/checkpoints/*{TMP_MARK}*"):
            pid = path.name.rpartition(TMP_MARK)[2]
            if pid.isdigit() and not _alive(int(pid)) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _run_version(ckpt: Path, roots: Sequence[Path]) -> int | str | None:
    """The version (``N`` of ``version_N``, or the folder's name) of the run that wrote ``ckpt`` when it lies in
    ``<root>/<version>/checkpoints/`` of one of ``roots``; ``None`` otherwise."""
    ckpt = ckpt.resolve()
    run_dir = ckpt.parent.parent
    if ckpt.parent.name != "checkpoints" or not any(run_dir.parent == root.resolve() for root in roots):
        return None
    m = re.fullmatch(r"version_(\d+)", run_dir.name)
    return int(m.group(1)) if m else run_dir.name


def _file_loggers(trainer_config) -> list:
    """The ``init_args`` of the configured loggers that write to ``save_dir/name/version`` (CSV, TensorBoard)."""
    loggers = trainer_config.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    found = []
    for lg in loggers:
        init = lg.get("init_args") if hasattr(lg, "get") else None
        if init is not None and "save_dir" in init and "version" in init:
            found.append(init)
    return found


def check_one_folder(trainer_config) -> None:
    """:class:`~tplightning.errors.ConfigError` when the file loggers of a run (CSV, TensorBoard) would write to
    different ``<save_dir>/<name>`` folders: one run keeps its logs, checkpoints and config in one folder.

    ``--trainer.logger.init_args.save_dir x`` (or ``.name``) sets the *last* item of a logger list only (jsonargparse's
    rule for lists), so with the shipped two-logger configs it would split a run's logs over two folders; the error
    names the option and the list form that moves every logger.

    >>> from types import SimpleNamespace as NS
    >>> csv = NS(class_path="lightning.pytorch.loggers.CSVLogger", init_args={"save_dir": "runs", "name": "dtp", "version": None})
    >>> tb = NS(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args={"save_dir": "x", "name": "dtp", "version": None})
    >>> check_one_folder({"logger": [csv, tb]})
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: the run's loggers would write to different folders (CSVLogger: runs/dtp, TensorBoardLogger: x/dtp): --trainer.logger.init_args.save_dir sets the last logger of the list only; give every logger the same save_dir and name, e.g. --trainer.logger '[{class_path: CSVLogger, init_args: {save_dir: x, name: dtp}}, {class_path: TensorBoardLogger, init_args: {save_dir: x, name: dtp}}]'
    >>> check_one_folder({"logger": [csv, NS(class_path="TensorBoardLogger", init_args={"save_dir": "runs", "name": "dtp", "version": None})]})
    """
    loggers = trainer_config.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    found = []  # (class name, save_dir, name) of each file logger
    for lg in loggers:
        init = lg.get("init_args") if hasattr(lg, "get") else getattr(lg, "init_args", None)
        if init is not None and "save_dir" in init and "version" in init:
            cls = str(lg.get("class_path") if hasattr(lg, "get") else getattr(lg, "class_path", "")).rpartition(".")[2]
            found.append((cls, str(init["save_dir"]), str(init.get("name") or "")))
    if len({(d, n) for _, d, n in found}) <= 1:
        return
    last_dir, last_name = found[-1][1], found[-1][2]
    key = "save_dir" if len({d for _, d, _ in found}) > 1 else "name"
    where = ", ".join(f"{cls}: {Path(d) / n}" for cls, d, n in found)
    example = ", ".join(f"{{class_path: {cls}, init_args: {{save_dir: {last_dir}, name: {last_name}}}}}" for cls, _, _ in found)
    raise ConfigError(f"the run's loggers would write to different folders ({where}): --trainer.logger.init_args.{key} "
                      "sets the last logger of the list only; give every logger the same save_dir and name, e.g. "
                      f"--trainer.logger '[{example}]'", option=f"--trainer.logger.init_args.{key}")  # fmt: skip


def _config_keys(args: Sequence[str]) -> list[str]:
    """The top-level keys of the config files in ``args`` (``--config PATH``, as :func:`resolve_config_args` leaves it)."""
    paths = [b for a, b in zip(args, list(args)[1:]) if a == "--config"]
    return [key for p in paths for key in (yaml.safe_load(Path(p).read_text()) or {})]


def _culprit(err: ConfigError, config) -> None:
    """Fill in ``err.option`` and ``err.given`` for an error raised by the constructor of the model, the data module or
    a callback: the section from the object under construction, the argument from what the message says of it."""
    kinds = {pl.LightningModule: "model", pl.LightningDataModule: "data", pl.Callback: "trainer.callbacks"}
    inits = [frame.f_locals.get("self") for frame, _ in traceback.walk_tb(err.__traceback__) if frame.f_code.co_name == "__init__"]
    owner, section = next(((obj, kinds[k]) for obj in inits for k in kinds if isinstance(obj, k)), (None, None))
    if owner is None:
        return
    init = config.get(section, {}).get("init_args") if section != "trainer.callbacks" else None
    message = str(err)
    words = set(message.replace("=", " ").replace(",", " ").replace("'", " ").split())
    names = [n for n in accepted_arguments(type(owner)) if not n.startswith("_")]
    value = {n: init.get(n) for n in names} if init is not None else {}
    # the argument whose string value the message quotes first, else the first it states as "name=value", else the
    # first it names
    quoted = [n for n in names if isinstance(value.get(n), str) and repr(value[n]) in message]
    stated = [n for n in names if f"{n}={value.get(n)}" in message]
    best = sorted(quoted, key=lambda n: message.find(repr(value[n]))) or sorted(stated, key=lambda n: message.find(f"{n}="))
    best = best or sorted((n for n in names if n in words), key=message.find)
    # else the one whose value the message says it got (a check of a shared helper that knows the value, not the
    # argument's name: teacher_negative_slope's "leaky_relu negative_slope must be ..., got -1.0")
    best = best or [n for n in names if isinstance(value.get(n), (int, float)) and not isinstance(value.get(n), bool)
                    and re.search(rf"\bgot {re.escape(str(value[n]))}(?![\w.])", message)]  # fmt: skip
    if section == "trainer.callbacks":
        err.option = f"--trainer.callbacks ({type(owner).__name__})"
    elif not best:
        err.option = f"--{section}"
    else:
        err.option, err.given = f"--{section}.init_args.{best[0]}", value.get(best[0])


def _keep_csv_history(trainer) -> None:
    """Keep the rows of a resumed run's ``metrics.csv``: Lightning's CSV logger deletes the file it finds in its folder
    (with a warning that it will); the rows are written back and the logger continues the file with their columns."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if not isinstance(logger, pl.loggers.CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        old = path.read_text() if path.is_file() else None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            writer = logger.experiment  # created now: it removes the file
        if old:
            path.write_text(old)
            writer.metrics_keys = old.splitlines()[0].split(",")


class TPLightningCLI(LightningCLI):
    """``LightningCLI`` with ``--ckpt_path``, ``--test_on``, ``--threads`` and ``--reapply_optimizer_config`` (see the
    module's docstring); ``train.py`` builds it with ``run=False``."""

    subcommand_mode = False

    def add_arguments_to_parser(self, parser) -> None:  # called for the parser of each subcommand
        self._option_parsers = [*getattr(self, "_option_parsers", []), parser]
        if not self.subcommand_mode:
            parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume training from this checkpoint")
            parser.add_argument(
                "--test_on",
                type=Literal["final", "best", "none"],
                default="final",
                help="test the 'final' weights, the 'best' validation checkpoint, or 'none' to skip testing",
            )
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help="torch CPU threads (0: one per core); default: 1 for networks of small dense layers, else torch's",
        )
        parser.add_argument(
            "--reapply_optimizer_config",
            type=bool,
            default=False,
            help="on resume, use the configured optimizer hyper-parameters (learning rates, momentum, weight decay) "
            "instead of the checkpoint's; the optimizer state and the schedule's position are kept",
        )

    def _section(self, config=None):
        config = self.config if config is None else config
        sub = config.get("subcommand")
        return config[sub] if sub else config

    def parse_arguments(self, parser, args) -> None:
        self._raw_args = list(args or [])
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:  # what the parsers know, for the close match of an unknown option or key
            option, _ = _parser_path(exception_chain(err))
            value = str(exception_chain(err)[-1]).rpartition("Got value: ")[2].strip()
            if option and option.endswith(".lr") and value.lower().lstrip("+-") in ("nan", "inf", "infinity"):
                raise ConfigError(f"the learning rate must be a finite positive float, got {value}", option=option) from err
            err.tplightning_options = sorted({key for p in self._option_parsers for key in p.get_defaults().keys()})
            err.tplightning_config_keys = _config_keys(self._raw_args)
            raise
        section, sub = self._section(), self.config.get("subcommand")
        check_seed(section.get("seed_everything"))
        self._checkpoint = self._resume = None
        if _local_checkpoint(section.get("ckpt_path")):  # a missing, foreign or corrupt file: a short error, before torch's
            self._checkpoint = read_checkpoint(section["ckpt_path"])
        if sub in ("fit", *_EVALUATE):
            # keep the stock CLI from overlaying the checkpoint's hyper-parameters (its rule class included) on the
            # config: the config describes the model, and the checkpoint must fit it (check_fits), for a resumed fit
            # and an evaluation alike
            self._resume, section["ckpt_path"] = section.get("ckpt_path"), None

    def before_instantiate_classes(self) -> None:
        section = self._section()
        if self._resume is not None:
            section["ckpt_path"] = self._resume
        # one version for every logger of the run, given to their constructors and taken out of the config again
        # afterwards (the config saved with the run keeps no version, so rerunning it starts a new one); a resumed fit
        # keeps the version of the run that wrote its checkpoint
        loggers, ckpt = _file_loggers(section.get("trainer", {})), section.get("ckpt_path")
        check_one_folder(section.get("trainer", {}))
        self._logger_versions = [(init, init.get("version")) for init in loggers]
        fit = self.subcommand in (None, "fit")
        if fit and ckpt == "last":
            if not loggers:
                raise ConfigError("--ckpt_path last needs a logger with a save_dir (CSVLogger or TensorBoardLogger) to "
                                  "find the run folders; give a checkpoint file", option="--ckpt_path")  # fmt: skip
            ckpt = newest_last_checkpoint(_logger_roots(loggers))
            print(f"--ckpt_path last: resuming from {ckpt}", file=sys.stderr)
            section["ckpt_path"] = ckpt = str(ckpt)
            self._checkpoint = read_checkpoint(ckpt)
        if not loggers:
            return
        if fit:
            remove_dead_saves(_logger_roots(loggers))
        resumed = _run_version(Path(ckpt), _logger_roots(loggers)) if fit and _local_checkpoint(ckpt) else None
        self._resumed_in_place = resumed is not None and not any(init.get("version") is not None for init in loggers)
        if self.subcommand in _EVALUATE and _local_checkpoint(ckpt) and Path(ckpt).is_file():
            ckpt = Path(ckpt).resolve()
            run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
            version = str(run_dir / f"{self.subcommand}-{ckpt.stem}")  # absolute: the logger's os.path.join keeps it
        else:
            given = [init["version"] for init in loggers if init.get("version") is not None]
            roots = _logger_roots(loggers)
            version = given[0] if given else resumed if resumed is not None else max(_next_version(root) for root in roots)
        for init in loggers:
            init["version"] = version

    def after_instantiate_classes(self) -> None:
        for init, version in self._logger_versions:
            init["version"] = version

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            config = next((e for e in exception_chain(err) if isinstance(e, ConfigError)), None)
            if config is not None and config.option is None:
                _culprit(config, self._section())
            raise
        apply_threads(self._section().get("threads"), self.model)

    def instantiate_trainer(self, **kwargs):
        kwargs = {**_int_literals(self._raw_args), **kwargs}
        trainer_config = self._section(self.config_init).get("trainer", {})
        callbacks = kwargs.get("callbacks", trainer_config.get("callbacks")) or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        bar = any(isinstance(c, pl.callbacks.ProgressBar) for c in callbacks)
        if trainer_config.get("enable_progress_bar") is not False and not bar:
            kwargs["callbacks"] = [*callbacks, pl.callbacks.TQDMProgressBar(refresh_rate=PROGRESS_REFRESH)]
        trainer = super().instantiate_trainer(**kwargs)
        install_atomic_io(trainer)
        if getattr(self, "_resumed_in_place", False):
            _keep_csv_history(trainer)
        section = self._section()
        if self._checkpoint is not None:  # another rule's or another network's weights: a short error
            check_fits(self.model, section["ckpt_path"], self._checkpoint)
            self._checkpoint = None  # Lightning reads the file itself
        if section.get("ckpt_path") and self.subcommand in (None, "fit"):  # only a resumed fit restores optimizers
            trainer.callbacks.append(ReapplyOptimizerConfig(reapply=bool(section.get("reapply_optimizer_config"))))
        if self.subcommand == "predict" and not any(isinstance(c, pl.callbacks.BasePredictionWriter) for c in trainer.callbacks):
            trainer.callbacks.append(PredictionWriter(announce=True))
        return trainer


class PredictionWriter(pl.callbacks.BasePredictionWriter):
    """Writes the outputs of ``trainer.predict`` to ``<trainer.log_dir>/predictions.pt``: one tensor of shape
    ``(N, outputs)``, the rows in the order of the predict loader (the test split of the shipped data modules). Under
    DDP each replica writes ``predictions-rank<r>.pt`` holding ``{"predictions": ..., "indices": ...}`` (its samples'
    positions in the dataset). ``python -m tplightning predict`` adds it; ``path`` is the file written last.

    Args:
        announce: print the file's path and the outputs' shape once written.

    >>> import tplightning as tp
    >>> from tempfile import mkdtemp
    >>> data = tp.StudentTeacherDataModule(sizes=[3, 2], num_train=8, num_val=4, num_test=5)
    >>> writer = PredictionWriter()
    >>> trainer = pl.Trainer(default_root_dir=mkdtemp(), logger=False, callbacks=[writer], enable_checkpointing=False,
    ...                      enable_progress_bar=False, enable_model_summary=False)
    >>> _ = trainer.predict(tp.BP(sizes=[3, 2]), datamodule=data)
    >>> writer.path.name, torch.load(writer.path).shape
    ('predictions.pt', torch.Size([5, 2]))
    """

    def __init__(self, announce: bool = False):
        super().__init__(write_interval="epoch")
        self.announce, self.path = announce, None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if predictions and isinstance(predictions[0], list):  # several predict loaders: the first
            predictions, batch_indices = predictions[0], batch_indices[0]
        outputs = torch.cat([p.detach().cpu() for p in predictions]) if predictions else torch.empty(0)
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if trainer.world_size > 1:
            indices = torch.tensor([i for batch in batch_indices for i in batch], dtype=torch.long)
            self.path = folder / f"predictions-rank{trainer.global_rank}.pt"
            torch.save({"predictions": outputs, "indices": indices}, self.path)
        else:
            self.path = folder / "predictions.pt"
            torch.save(outputs, self.path)
        if self.announce and trainer.is_global_zero:
            print(f"predictions {tuple(outputs.shape)} written to {self.path}")


class StockCLI(TPLightningCLI):
    """The subcommand CLI of ``python -m tplightning`` (``fit``, ``validate``, ``test``, ``predict``)."""

    subcommand_mode = True

    def before_fit(self) -> None:  # LightningCLI calls it before running the ``fit`` subcommand
        refuse_idle_fit(self.trainer, self.model)


def _cli_kwargs(args: list[str]) -> dict:
    return dict(
        model_class=LearningRule,
        datamodule_class=pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},
    )


def _last_good(cli) -> str | None:
    """The newest checkpoint of this run that passed the divergence check (every checkpoint a rule writes must pass it
    first), or ``None`` when the run wrote none."""
    monitor = getattr(cli.model, "divergence", None)
    if monitor is None or not monitor.checkpoints_passed:
        return None
    callback = cli.trainer.checkpoint_callback
    for path in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")):
        if path and Path(path).is_file():
            return str(path)
    return None


def _step_of(path) -> int | None:
    """The training step a checkpoint file was written at (``None`` when it records none)."""
    return read_checkpoint(path).get("global_step")


def _divergence_advice(cli, args: Sequence[str]) -> str:
    """The command that resumes from the last good checkpoint with a tenth of the forward learning rate.

    The last good checkpoint is the newest one this run wrote (each passed the divergence check before it was
    written); when a resumed run diverges before writing one, it is the checkpoint it resumed from, offered again with
    a tenth of the rate it was resumed with.
    """
    ckpt, resumed = _last_good(cli), cli.config.get("ckpt_path")
    resumed_file = _local_checkpoint(resumed) and Path(resumed).is_file()
    # "again" also when the only checkpoint since the resume holds the resumed state itself (the resumed epoch's end
    # written once more): the same step, so the same weights
    again = resumed_file and (ckpt is None or _step_of(ckpt) == _step_of(resumed))
    if again:
        ckpt = str(resumed)
    if ckpt is None:
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
        if a.split("=", 1)[0] in ("--ckpt_path", "--reapply_optimizer_config", "--model.init_args.forward_optimizer.init_args.lr"):
            if "=" not in a:
                next(it, None)
            continue
        keep.append(a)
    new = ["--ckpt_path", ckpt, "--reapply_optimizer_config", "true"]
    if lr:
        new += ["--model.init_args.forward_optimizer.init_args.lr", f"{lr / 10:g}"]
    program = "python train.py" if Path(sys.argv[0]).name == "train.py" else "tplightning-train"  # a wheel has no train.py
    command = f"{program} " + shlex.join([*keep, *new])
    if again:
        return (f". The run resumed from {ckpt} diverged again before writing a checkpoint. To retry from the same "
                f"checkpoint with a tenth of the learning rate again: {command}")  # fmt: skip
    return (f". No checkpoint was written after this step. To continue from the last good one ({ckpt}, the newest that "
            f"passed the check) with a tenth of the learning rate: {command}")  # fmt: skip


def check_seed(seed) -> None:
    """:class:`~tplightning.errors.ConfigError` naming ``--seed_everything`` for an integer seed outside
    ``[0, 2^32 - 1]`` (the range every generator that Lightning seeds accepts).

    >>> check_seed(2**70)
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: the seed must be an integer in [0, 4294967295], got 1180591620717411303424
    """
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= 2**32 - 1:
        raise ConfigError(f"the seed must be an integer in [0, {2**32 - 1}], got {seed}", option="--seed_everything")


def refuse_idle_fit(trainer, model) -> None:
    """:class:`~tplightning.errors.ConfigError` naming the option when a fit would train nothing: ``max_epochs`` or
    ``max_steps`` 0, ``limit_train_batches`` 0, or a forward learning rate of 0 (or not finite) on a rule that is not
    told ``feedback_only`` (the learned-feedback rules' option to train the feedback weights alone).

    The learning rate is read from an optimizer that ``model.forward_optimizer`` builds for a throwaway parameter.

    >>> import tplightning as tp
    >>> from types import SimpleNamespace
    >>> refuse_idle_fit(SimpleNamespace(max_epochs=0, max_steps=-1, limit_train_batches=1.0), tp.BP(sizes=[2, 1]))
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: max_epochs=0 trains nothing; give at least 1 epoch
    """
    for name in ("max_epochs", "max_steps", "limit_train_batches"):
        if getattr(trainer, name, None) == 0:
            what = "epoch" if name == "max_epochs" else "step" if name == "max_steps" else "batch"
            raise ConfigError(f"{name}={getattr(trainer, name)} trains nothing; give at least 1 {what}", option=f"--trainer.{name}")
    for name in ("val_check_interval", "check_val_every_n_epoch"):  # Lightning divides by them
        if getattr(trainer, name, None) == 0:
            raise ConfigError(f"{name} must be > 0 (null: no validation by epochs), got 0", option=f"--trainer.{name}")
    refuse_automatic_options(trainer, model)
    factory = getattr(model, "forward_optimizer", None)
    if factory is None or not getattr(model, "train_layers", None):
        return
    option = "--model.init_args.forward_optimizer.init_args.lr"
    lr = build_optimizer("forward_optimizer", factory, [torch.zeros(1, requires_grad=True)]).param_groups[0].get("lr")
    lr = float(lr) if isinstance(lr, (int, float, torch.Tensor)) else None
    if lr is not None and not (math.isfinite(lr) and abs(lr) <= torch.finfo(torch.get_default_dtype()).max):
        raise ConfigError(f"the learning rate must be a finite positive float, got {lr}", option=option)
    if lr == 0 and not getattr(model, "feedback_only", False):
        extra = ("; to train the feedback weights alone, set --model.init_args.feedback_only true" if hasattr(model, "feedback_only")
                 else f" ({type(model).__name__} has no feedback weights to train alone)")  # fmt: skip
        raise ConfigError(f"a forward learning rate of 0 trains nothing{extra}", option=option)


def refuse_automatic_options(trainer, model) -> None:
    """:class:`~tplightning.errors.ConfigError` naming the option when a trainer option of automatic optimization is set
    for a rule that optimizes manually (every rule: each computes its own updates): a ``gradient_clip_val`` other than
    0 or unset, or an ``accumulate_grad_batches`` other than 1.

    Lightning clips and accumulates only the gradients of its own automatic step: it stops a fit with a traceback for a
    positive ``gradient_clip_val`` and ignores a negative one without a word. Clipping would belong in a rule's own step
    (``self.clip_gradients(optimizer, ...)`` in a subclass); the shipped rules take no such option, so every non-zero
    value is refused here, negative ones included.

    >>> import tplightning as tp
    >>> from types import SimpleNamespace
    >>> refuse_automatic_options(SimpleNamespace(gradient_clip_val=-1.0, accumulate_grad_batches=1), tp.BP(sizes=[2, 1]))
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: gradient clipping needs automatic optimization; the rules compute their own updates (manual optimization), which Lightning neither clips nor refuses for a negative value, got -1.0: leave it unset (a subclass may clip in its own step with self.clip_gradients, docs/guide.md)
    >>> refuse_automatic_options(SimpleNamespace(gradient_clip_val=None, accumulate_grad_batches=1), tp.BP(sizes=[2, 1]))
    """
    if getattr(model, "automatic_optimization", True):
        return
    clip = getattr(trainer, "gradient_clip_val", None)
    if clip is not None and clip != 0:
        raise ConfigError("gradient clipping needs automatic optimization; the rules compute their own updates (manual "
                          "optimization), which Lightning neither clips nor refuses for a negative value, got "
                          f"{float(clip)}: leave it unset (a subclass may clip in its own step with self.clip_gradients, "
                          "docs/guide.md)", option="--trainer.gradient_clip_val")  # fmt: skip
    accumulate = getattr(trainer, "accumulate_grad_batches", 1)
    if accumulate != 1:
        raise ConfigError("accumulating gradients needs automatic optimization; the rules compute their own updates "
                          f"(manual optimization) from each batch, got {accumulate}: leave it at 1 and raise "
                          "--data.init_args.batch_size instead", option="--trainer.accumulate_grad_batches")  # fmt: skip


def build(args: Sequence[str]) -> TPLightningCLI:
    """The CLI of ``train.py args`` with its model, data module and trainer built (and torch's threads set), not run.

    Raises the user's errors (:func:`tplightning.errors.short_message` prints them short) and any other as it comes.
    """
    _quiet_lightning()
    args = resolve_config_args(args)
    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI reads ``args``; keep it from also seeing argv
    try:
        return TPLightningCLI(run=False, **_cli_kwargs(args))
    finally:
        sys.argv = argv


def main(args: Sequence[str] | None = None, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """Fit and test as configured; returns ``{"cli", "fit_metrics", "test_metrics"}``.

    ``callbacks`` are added to the configured trainer's (objects a config cannot name, such as an Optuna trial's
    pruning callback). Raises ``DivergenceError`` when training diverges (the last good checkpoint stays on disk); its
    message ends with the command that resumes from it with a smaller learning rate.
    """
    raw = [a for a in (sys.argv[1:] if args is None else args) if a != "--traceback"]
    cli = build(raw)
    cli.trainer.callbacks.extend(callbacks)
    try:
        return _fit_and_test(cli, raw)
    except Exception as err:
        if distributed_failure(err):  # which process failed, for report's line; a frozen peer ends with this one
            err.tplightning_rank = (cli.trainer.global_rank, cli.trainer.world_size)
            _end_peers(cli.trainer)
        raise


def _fit_and_test(cli, raw: list[str]) -> dict:
    cfg = cli.config
    refuse_idle_fit(cli.trainer, cli.model)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cfg.get("ckpt_path"))
    except DivergenceError as err:
        raise DivergenceError(str(err).removesuffix(RESUME_HINT) + _divergence_advice(cli, raw)) from err
    fit_metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    test_metrics = {}
    if cfg.get("test_on") != "none":
        ckpt = _own_best(cli.trainer) if cfg.get("test_on") == "best" and not cli.trainer.fast_dev_run else None
        results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
        test_metrics = results[0] if results else {}
    return {"cli": cli, "fit_metrics": fit_metrics, "test_metrics": test_metrics}


def _own_best(trainer) -> str:
    """The best checkpoint that this run's checkpoint callback wrote into its own folder (``--test_on best``); a
    :class:`ConfigError` when it wrote none there, rather than any other file Lightning could resolve."""
    callback = trainer.checkpoint_callback
    best, folder = getattr(callback, "best_model_path", ""), getattr(callback, "dirpath", None)
    if not best or not Path(best).is_file() or folder is None or Path(best).resolve().parent != Path(folder).resolve():
        raise ConfigError("this run wrote no best checkpoint of its own (no checkpoint callback with a monitor, or no "
                          "validation); use --test_on final", option="--test_on", given="best")  # fmt: skip
    return best


def distributed_failure(err: BaseException) -> bool:
    """Whether ``err`` is torch.distributed's report that the process group failed: a ``torch.distributed.DistError``
    (``DistBackendError``, ``DistNetworkError``, ``DistStoreError``), or a ``RuntimeError`` raised inside
    ``torch.distributed`` itself (gloo reports a dead peer, "Connection reset by peer", and a timed-out collective this
    way). A ``RuntimeError`` of any other origin is not one (a bug keeps its traceback).

    >>> distributed_failure(torch.distributed.DistBackendError("NCCL watchdog timeout"))
    True
    >>> distributed_failure(RuntimeError("shape mismatch"))
    False
    """
    if isinstance(err, torch.distributed.DistError):
        return True
    frames = [frame for frame, _ in traceback.walk_tb(err.__traceback__)]
    return isinstance(err, RuntimeError) and bool(frames) and frames[-1].f_globals.get("__name__", "").startswith("torch.distributed")


def _peer_lost(err: BaseException) -> bool:
    """Whether a :func:`distributed_failure` says a peer is gone: torch's own error types, or gloo's report of a closed
    connection or a timed-out collective (a ``RuntimeError`` that carries no type of its own)."""
    text = str(err).lower()
    return isinstance(err, torch.distributed.DistError) or any(w in text for w in ("connection", "timed out", "timeout", "peer"))


def distributed_message(err: BaseException) -> str:
    """The one line :func:`report` prints for a :func:`distributed_failure`: the rank that saw it and torch's reason.

    >>> err = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:61072: Connection reset by peer. This is typically ...")
    >>> err.tplightning_rank = (0, 2)
    >>> print(distributed_message(err))
    error: rank 0 of 2: the distributed run failed: a peer process died or did not answer within the timeout (torch.distributed: Read error [127.0.0.1]:61072: Connection reset by peer); every process of the run ends (--traceback shows the traceback)
    """
    rank, world = getattr(err, "tplightning_rank", (None, None))
    if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    who = f"rank {rank} of {world}" if rank is not None else "a process of the distributed run"
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if text.startswith("[") and "] " in text:  # the C++ source location gloo and NCCL put first
        text = text.split("] ", 1)[1]
    reason = text.split(". ")[0][:200]
    return (f"error: {who}: the distributed run failed: a peer process died or did not answer within the timeout "
            f"(torch.distributed: {reason}); every process of the run ends (--traceback shows the traceback)")  # fmt: skip


def _end_peers(trainer) -> None:
    """End the processes this one launched (Lightning's launcher ends them only on a keyboard interrupt): a stopped
    (frozen) peer would otherwise outlive the run."""
    kill = getattr(getattr(trainer.strategy, "launcher", None), "kill", None)
    if kill is not None:
        kill(signal.SIGKILL)


def wants_traceback(args: Sequence[str]) -> bool:
    return "--traceback" in args or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _while_running(err: BaseException) -> bool:
    """Whether ``err`` came out of a trainer's ``fit``/``validate``/``test``/``predict`` (not out of building the run)."""
    loops = {getattr(pl.Trainer, name).__code__ for name in ("fit", "validate", "test", "predict")}
    return any(frame.f_code in loops for frame, _ in traceback.walk_tb(err.__traceback__))


def report(fn, args: list[str]):
    """Run ``fn(args)``: a user's error prints a few lines and exits 2, a divergence its message and exits 1, a failed
    DDP process group one line (:func:`distributed_message`) and exits 1; any other exception (a bug, wherever it comes
    from) propagates with its traceback.

    >>> def bad(args):
    ...     raise ConfigError("--epochs must be >= 1, got 0")
    >>> report(bad, [])
    Traceback (most recent call last):
    SystemExit: 2
    """
    if wants_traceback(args):
        return fn([a for a in args if a != "--traceback"])
    try:
        return fn(args)
    except DivergenceError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as err:
        if distributed_failure(err):
            print(distributed_message(err), file=sys.stderr)
            if not _peer_lost(err):  # a collective misused (a shape, a dtype): a bug, which keeps its traceback
                raise
            raise SystemExit(1) from None
        message = short_message(err, args, getattr(err, "tplightning_options", ()), getattr(err, "tplightning_config_keys", ()),
                                building=not _while_running(err))
        if message is None:
            raise
        print(message, file=sys.stderr)
        raise SystemExit(2) from None


def run() -> None:
    """Console entry (``train.py``, ``tplightning-train``): :func:`main` with short errors."""
    report(main, list(sys.argv[1:]))
