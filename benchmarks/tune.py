"""Hyper-parameter search for the MNIST benchmark's rules with Optuna (TPE sampling, pruning, persistent studies).

    python -m benchmarks.tune --rule LeeDTP --trials 40 [--epochs 10] [--subset N]
        [--storage URL] [--study NAME] [--keep NAME...] [--write-config] [--seed S]
    python -m benchmarks.tune --report [RULE...]      (the tuning table of docs/RESULTS.md)
    python -m benchmarks.tune --rule FA --check [--jobs 2]   (the tuned config against the one before, full schedule)
    python -m benchmarks.tune --rule DDTPLinear --check --feedback-schedule '{"every": 2}'   (the config with a schedule
        against the config as it is, full schedule)

Each trial trains the rule's ``mnist/<rule>.yaml`` (in ``tplightning/configs/``) through ``train.py`` with the sampled values as
overrides (no logger, no checkpoint, no test run) and scores it by its **best validation accuracy** on the
5k validation split; the test images are never looked at. The validation accuracy of each epoch is
reported to Optuna, whose median pruner stops a trial that trails the median of the earlier trials at the
same epoch (after ``--warmup`` epochs and ``--startup`` complete trials). A trial that diverges
(``DivergenceError``) is recorded as *pruned* with the accuracy it had reached (user attribute ``diverged``
holds the message), so the sampler learns that the region is bad and the study goes on.

**The search space** (:data:`SPACES`) depends on the rule's family, from the class its config trains; every
family has the same forward part, so BP and the target-propagation rules get the same search for the same
budget (fair budgets, issue 14):

* every rule: the forward learning rate (log-uniform 1e-4 .. 3e-3), the forward optimizer's weight decay
  (log-uniform 1e-4 .. 0.1; decoupled for the configs' AdamW) and, where the config names one, the initial
  weights (``orthogonal`` or ``gaussian``);
* learned-inverse rules (DTP-AI, RDTP-AI, LeeDTP, SDTP, AO-SDTP, ...) in addition: the target step ``η̂``
  (log-uniform 0.01 .. 1), the feedback learning rate (log-uniform 1e-4 .. 0.1), the feedback-noise std ``σ``
  (log-uniform 0.01 .. 2) and the feedback iterations per step (1 .. 4);
* thesis-form rules (``g_i = Q_i s^-1``: DTP-AI, RDTP-AI) in addition: the leaky-ReLU slope ``a`` (uniform
  0.2 .. 0.95) and the damping ``λ`` of ``Q`` (feedback weight decay, log-uniform 1e-3 .. 1; theorem 4.7's
  ``Q = W^T (W W^T + λ/σ² I)^-1``). Their propagated signal is a Gauss-Newton one: through each layer it
  carries ``D^-1`` where the gradient carries ``D``, and with a fraction ``p`` of negative units the cosine
  between the two is ``((1 - p + p/a²)(1 - p + p a²))^-1/2`` per layer (0.62 at the thesis' ``a = 0.35``,
  0.15 after the four layers above layer 1 of the MNIST network; 0.98 at ``a = 0.8``). ``λ`` keeps ``Q`` near
  ``W^T`` rather than ``W^-1`` as ``W`` leaves orthogonality;
* rules with fixed feedback (FA, DFA) search the forward part only (their target step is 1 by design); BDFA, whose
  feedback matrices learn, also its feedback learning rate (log-uniform 1e-4 .. 0.1);
* per rule, :data:`RANGES` moves a range: L-DRL's feedback loss has no ``1/sigma²`` (as the authors' code), so its
  feedback gradients are ``sigma²`` times smaller and its feedback learning rate is searched over 1e-3 .. 3 (its
  config's is 1).

**Budget.** ``--trials`` is the study's total: the number of finished trials (complete or pruned) the study
should hold; a failed trial (one interrupted by Ctrl-C among them) does not count. A rerun of the same command
therefore resumes an interrupted study and runs only the missing trials; several workers started on one
storage stop together when the study is full (each may finish the trial it is running, so a study of ``n``
trials with ``k`` workers ends with ``n`` to ``n + k - 1``). Studies live in ``docs/data/tune/<rule>.journal`` (an Optuna ``JournalStorage`` file, to be committed with the
config it tuned; safe for several processes of one machine; the studies behind the shipped configs predate this
default, and their journals, written under ``runs/tune/``, were not kept) unless ``--storage`` names another: a database URL
(``postgresql://...``, ``mysql+pymysql://...``, ``sqlite:///file.db``) lets processes on several machines
share one study (docs/guide.md, "Tuning").

**The first trial** of a new study is the config as shipped (its values, else the rule's defaults, clipped into the
ranges above), so a study's best is never worse on the proxy than the config it would replace. ``--write-config``
holds to that: it writes nothing (and says which trial is missing and how to finish it) until a trial of the shipped
config is scored (complete, or pruned with the accuracy it had reached); a run finds the shipped config's trials all
failed (interrupted, or their workers dead) enqueues it again and runs it, even when the study is otherwise full.

**Dead workers.** A worker killed mid-trial (SIGKILL, a lost machine) cannot mark its trial; it would stay *running*
for ever. Every worker looks for such trials when it starts and after each trial, marks them failed and enqueues
their values again (Optuna's ``RetryHeartbeatStaleTrialCallback``, at most :data:`MAX_RETRY` times per trial; the
summary names them as *stale*). With a journal file, a worker holds an exclusive ``flock`` on a file of its own in
``<journal>.workers/`` while it works and names it in its trials; the system drops the lock when the process dies,
so a trial whose worker's lock is free is stale at once (Optuna's journal storage has no heartbeat). With a
database, Optuna's heartbeat does it: a running trial without a beat for :data:`GRACE_PERIOD` s (beats every
:data:`HEARTBEAT_INTERVAL` s) is stale. A worker that is stopped but alive (SIGSTOP) keeps its trial.
``--keep NAME...`` holds parameters at the config's value: a proxy of a few epochs cannot see the long-horizon
effect of weight decay (at BP's lr 1e-3 and wd 0.05, decaying linearly to 5 %, AdamW's factor ``1 - lr·wd`` per
step shrinks untrained weights by ``e^-1.1`` over the 43k steps of a 100-epoch MNIST run, by 2.5 % over a 6-epoch
proxy on 20k images), so the campaign keeps ``weight_decay``.

``--epochs`` and ``--subset`` make a cheaper proxy (the learning-rate schedule then decays over the proxy's
epochs; with ``--subset n`` a tenth of the ``n`` images validate, unless ``--num-val`` says otherwise). ``--write-config`` writes the best values into the rule's config, in place, keeping its comments,
under a header comment line naming the study, its trials and the date.

**The check** (``--check``, :func:`check`): the tuned config against the config before tuning on the full
schedule, one seed, by best validation accuracy; the better one stays in ``tplightning/configs/mnist/``, and its run is the
campaign's run of that seed. With ``--feedback-schedule ARGS`` (a JSON object of
:class:`~tplightning.schedules.FeedbackSchedule` arguments; :func:`check_schedule`) the check compares the config with
that ``feedback_schedule`` against the config as it is instead: the schedule is written into the config only if it
keeps or improves the best validation accuracy; otherwise the config is left untouched. Either way the check is
appended to ``data/schedule_checks.jsonl`` beside ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import re
import secrets
import socket
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import yaml

try:
    import fcntl  # POSIX: the lock of a new study's creation (_creation_lock)
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from tplightning._lightning import pl
from tplightning.errors import ConfigError
from tplightning.rules.base import DivergenceError
from tplightning.rules.learned import LearnedInverseRule
from tplightning.rules.target_prop import TargetPropRule
from tplightning.target_maps import ThesisInverse

from benchmarks import common, mnist
from benchmarks.common import config_value, rule_class
from benchmarks.mnist import RULES

__all__ = ["Param", "SPACES", "search_space", "searched", "shipped_values", "family", "overrides", "objective", "run_study", "summary", "report",
           "write_config", "fail_stale_trials", "unscored_shipped", "main"]  # fmt: skip

PROG = "python -m benchmarks.tune"
TUNED_TAG = "# Tuned by"
CHECKED_TAG = "# Checked by"


@dataclass(frozen=True)
class Param:
    """One searched hyper-parameter: its name in the study, the config key it sets (dotted, under the config's
    root) and its distribution: ``low``..``high`` (log-uniform when ``log``; integers when ``integer``) or
    ``choices``. An ``optional`` parameter is searched only where the config sets its key (``init`` of a network
    of layers that name their own, ``negative_slope`` of a rule without leaky-ReLU layers)."""

    name: str
    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple = ()
    optional: bool = False

    def suggest(self, trial):
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


_M = "model.init_args."
FORWARD = (
    Param("lr", _M + "forward_optimizer.init_args.lr", 1e-4, 3e-3, log=True),
    Param("weight_decay", _M + "forward_optimizer.init_args.weight_decay", 1e-4, 0.1, log=True),
    Param("init", _M + "init", choices=("orthogonal", "gaussian"), optional=True),
)
FEEDBACK = (
    Param("target_stepsize", _M + "target_stepsize", 0.01, 1.0, log=True),
    Param("feedback_lr", _M + "feedback_optimizer.init_args.lr", 1e-4, 0.1, log=True),
    Param("feedback_noise_std", _M + "feedback_noise_std", 0.01, 2.0, log=True),
    Param("feedback_iterations", _M + "feedback_iterations", 1, 4, integer=True),
)
#: the thesis form g_i = Q_i s^-1 (DTP-AI, RDTP-AI): the activation's inverse and the damping of Q set how far its
#: Gauss-Newton-like signal is from the gradient (module docstring)
THESIS_FORM = (
    Param("negative_slope", _M + "negative_slope", 0.2, 0.95, optional=True),
    Param("feedback_weight_decay", _M + "feedback_weight_decay", 1e-3, 1.0, log=True),
)
#: the search space of each rule family (module docstring)
SPACES: dict[str, tuple[Param, ...]] = {
    "forward": FORWARD,
    "fixed feedback": FORWARD,
    "trained feedback": FORWARD + FEEDBACK[1:2],
    "learned inverses": FORWARD + FEEDBACK,
    "thesis-form inverses": FORWARD + FEEDBACK + THESIS_FORM,
}


#: per-rule ranges that replace the family's (module docstring): rule -> {parameter: (low, high)}
RANGES: dict[str, dict[str, tuple[float, float]]] = {"LDRL": {"feedback_lr": (1e-3, 3.0)}}


def _config(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r} for tuning; expected one of the MNIST benchmark's rules: {', '.join(RULES)}")
    return RULES[rule].config


def family(rule: str) -> str:
    """The search-space family of ``rule`` (a key of :data:`SPACES`), from the class its config trains."""
    cls = rule_class(_config(rule))
    if issubclass(cls, LearnedInverseRule):
        return "thesis-form inverses" if issubclass(cls.feedback_map, ThesisInverse) else "learned inverses"
    if issubclass(cls, TargetPropRule):
        return "fixed feedback" if _init_param(cls, "feedback_optimizer") is None else "trained feedback"
    return "forward"


def _has_key(config: str, key: str) -> bool:
    try:
        config_value(config, (), key)
    except (KeyError, TypeError):
        return False
    return True


def search_space(rule: str) -> tuple[Param, ...]:
    """The parameters searched for ``rule``: its family's, less the optional ones its config does not set.
    Raises ``ValueError`` for a rule the benchmark does not know."""
    config, ranges = _config(rule), RANGES.get(rule, {})
    space = (p for p in SPACES[family(rule)] if not p.optional or _has_key(config, p.key))
    return tuple(replace(p, low=ranges[p.name][0], high=ranges[p.name][1]) if p.name in ranges else p for p in space)


def _init_param(cls: type, name: str) -> inspect.Parameter | None:
    """``cls``'s init argument ``name``, from the first class of its MRO whose ``__init__`` names it (a subclass
    passes ``**kwargs`` on); None if none does."""
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and (param := inspect.signature(klass.__init__).parameters.get(name)) is not None:
            return param
    return None


def _default(cls: type, name: str):
    """The default of ``cls``'s init argument ``name`` (:func:`_init_param`); ``inspect.Parameter.empty`` if none."""
    param = _init_param(cls, name)
    return inspect.Parameter.empty if param is None else param.default


def shipped_values(rule: str, space: Sequence[Param]) -> dict:
    """The values a run of the rule's config uses for the parameters of ``space``: the config's own, else the rule's
    default (a parameter with neither is left out), each clipped into its search range. They are the study's first
    trial, so its best is never worse on the proxy than the config as shipped."""
    config, out = _config(rule), {}
    for p in space:
        try:
            value = config_value(config, (), p.key)
        except (KeyError, TypeError):
            value = _default(rule_class(config), p.key.removeprefix(_M))
            if value is inspect.Parameter.empty:
                continue
        if p.choices:
            if value in p.choices:
                out[p.name] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = min(max(value, p.low), p.high)
            out[p.name] = int(round(value)) if p.integer else float(value)
    return out


def overrides(space: Sequence[Param], values: dict) -> list[str]:
    """``train.py`` overrides that set each parameter of ``space`` to ``values[name]``."""
    return [arg for p in space if p.name in values for arg in (f"--{p.key}", str(values[p.name]))]


# --------------------------------------------------------------------------------------------- trials
class _Pruning(pl.Callback):
    """Reports each validation epoch's ``val/acc`` to the trial; stops training when Optuna prunes it."""

    def __init__(self, trial, monitor: str = "val/acc"):
        self.trial, self.monitor, self.best, self.pruned_at = trial, monitor, -math.inf, None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value, epoch = float(trainer.callback_metrics[self.monitor]), trainer.current_epoch
        self.best = max(self.best, value) if math.isfinite(value) else self.best
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            trainer.should_stop = True


def trial_args(rule: str, values: dict, epochs: int | None, data: Sequence[str], seed: int) -> list[str]:
    """The ``train.py`` arguments of one trial: the rule's config, the sampled values, no logger, checkpoint or test
    (parameters not in ``values``, the kept ones, stay at the config's value)."""
    config = _config(rule)
    args = ["--config", config, "--test_on", "none", "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
            *common.seed_overrides(config, seed), *data]  # fmt: skip
    if epochs is not None:
        args += ["--trainer.max_epochs", str(epochs)]
    return [*args, *overrides(search_space(rule), values)]


def searched(rule: str, keep: Sequence[str] = ()) -> tuple[Param, ...]:
    """The parameters a study of ``rule`` searches: :func:`search_space` less those in ``keep`` (held at the
    config's value). Raises ``ValueError`` for a name ``keep`` that the rule's space does not have."""
    space = search_space(rule)
    unknown = sorted(set(keep) - {p.name for p in space})
    if unknown:
        raise ValueError(f"--keep {' '.join(unknown)}: not searched for {rule}; its parameters are "
                         f"{', '.join(p.name for p in space)}")  # fmt: skip
    return tuple(p for p in space if p.name not in keep)


def objective(rule: str, epochs: int | None = None, data: Sequence[str] = (), seed: int = 0, keep: Sequence[str] = (),
              worker_lock: str | None = None):  # fmt: skip
    """The Optuna objective of ``rule``: best validation accuracy of a run at the sampled values. ``worker_lock``,
    the name of the lock this process holds while it works on a journal's study (:func:`run_study`), goes into each
    trial's user attributes, so that another worker can tell whether this one is alive (:func:`fail_stale_trials`)."""
    import optuna

    from tplightning.cli import main as cli_main

    space = searched(rule, keep)

    def run(trial) -> float:
        values = {p.name: p.suggest(trial) for p in space}
        if worker_lock is not None:
            trial.set_user_attr("worker_lock", worker_lock)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        pruning = _Pruning(trial)
        try:
            cli_main(trial_args(rule, values, epochs, data, seed), callbacks=[pruning])
        except DivergenceError as err:
            trial.set_user_attr("diverged", str(err).split(". ")[0])
            raise optuna.TrialPruned(f"diverged: {trial.user_attrs['diverged']}") from None
        if pruning.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at + 1}")
        if not math.isfinite(pruning.best):
            raise RuntimeError(f"trial {trial.number} logged no {pruning.monitor}")
        return pruning.best

    return run


# --------------------------------------------------------------------------------------------- studies
#: where studies live by default: commit a journal with the config it tuned, so the study outlives its machine (the
#: studies behind the shipped configs predate this default; their journals, under runs/tune/, were not kept)
STUDIES = common.ROOT / "docs" / "data" / "tune"
#: where ``--check`` writes the config as it was before tuning (its run record names it relative to the checkout)
CHECK_DIR = common.ROOT / "runs" / "check"


def default_storage(rule: str) -> str:
    return str(STUDIES / f"{rule}.journal")


def open_storage(storage: str):
    """An Optuna storage: a database URL (``scheme://...``) with Optuna's heartbeat (every
    :data:`HEARTBEAT_INTERVAL` s; a running trial without a beat for :data:`GRACE_PERIOD` s is failed and run again,
    :func:`_stale`), else a journal file (created with its folder)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" in storage:
        rdb = optuna.storages.RDBStorage
        # optuna < 4.9 names the callback failed_trial_callback
        callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in inspect.signature(rdb).parameters else "failed_trial_callback"
        why = f"no heartbeat for {GRACE_PERIOD} s"
        with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return rdb(storage, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
                       **{callback: lambda study, trial: _stale(study, trial, why)})  # fmt: skip
    path = Path(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


@contextlib.contextmanager
def _creation_lock(storage: str):
    """Holds an exclusive lock on ``<journal>.init.lock`` while a study in a journal file is created and seeded, so
    that workers of one machine started at once enqueue the shipped config once. Databases get no lock here (workers
    on several machines): there ``skip_if_exists`` leaves only workers started within the same instant to race."""
    if "://" in storage or fcntl is None:
        yield
        return
    lock = Path(str(storage) + ".init.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------- dead workers
#: seconds between the heartbeats of a worker on a database storage (Optuna's ``RDBStorage`` heartbeat)
HEARTBEAT_INTERVAL = 60
#: seconds without a heartbeat after which a database study's running trial counts as stale (its worker dead)
GRACE_PERIOD = 180
#: how often a trial whose worker died is enqueued again (the shipped config's: on every run until it is scored)
MAX_RETRY = 2


def _workers_dir(storage: str) -> Path:
    """The folder of the worker locks of the journal ``storage``: ``<journal>.workers/``."""
    return Path(str(storage) + ".workers")


@contextlib.contextmanager
def _worker_lock(storage: str):
    """Holds an exclusive lock on a file of its own, ``<journal>.workers/<host>-<pid>-<token>.lock``, while this
    process works on a journal's study; yields the lock's name (None for a database, or without ``fcntl``). The
    operating system drops the lock when the process dies, however it dies (SIGKILL included), so another worker
    that can take the lock knows that this one is gone (:func:`_worker_alive`). The token keeps a reused process id
    from passing for a dead worker."""
    if "://" in storage or fcntl is None:
        yield None
        return
    name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    path = _workers_dir(storage) / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield name
        finally:
            path.unlink(missing_ok=True)  # closing the file then drops the lock


def _worker_alive(storage: str, name: str) -> bool:
    """Whether the worker whose lock is ``name`` (:func:`_worker_lock`) still holds it. A missing lock file is a
    worker that is gone (it removes its file when it ends)."""
    try:
        fd = os.open(_workers_dir(storage) / f"{name}.lock", os.O_RDWR)  # no O_CREAT: a removed lock stays removed
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the lock if this probe took it
    return False


def _stale(study, trial, why: str) -> None:
    """Record that ``trial`` (failed already) was stale, as the study's user attribute ``stale:<number>`` (the
    summary names it), and enqueue it again with its values and user attributes (Optuna's retry callback, up to
    :data:`MAX_RETRY` times per original trial)."""
    import optuna

    study.set_user_attr(f"stale:{trial.number}", why)
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry(max_retry=MAX_RETRY)(study, trial)


def fail_stale_trials(study, storage: str) -> list[int]:
    """Mark failed the running trials of ``study`` whose worker is dead, and enqueue each again (:func:`_stale`);
    returns their numbers. A journal's trial is stale when the lock its worker held (user attribute ``worker_lock``)
    is free: found at once, as soon as any worker of the study looks (at its start and after each trial). A
    database's stale trials are Optuna's: no heartbeat for :data:`GRACE_PERIOD` s
    (``optuna.storages.fail_stale_trials``). A running trial without a ``worker_lock`` (run outside
    :func:`run_study`) is left as it is."""
    import optuna
    from optuna.trial import TrialState

    if "://" in storage:
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before)
    if fcntl is None:
        return []
    failed = []
    with _creation_lock(storage):  # one worker at a time: a dead worker's trial is failed and enqueued once
        # copies: Optuna's retry callback appends to the trial's retry history in place
        for trial in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
            name = trial.user_attrs.get("worker_lock")
            if name is None or _worker_alive(storage, name):
                continue
            # a worker frees its lock only after its trials are finished: one that ended cleanly just now is no death
            if trial.number not in {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}:
                continue
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            _stale(study, trial, f"its worker {trial.user_attrs.get('worker', name)} died while running it")
            (_workers_dir(storage) / f"{name}.lock").unlink(missing_ok=True)
            failed.append(trial.number)
    return failed


def _shipped(study):
    """``(state, trial)`` of the study's trial of the shipped config: ``"scored"`` with the last complete or pruned
    one, else ``"waiting"`` or ``"running"`` with the last of those, else ``"missing"`` with the last one that failed
    (None if the study has none)."""
    from optuna.trial import TrialState

    shipped = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("shipped")]
    for state, states in (("scored", (TrialState.COMPLETE, TrialState.PRUNED)), ("waiting", (TrialState.WAITING,)),
                          ("running", (TrialState.RUNNING,))):  # fmt: skip
        if found := [t for t in shipped if t.state in states]:
            return state, found[-1]
    return "missing", shipped[-1] if shipped else None


def _enqueue_shipped(study, rule: str, space: Sequence[Param], storage: str) -> None:
    """Enqueue the shipped config again when the study holds no trial of it that is scored, waiting or running (its
    trials failed: a worker died with it beyond :data:`MAX_RETRY`, or it was interrupted): the values of its last
    trial when that got them all, else the config's (:func:`shipped_values`)."""
    with _creation_lock(storage):
        state, last = _shipped(study)
        if state != "missing":
            return
        names = {p.name for p in space}
        values = dict(last.params) if last is not None and names <= set(last.params) else shipped_values(rule, space)
        study.enqueue_trial(values, user_attrs={"shipped": True})


def unscored_shipped(study, storage: str) -> str | None:
    """Why ``--write-config`` may not write the study's best yet (None: it may): the trial of the shipped config is
    not scored, so the best has not been compared with the config it would replace. Says which trial is missing and
    how to finish it."""
    state, trial = _shipped(study)
    if state == "scored":
        return None
    again = "rerun the tuning command (without --write-config), which runs it, then with --write-config"
    if trial is None:
        return f"study {study.study_name} has no trial of the shipped config: {again}"
    which = f"trial {trial.number} (the shipped config) of study {study.study_name}"
    if state == "running":
        worker = trial.user_attrs.get("worker", "an unknown worker")
        return (f"{which} is still running in worker {worker}: let that worker finish it, then rerun with "
                f"--write-config (a worker that died is noticed at the next run on this storage"
                f"{'' if '://' not in storage else f' after {GRACE_PERIOD} s without its heartbeat'})")  # fmt: skip
    if state == "waiting":
        return f"{which} waits to be run: {again}"
    return f"{which} failed ({trial.state.name}) and was not run again: {again}"


def _finished(study) -> list:
    """The trials that count towards ``--trials``: complete and pruned ones (a failed trial, an interrupted one
    among them, is run again)."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def run_study(
    rule: str,
    trials: int,
    storage: str | None = None,
    study_name: str | None = None,
    epochs: int | None = None,
    data: Sequence[str] = (),
    seed: int = 0,
    sampler_seed: int | None = None,
    startup: int = 5,
    warmup: int = 1,
    progress: bool = True,
    keep: Sequence[str] = (),
):
    """Create or load the study of ``rule`` and run trials until it holds ``trials`` finished ones. A new study
    starts with the config's own values (:func:`shipped_values`); ``keep`` names parameters held at the config's
    value."""
    import optuna

    space = searched(rule, keep)  # a bad rule or parameter name fails before any storage is touched
    storage = storage or default_storage(rule)
    with _creation_lock(storage):  # workers started together must not both seed a new study with its first trial
        study = optuna.create_study(
            study_name=study_name or f"mnist-{rule}",
            storage=open_storage(storage),
            direction="maximize",
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=startup),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup),
        )
        if "rule" not in study.user_attrs:  # the proxy a study was made with, for the config header
            study.set_user_attr("rule", rule)
            study.set_user_attr("space", [p.name for p in space])
            study.set_user_attr("epochs", epochs)
            study.set_user_attr("data", list(data))
            study.enqueue_trial(shipped_values(rule, space), user_attrs={"shipped": True}, skip_if_exists=True)
    fail_stale_trials(study, storage)
    _enqueue_shipped(study, rule, space, storage)

    def full(study, _trial) -> None:
        fail_stale_trials(study, storage)  # a worker that died meanwhile: its trial is run again
        if len(_finished(study)) >= trials and _shipped(study)[0] != "waiting":
            study.stop()

    remaining = trials - len(_finished(study))
    if _shipped(study)[0] == "waiting":  # the shipped config is run even in a full study (enqueued trials go first)
        from optuna.trial import TrialState

        remaining = max(remaining, len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))))
    made = (study.user_attrs.get("epochs"), study.user_attrs.get("data"), study.user_attrs.get("space"))
    if remaining > 0 and made != (epochs, list(data), [p.name for p in space]):
        raise ValueError(
            f"study {study.study_name} in {storage} was made with epochs {made[0]}, data overrides {made[1]} and "
            f"parameters {made[2]}, not epochs {epochs}, {list(data)} and {[p.name for p in space]}: its trials would "
            "not compare; resume it with the same --epochs/--subset/--keep or name another --study"
        )
    if remaining > 0:
        with _worker_lock(storage) as lock:
            study.optimize(objective(rule, epochs, data, seed, keep, lock), n_trials=remaining, callbacks=[full],
                           show_progress_bar=progress, gc_after_trial=True)  # fmt: skip
    return study


def summary(study) -> str:
    """The study's counts and best trial as a small Markdown table."""
    from optuna.trial import TrialState

    counts = {s: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    diverged = sum("diverged" in t.user_attrs for t in study.get_trials(deepcopy=False))
    trials = study.get_trials(deepcopy=False)
    stale = {int(k.split(":")[1]): why for k, why in study.user_attrs.items() if k.startswith("stale:")}
    lines = [f"study {study.study_name}: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned "
             f"({diverged} of them diverged), {counts[TrialState.FAIL]} failed ({len(stale)} of them stale), "
             f"{counts[TrialState.RUNNING]} running, {counts[TrialState.WAITING]} waiting"]  # fmt: skip
    retried = {}  # failed trial -> the trial that ran its values again
    for t in trials:
        if history := t.system_attrs.get("retry_history"):
            retried[history[-1]] = t.number
    by_number = {t.number: t for t in trials}
    for number, why in sorted(stale.items()):
        shipped = " (the shipped config)" if by_number[number].user_attrs.get("shipped") else ""
        again = f"run again as trial {retried[number]}" if number in retried else f"not run again (at most {MAX_RETRY} retries)"
        lines.append(f"stale: trial {number}{shipped}: {why}; {again}")
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        lines.append(f"running: trial {t.number}{' (the shipped config)' if t.user_attrs.get('shipped') else ''} in "
                     f"worker {t.user_attrs.get('worker', 'unknown')}")  # fmt: skip
    if counts[TrialState.COMPLETE]:
        best = study.best_trial
        lines += ["", f"best: trial {best.number}, best val/acc {best.value:.4f}", "", "| parameter | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in best.params.items()]
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def report_row(rule: str, study) -> str:
    """One row of the tuning table: the study's proxy and counts, the shipped config's and the best trial's score,
    and the best values."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    pruned = sum(t.state == TrialState.PRUNED for t in done)
    diverged = sum("diverged" in t.user_attrs for t in done)
    # the last trial marked shipped: the first one unless a shipped trial was added later (its values exactly)
    shipped = [t for t in done if t.user_attrs.get("shipped")]
    epochs, data = study.user_attrs.get("epochs"), study.user_attrs.get("data") or []
    subset = dict(zip(data[::2], data[1::2]))
    proxy = f"{epochs or 'max'} ep"
    if "--data.init_args.num_train" in subset:
        proxy += f", {subset['--data.init_args.num_train']}/{subset.get('--data.init_args.num_val', '?')} images"
    best = study.best_trial if any(t.state == TrialState.COMPLETE for t in trials) else None
    values = ", ".join(f"{k} {_fmt(v)}" for k, v in best.params.items()) if best else ""
    shipped_acc = f"{shipped[-1].value:.4f}" if shipped else "-"
    if shipped and shipped[-1].state == TrialState.PRUNED:
        shipped_acc += f" (pruned after {max(shipped[-1].intermediate_values) + 1} ep)"
    best_acc = f"{best.value:.4f}" if best else "-"
    return f"| {rule} | {proxy} | {len(done)} ({pruned} pruned, {diverged} diverged) | {shipped_acc} | {best_acc} | {values} |"


def report(rules: Sequence[str], out: Path) -> str:
    """Write the tuning block of ``out`` from the studies in the default journals of ``rules`` (those that have
    one); returns the block."""
    import optuna

    kept = {}  # rows already in the block, kept for rules without a journal here
    for line in common.read_block(out, "tuning").splitlines():
        cells = line.split("|")
        if len(cells) > 2 and cells[1].strip() in RULES:
            kept[cells[1].strip()] = line
    rows, found = [], 0
    for rule in RULES:
        path = Path(default_storage(rule))
        if rule in rules and path.exists():
            study = optuna.load_study(study_name=f"mnist-{rule}", storage=open_storage(str(path)))
            rows.append(report_row(rule, study))
            found += 1
        elif rule in kept:
            rows.append(kept[rule])
    if not found:
        raise FileNotFoundError(f"no study journal under {common.shown(STUDIES)}/ for {', '.join(rules)}; the rows of the studies "
                                "whose journals are elsewhere stay as they are")
    body = "\n".join([
        "### MNIST tuning studies",
        "",
        f"Written by `{PROG} --report` from the studies' journals (`{common.shown(STUDIES)}/<rule>.journal`; a row whose journal is "
        "missing is kept as it was). Each study searched the "
        "rule's space (module docstring of `benchmarks.tune`; the parameters listed are the searched ones) "
        "with TPE, scoring a trial by its best validation accuracy on the proxy (epochs per trial, training/validation "
        "images); *shipped* is the config as it was before the study (its first trial), *best* the trial whose values "
        "`--write-config` put into `configs/mnist/<rule>.yaml`. Proxy accuracies are not the 100-epoch ones of the table "
        "above.",
        "",
        "| rule | proxy | trials | shipped val acc | best val acc | best values |",
        "|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    common.write_block(out, "tuning", body)
    return body


# --------------------------------------------------------------------------------------------- config writer
def _yaml_scalar(value) -> str:
    """``value`` as a YAML 1.1 scalar that reads back as the same type (PyYAML needs a dot in ``1.0e-04``)."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    text = repr(float(f"{value:.4g}"))
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w]*):(?P<gap>\s*)(?P<value>.*?)(?P<comment>\s+#.*)?$")


def _set(lines: list[str], key: str, value) -> int:
    """Set the dotted ``key`` in the YAML ``lines`` in place: a block scalar, an entry of a flow mapping
    (``init_args: {lr: 0.001}``), or a new line at the end of its parent block. Block mappings and flow
    mappings only (list items are passed over), which is what the configs use. Returns the line's index."""
    *parents, leaf = key.split(".")
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing block keys
    last_inside, child_indent = None, None
    for i, line in enumerate(lines):
        m = _LINE.match(line)
        if not m or line.lstrip().startswith(("#", "-")):
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack]
        if path == parents:
            if m["key"] == leaf:
                lines[i] = f"{m['indent']}{leaf}:{m['gap'] or ' '}{_yaml_scalar(value)}{m['comment'] or ''}"
                return i
            child_indent = indent
        if path + [m["key"]] == parents and m["value"].startswith("{"):
            mapping = {**yaml.safe_load(m["value"]), leaf: value}
            flow = ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in mapping.items())
            lines[i] = f"{m['indent']}{m['key']}:{m['gap']}{{{flow}}}{m['comment'] or ''}"
            return i
        if parents and path[: len(parents)] == parents:
            last_inside = i
        stack.append((indent, m["key"]))
    if last_inside is None or child_indent is None:
        raise KeyError(f"the config has no block {'.'.join(parents)!r} to put {leaf!r} in")
    lines.insert(last_inside + 1, f"{' ' * child_indent}{leaf}: {_yaml_scalar(value)}")
    return last_inside + 1


_TUNED_NOTE = re.compile(r"\s*(?:# |; )tuned \(was (?P<was>[^)]*)\)$")


def _mark_tuned(line: str, was: str) -> str:
    """``line`` ending in ``tuned (was ...)``: a comment of its own, or after the line's comment (an earlier mark
    replaced). Removing :data:`_TUNED_NOTE` gives the line back."""
    line = _TUNED_NOTE.sub("", line)
    return f"{line}{'; ' if ' #' in line else '  # '}tuned (was {was})"


def write_config(path: Path, values: dict[str, object], header: str) -> None:
    """Write ``values`` (dotted config key -> value) into the YAML file ``path`` in place, keeping its comments,
    and put ``header`` as the first comment line (replacing an earlier ``# Tuned by`` line). Each changed line ends
    in ``tuned (was <value before>)``, so the config's prose, written for the values before, stays readable. The
    result is read back and checked."""
    lines = [line for line in Path(path).read_text().splitlines() if not line.startswith(TUNED_TAG)]
    before = yaml.safe_load("\n".join(lines))
    was: dict[int, list[tuple[str, str]]] = {}  # line index -> (key, value before)
    unset = object()
    for key, value in values.items():
        old = before
        for k in key.split("."):
            old = old.get(k, unset) if isinstance(old, dict) else unset
        n = len(lines)
        if old is not unset and old == (float(_yaml_scalar(value)) if isinstance(value, float) else value):
            continue  # unchanged: no mark
        i = _set(lines, key, value)
        if len(lines) > n:  # a line was inserted at i: the marked lines from there on moved down
            was = {j + (j >= i): olds for j, olds in was.items()}
        was.setdefault(i, []).append((key.rsplit(".", 1)[-1], "the default" if old is unset else _yaml_scalar(old)))
    for i, olds in was.items():
        flow = _TUNED_NOTE.sub("", lines[i]).partition(" #")[0].rstrip().endswith("}")
        lines[i] = _mark_tuned(lines[i], ", ".join(f"{k} {v}" for k, v in olds) if flow else olds[0][1])
    text = "\n".join([header, *lines]) + "\n"
    doc = yaml.safe_load(text)
    for key, value in values.items():
        node = doc
        for k in key.split("."):
            node = node[k]
        if node != (float(_yaml_scalar(value)) if isinstance(value, float) else value):
            raise RuntimeError(f"writing {key} = {value!r} into {path} gave {node!r}")
    Path(path).write_text(text)


def before_tuning(text: str) -> str:
    """A config's ``text`` as it was before :func:`write_config`: its ``# Tuned by`` (and ``# Checked by``) header
    lines dropped and each line marked ``tuned (was X)`` given its value ``X`` back (``the default``: the key
    removed). Raises ``ValueError`` when no line is marked."""
    out, marked = [], 0
    for line in text.splitlines():
        if line.startswith((TUNED_TAG, CHECKED_TAG)):
            continue
        was = _TUNED_NOTE.search(line)
        if was is None:
            out.append(line)
            continue
        marked += 1
        m = _LINE.match(_TUNED_NOTE.sub("", line))
        olds = was["was"]
        if m["value"].startswith("{"):
            mapping = yaml.safe_load(m["value"])
            for item in olds.split(", "):
                key, _, value = item.partition(" ")
                if value == "the default":
                    mapping.pop(key, None)
                else:
                    mapping[key] = yaml.safe_load(value)
            value = "{" + ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in mapping.items()) + "}"
        elif olds == "the default":
            continue
        else:
            value = olds
        out.append(f"{m['indent']}{m['key']}:{m['gap'] or ' '}{value}{m['comment'] or ''}")
    if not marked:
        raise ValueError("the config has no line marked 'tuned (was ...)': nothing to compare")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------- full-schedule check
def _score(run: dict) -> float:
    """A run's best validation accuracy; -1 for a run that diverged or has none."""
    return -1.0 if run["diverged"] or run["best_val_acc"] is None else float(run["best_val_acc"])


def _flat(node, prefix: str = "") -> dict:
    """A YAML mapping as ``{dotted key: leaf}``, without the ``init_args`` levels."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for k, v in node.items():
        out.update(_flat(v, prefix if k == "init_args" else f"{prefix}{'.' if prefix else ''}{k}"))
    return out


def _tuned_values(text: str) -> str:
    """``key value`` of each model setting the tuning changed (``forward_optimizer.lr 0.0024; ...``)."""
    tuned, before = (_flat(yaml.safe_load(t)["model"]) for t in (text, before_tuning(text)))
    return "; ".join(f"{k} {_fmt(v)}" for k, v in tuned.items() if before.get(k, object()) != v)


def _paired_runs(tasks: dict, record: Path, jobs: int, name_of) -> dict:
    """The runs of a check's ``tasks`` (name -> benchmark task): taken from ``record`` where recorded, else trained and
    appended to it; ``name_of(run)`` names a fresh run."""
    recorded = mnist.read_runs(record)
    runs = {name: recorded[k] for name, t in tasks.items() if (k := mnist.run_key(*t)) in recorded}
    todo = [t for name, t in tasks.items() if name not in runs]
    for r in common.run_all(mnist._run_task, todo, jobs):
        if r["error"] is not None and not r["diverged"]:
            raise RuntimeError(f"the check's run of {r['config']} failed: {r['error']}")
        mnist.record_run(record, r, mnist._machine(jobs))
        runs[name_of(r)] = r
    return runs


def check(rule: str, jobs: int = 1, record: Path = mnist.RECORD, seed: int = 0) -> dict:
    """Train the tuned config of ``rule`` and the config as it was before tuning (:func:`before_tuning`) on the
    full schedule (the config's epochs and data) with seed ``seed``; keep the one with the higher best validation
    accuracy in ``mnist/<rule>.yaml`` (``tplightning/configs/``), under a ``# Checked by`` header line that gives both scores.

    A proxy of a few epochs can prefer what does not hold over the full schedule (a larger learning rate that
    the proxy's compressed decay tames), so a study's best replaces the config only if it also wins here. Both
    runs go to the campaign's ``record`` (the winner's under the config's own name), so the campaign's run of
    seed ``seed`` is the winner's; the test images are not looked at. Returns the check's record."""
    config = _config(rule)
    path = common._config_path(config)
    text = path.read_text()
    if text.startswith(CHECKED_TAG):
        raise ValueError(f"{path} was already checked ({text.splitlines()[0][len(CHECKED_TAG) + 1:]})")
    before_text = before_tuning(text)
    before_path = CHECK_DIR / Path(config).name
    before_path.parent.mkdir(parents=True, exist_ok=True)
    before_path.write_text(before_text)
    tasks = {"tuned": (rule, config, seed, None, ()), "before": (rule, common.shown(before_path), seed, None, ())}
    runs = _paired_runs(tasks, record, jobs, lambda r: "tuned" if r["config"] == config else "before")
    tuned, before = _score(runs["tuned"]), _score(runs["before"])
    kept, values = ("tuned" if tuned >= before else "before"), _tuned_values(text)
    epochs = config_value(config, (), "trainer.max_epochs")
    header = (f"{CHECKED_TAG} {PROG} --rule {rule} --check: {epochs} epochs, seed {seed}, best val/acc "
              f"{tuned:.4f} tuned against {before:.4f} before tuning; ")  # fmt: skip
    if kept == "tuned":
        path.write_text(f"{header}the tuned values are kept, {date.today().isoformat()}\n{text}")
    else:
        path.write_text(f"{header}the values before tuning are kept (the study's: {values}), "
                        f"{date.today().isoformat()}\n{before_text}")  # fmt: skip
        mnist.record_run(record, {**runs["before"], "config": config}, mnist._machine(jobs))  # the campaign's run now
    out = {"rule": rule, "seed": seed, "epochs": epochs, "kept": kept, "tuned_values": values,
           "date": date.today().isoformat(), **{f"{name}_{k}": runs[name][k] for name in tasks
                                                for k in ("best_val_acc", "best_epoch", "diverged")}}  # fmt: skip
    return out


SCHEDULE_TAG = "# Feedback schedule checked by"
#: a schedule check's record (:func:`check_schedule`), in ``data/schedule_checks.jsonl`` beside ``--out``
SCHEDULE_CHECK_KIND = common.Kind("schedule-check", {"rule": "str", "seed": "int", "epochs": "int", "schedule": "object", "kept": "bool",
                                                     "with_best_val_acc": "number|null", "without_best_val_acc": "number|null",
                                                     "date": "str"}, key=("rule", "schedule"))  # fmt: skip


def with_schedule(text: str, schedule: dict, comment: str) -> str:
    """The config ``text`` with ``feedback_schedule`` (a ``tplightning.FeedbackSchedule`` of the arguments ``schedule``)
    under ``model.init_args``, after its ``feedback_init`` line (the learned-feedback configs all set it).

    >>> print(with_schedule("model:\\n  init_args:\\n    feedback_init: pinv\\ndata: {}\\n", {"every": 2}, "checked"))
    model:
      init_args:
        feedback_init: pinv
        feedback_schedule:  # checked
          class_path: tplightning.FeedbackSchedule
          init_args: {"every": 2}
    data: {}
    <BLANKLINE>
    """
    lines = text.splitlines(keepends=True)
    at = next((k for k, line in enumerate(lines) if re.match(r"^(\s+)feedback_init:", line)), None)
    if at is None or any(re.match(r"^\s+feedback_schedule:", line) for line in lines):
        raise ValueError("the config has no feedback_init line to put feedback_schedule after, or has a feedback_schedule already")
    indent = re.match(r"^(\s+)", lines[at]).group(1)
    block = [f"{indent}feedback_schedule:  # {comment}\n", f"{indent}  class_path: tplightning.FeedbackSchedule\n",
             f"{indent}  init_args: {json.dumps(schedule)}\n"]  # fmt: skip
    return "".join(lines[: at + 1] + block + lines[at + 1 :])


def check_schedule(rule: str, schedule: dict, jobs: int = 1, record: Path = mnist.RECORD, seed: int = 0) -> dict:
    """Train the config of ``rule`` with ``feedback_schedule`` = ``FeedbackSchedule(**schedule)`` (an override) and as it
    is, on the full schedule with seed ``seed`` (a run the campaign's ``record`` holds is not trained again; both are
    recorded there); write the schedule into ``mnist/<rule>.yaml`` (with a ``# Feedback schedule checked by`` header
    line giving both scores) only if its best validation accuracy is at least the config's. Returns the check's record."""
    from tplightning.schedules import FeedbackSchedule

    FeedbackSchedule(**schedule)  # a bad argument stops the check before any training (ConfigError)
    config = _config(rule)
    path = common._config_path(config)
    text = path.read_text()
    value = json.dumps({"class_path": "tplightning.FeedbackSchedule", "init_args": schedule})
    tasks = {"with": (rule, config, seed, None, ("--model.init_args.feedback_schedule", value)), "without": (rule, config, seed, None, ())}
    runs = _paired_runs(tasks, record, jobs, lambda r: "with" if r["overrides"] else "without")
    with_, without = _score(runs["with"]), _score(runs["without"])
    epochs = config_value(config, (), "trainer.max_epochs")
    kept = with_ >= without
    if kept:
        command = f"{PROG} --rule {rule} --check --feedback-schedule '{json.dumps(schedule)}'"
        header = (f"{SCHEDULE_TAG} {command}: {epochs} epochs, seed {seed}, best val/acc {with_:.4f} with the schedule "
                  f"against {without:.4f} without; the schedule is kept, {date.today().isoformat()}\n")  # fmt: skip
        path.write_text(header + with_schedule(text, schedule, f"checked: {with_:.4f} against {without:.4f} without (header)"))
    return {"rule": rule, "seed": seed, "epochs": epochs, "schedule": schedule, "kept": kept, "with_best_val_acc": runs["with"]["best_val_acc"],
            "without_best_val_acc": runs["without"]["best_val_acc"], "date": date.today().isoformat()}  # fmt: skip


#: a check's record (:func:`check`), in ``data/check_runs.jsonl`` beside ``--out``; the latest of a rule is its row
CHECK_KIND = common.Kind("check", {"rule": "str", "seed": "int", "epochs": "int", "kept": "str", "tuned_values": "str", "date": "str",
                                   **{f"{n}_{k}": t for n in ("tuned", "before") for k, t in
                                      (("best_val_acc", "number|null"), ("best_epoch", "int|null"), ("diverged", "bool"))}},
                         key=("rule",))  # fmt: skip


def write_checks(checks: Sequence[dict], out: Path) -> str:
    """Append ``checks`` to the check records beside ``out`` and write the block of full-schedule checks into ``out``
    from all of them (the rows of rules not in ``checks`` kept); returns it."""
    for c in checks:
        common.append_record(common.data_file(out, "check_runs.jsonl"), CHECK_KIND, c)
    by_rule = common.newest(common.read_records(common.data_file(out, "check_runs.jsonl"), CHECK_KIND), key=lambda c: c["rule"])
    rows = []
    for rule in RULES:
        if (c := by_rule.get(rule)) is None:
            continue
        cells = []
        for name in ("tuned", "before"):
            acc = "diverged" if c[f"{name}_diverged"] else f"{c[f'{name}_best_val_acc']:.4f} (epoch {c[f'{name}_best_epoch']})"
            cells.append(f"**{acc}**" if c["kept"] == name else acc)
        rows.append(f"| {rule} | {c['epochs']} | {c['seed']} | {cells[0]} | {cells[1]} | {c['tuned_values']} | {c['date']} |")
    body = "\n".join([
        "### Tuning checked on the full schedule",
        "",
        f"Written by `{PROG} --rule <rule> --check`: the tuned config and the config before tuning, each trained on the "
        "full schedule (all 55k training images, the config's epochs) with one seed, scored by best validation "
        "accuracy; the config keeps the better (bold), and its run is the campaign's run of that seed. The test "
        "images are not looked at.",
        "",
        "| rule | epochs | seed | tuned: best val acc | before tuning: best val acc | the study's values | date |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    common.write_block(out, "check", body)
    return body


def best_values(rule: str, study) -> dict[str, object]:
    """The best trial's values as config keys (:func:`write_config`'s ``values``)."""
    keys = {p.name: p.key for p in search_space(rule)}  # a study's parameters are a part of the rule's space
    return {keys[name]: value for name, value in study.best_trial.params.items() if name in keys}


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", help=f"the rule to tune: {' '.join(RULES)}")
    p.add_argument("--report", nargs="*", metavar="RULE",
                   help="tune nothing: write the tuning table of --out from the journals of these rules (default: all)")
    p.add_argument("--out", type=Path, default=common.RESULTS, help="Markdown file of --report (default: %(default)s)")
    p.add_argument("--trials", type=int, default=40, help="finished trials the study should hold (default: %(default)s)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the config's max_epochs)")
    p.add_argument("--subset", type=int, help="use only this many MNIST training images (num_train = subset - num_val)")
    p.add_argument("--num-val", type=int, help="validation images (default: the config's 5000; with --subset, a tenth)")
    p.add_argument("--data-dir", help="MNIST folder (default: the configs' data cache)")
    p.add_argument("--storage", help=f"Optuna storage: a database URL, or a journal file (default: {common.shown(STUDIES)}/<rule>.journal)")
    p.add_argument("--study", help="study name (default: mnist-<rule>)")
    p.add_argument("--seed", type=int, default=0, help="seed of every trial's run (default: %(default)s)")
    p.add_argument("--sampler-seed", type=int, help="seed of the TPE sampler (default: none; workers should differ)")
    p.add_argument("--startup", type=int, default=5, help="random trials before TPE, and complete trials before pruning (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="epochs a trial runs before it can be pruned (default: %(default)s)")
    p.add_argument("--keep", nargs="+", default=[], metavar="NAME",
                   help="parameters held at the config's value instead of searched (e.g. weight_decay)")
    p.add_argument("--write-config", action="store_true", help="write the best values into the rule's config in tplightning/configs/mnist/")
    p.add_argument("--check", action="store_true",
                   help="tune nothing: train the tuned config and the config before tuning on the full schedule, keep the better")
    p.add_argument("--feedback-schedule", type=json.loads, metavar="ARGS",
                   help="--check: compare the config with this feedback_schedule (FeedbackSchedule arguments as JSON, e.g. "
                        "'{\"every\": 2}') against the config as it is, instead of the tuned config against the one before")
    p.add_argument("--jobs", type=int, default=1, help="--check: worker processes (default: %(default)s)")
    p.add_argument("--record", type=Path, default=mnist.RECORD, help="--check: the campaign's run record (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.report is not None:
        unknown = sorted(set(args.report) - set(RULES))
        if unknown:
            p.error(f"--report {' '.join(unknown)}: unknown rule; expected some of {', '.join(RULES)}")
        return args
    if args.rule is None:
        p.error("--rule is required (or --report)")
    if args.feedback_schedule is not None and (not args.check or not isinstance(args.feedback_schedule, dict)):
        p.error("--feedback-schedule goes with --check and takes a JSON object of FeedbackSchedule arguments, e.g. '{\"every\": 2}'")
    if args.check:
        if args.rule not in RULES:
            p.error(f"--rule {args.rule}: unknown rule; expected one of {', '.join(RULES)}")
        return args
    try:
        searched(args.rule, args.keep)
    except ValueError as err:
        p.error(str(err))
    if args.trials < 1:
        p.error(f"--trials must be >= 1, got {args.trials}")
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    return args


def _data_overrides(args) -> list[str]:
    out = []
    num_val = args.num_val
    if args.subset is not None:
        num_val = num_val if num_val is not None else max(1, args.subset // 10)
        out += ["--data.init_args.subset", str(args.subset), "--data.init_args.num_train", str(args.subset - num_val)]
    if num_val is not None:
        out += ["--data.init_args.num_val", str(num_val)]
    if args.data_dir is not None:
        out += ["--data.init_args.data_dir", args.data_dir]
    return out


def main(argv: Sequence[str] | None = None):
    """Run (or resume) the study, print its summary; returns the study."""
    args = parse_args(argv)  # before optuna: --help works without the tune extra
    import optuna

    common.quiet()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.report is not None:
        try:
            print(report(args.report or list(RULES), args.out))
        except FileNotFoundError as err:
            sys.exit(f"{PROG} --report: {err}")
        print(f"wrote the tuning block of {args.out}")
        return None
    if args.check and args.feedback_schedule is not None:
        try:
            result = check_schedule(args.rule, args.feedback_schedule, args.jobs, args.record, args.seed)
        except (ValueError, ConfigError) as err:
            sys.exit(f"{PROG} --check: {err}")
        common.append_record(common.data_file(args.out, "schedule_checks.jsonl"), SCHEDULE_CHECK_KIND, result)
        print(f"{args.rule}: best val/acc {result['with_best_val_acc']} with the schedule {json.dumps(args.feedback_schedule)}, "
              f"{result['without_best_val_acc']} without; {'written into the config' if result['kept'] else 'the config is left as it was'}")  # fmt: skip
        return result
    if args.check:
        try:
            result = check(args.rule, args.jobs, args.record, args.seed)
        except ValueError as err:
            sys.exit(f"{PROG} --check: {err}")
        write_checks([result], args.out)
        print(f"{args.rule}: best val/acc {result['tuned_best_val_acc']} tuned, {result['before_best_val_acc']} before "
              f"tuning; kept {result['kept']}; wrote the check block of {args.out}")  # fmt: skip
        return result
    study = run_study(args.rule, args.trials, args.storage, args.study, args.epochs, _data_overrides(args), args.seed,
                      args.sampler_seed, args.startup, args.warmup, progress=not args.no_progress, keep=args.keep)  # fmt: skip
    print(summary(study))
    if args.write_config:
        storage = args.storage or default_storage(args.rule)
        fail_stale_trials(study, storage)
        if (why := unscored_shipped(study, storage)) is not None:
            sys.exit(f"{PROG} --write-config: nothing written: {why}")
        if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
            print("no complete trial: nothing written", file=sys.stderr)
        else:
            path = common._config_path(_config(args.rule))
            proxy = f"{study.user_attrs.get('epochs') or 'max_epochs'} epochs per trial"
            if study.user_attrs.get("data"):
                proxy += f", data {' '.join(study.user_attrs['data'])}"
            searched_names = ", ".join(study.user_attrs.get("space") or [p.name for p in search_space(args.rule)])
            header = (f"{TUNED_TAG} {PROG} --rule {args.rule}: study {study.study_name}, {len(_finished(study))} trials, "
                      f"best val/acc {study.best_value:.4f} ({proxy}; searched {searched_names}), "
                      f"{date.today().isoformat()}; lines marked 'tuned' hold its values")  # fmt: skip
            write_config(path, best_values(args.rule, study), header)
            print(f"wrote the best values into {path}")
    return study


if __name__ == "__main__":
    main()
