"""Callbacks: place a student near its teacher (thesis 5.1.3 / 5.2.2), checkpoints whose ``last.ckpt``
is the last finished epoch, and optimizer settings that a resumed run can change."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ._lightning import check_same_lightning, pl
from .checkpoints import install_atomic_io
from .data.base import derive_seed
from .errors import ConfigError

__all__ = ["InitNearTeacher", "Checkpoint", "ReapplyOptimizerConfig", "StepSchedule", "resume_mid_epoch", "keep_epoch_open"]


class InitNearTeacher(pl.Callback):
    """Start the student at Frobenius distance ``distance`` from the teacher, per weight matrix.

    The thesis uses 8.0 ("removes the random luckiness" of the initialisation; about the mean
    distance between two 6x6 standard Gaussian matrices): ``W_i = W_i* + distance * R_i/||R_i||_F``
    with ``R_i`` Gaussian. Directions are redrawn (at most ``max_attempts`` times) until the rule
    accepts the matrix, e.g. until it is robustly invertible for exact-inverse rules. Layers in
    ``copy_layers`` (1-based) are copied from the teacher instead (the toy's shared ``W_2``).
    Runs in ``setup`` before a checkpoint is restored, so a resumed run keeps its loaded weights.

    Args:
        distance: Frobenius distance per weight matrix.
        seed: seed of the perturbation directions.
        copy_layers: layers set equal to the teacher's.
        max_attempts: redraws per layer before giving up with an error.

    >>> InitNearTeacher(distance=8.0, copy_layers=[2]).copy_layers
    [2]
    """

    def __init__(self, distance: float = 8.0, seed: int = 0, copy_layers: Sequence[int] = (), max_attempts: int = 1000):
        if distance < 0:
            raise ConfigError(f"distance must be >= 0, got {distance}")
        self.distance, self.seed, self.copy_layers, self.max_attempts = distance, seed, list(copy_layers), max_attempts

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_same_lightning(trainer, "the trainer")
        if stage != "fit":
            return
        dm = trainer.datamodule
        teacher = getattr(dm, "teacher_weights", None)
        if teacher is None:
            raise ConfigError(f"InitNearTeacher needs a data module with teacher_weights, got {type(dm).__name__}")
        student = pl_module.forward_weights
        shapes = [tuple(W.shape) for W in student]
        if [tuple(W.shape) for W in teacher] != shapes:
            sizes = [int(n) for n in getattr(pl_module.net, "sizes", [])]
            raise ConfigError(
                f"InitNearTeacher places the student near its teacher, but the student's weight shapes {shapes} (sizes "
                f"{sizes}) differ from the teacher's {[tuple(W.shape) for W in teacher]}; --model.init_args.sizes must "
                "equal --data.init_args.sizes",
                option="--model.init_args.sizes",
                given=sizes,
            )
        g = torch.Generator().manual_seed(derive_seed(self.seed, "init near teacher"))
        new = []
        for i, Wt in enumerate(teacher, start=1):
            if i in self.copy_layers:
                new.append(Wt.clone())
                continue
            for _ in range(self.max_attempts):
                R = torch.randn(Wt.shape, generator=g, dtype=Wt.dtype)
                W = Wt + self.distance * R / R.norm()
                if pl_module.weight_is_acceptable(i, W):
                    break
            else:
                raise ConfigError(
                    f"no acceptable weight matrix for layer {i} at distance {self.distance} from the teacher "
                    f"after {self.max_attempts} attempts"
                )
            new.append(W)
        pl_module.load_forward_weights([W.to(student[0].device, student[0].dtype) for W in new])


class Checkpoint(pl.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the end of the last finished training epoch.

    Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only when it also writes a
    top-k checkpoint, i.e. when the monitored metric improved, so ``last.ckpt`` could hold an early epoch. Here
    Lightning keeps the ``save_top_k`` best checkpoints by ``monitor`` (``epoch=E-step=S.ckpt``) and this callback
    writes ``last.ckpt`` itself, through ``trainer.save_checkpoint``, at the end of every training epoch (after that
    epoch's validation). Every argument is ``ModelCheckpoint``'s; ``save_last`` (default ``True``) switches
    ``last.ckpt`` on or off.

    At ``setup`` it gives the trainer an :class:`~tplightning.checkpoints.AtomicCheckpointIO` (unless the trainer has
    a checkpoint plugin of its own): every checkpoint of the run, its own and Lightning's, is written to a temporary
    file in the same folder and renamed into place, and carries a content digest checked when it is read.

    >>> Checkpoint(dirpath="ckpt", monitor="val/loss").write_last
    True
    """

    def __init__(self, *args, save_last: bool | None = True, **kwargs):
        super().__init__(*args, save_last=False, **kwargs)
        self.write_last = bool(save_last)

    def setup(self, trainer, pl_module, stage: str) -> None:
        install_atomic_io(trainer)
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self.write_last or trainer.fast_dev_run or trainer.sanity_checking:
            return
        metrics = {"epoch": trainer.current_epoch, "step": trainer.global_step, **trainer.callback_metrics}
        self.last_model_path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
        trainer.save_checkpoint(self.last_model_path, weights_only=self.save_weights_only)


#: the start of Lightning's warning about a resume from the middle of an epoch with a loader that keeps no state
_NOT_RESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended"


class _SkipFirst(torch.utils.data.Sampler):
    """``sampler`` less its first ``n`` indices in the first iteration (see :func:`resume_mid_epoch`)."""

    def __init__(self, sampler, n: int):
        self.sampler, self.n = sampler, n

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        n, self.n = self.n, 0
        it = iter(self.sampler)
        for _ in zip(range(n), it):
            pass
        yield from it


def resume_mid_epoch(trainer) -> bool:
    """On a fit resumed from a checkpoint written in the middle of an epoch (a ``max_steps`` stop), make the training
    loader leave out the batches of that epoch the checkpoint has already trained, so the resumed run sees the same
    batches, in the same order, as an uninterrupted one; returns whether it did. Every rule calls it when training
    starts, whatever callback wrote the checkpoint.

    Lightning restores the epoch's batch count but starts the loader's epoch from its beginning (unless the loader
    keeps a state of its own). The order of an epoch must depend on the epoch alone (a sampler with ``set_epoch``, such
    as the data modules' :class:`~tplightning.data.base.EpochSeededSampler`, or no shuffling); the first
    ``batches done * batch_size`` indices of the loader's batch sampler are then skipped once. A loader without a
    batch size (a batch sampler of its own) is left as it is, with a warning.

    >>> resume_mid_epoch(pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False))
    False
    """
    if not trainer.ckpt_path:
        return False
    # batches trained: a checkpoint written in on_train_batch_end counts its last batch as processed, not completed
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    total = trainer.num_training_batches
    if not 0 < done < total:
        return False
    loader = trainer.train_dataloader
    batches = getattr(loader, "batch_sampler", None)
    if getattr(loader, "batch_size", None) is None or not hasattr(batches, "sampler"):
        warnings.warn(f"the checkpoint {trainer.ckpt_path} was written after batch {done} of an epoch of {total}; this "
                      "training loader has no batch size, so the resumed epoch starts from its first batch (not exact)",
                      UserWarning, stacklevel=2)  # fmt: skip
        return False
    batches.sampler = _SkipFirst(batches.sampler, done * loader.batch_size)
    return True


def keep_epoch_open(checkpoint: dict) -> None:
    """Record in ``checkpoint`` that the epoch being trained has not ended; for a checkpoint written in the epoch-end
    hooks of an epoch that ``max_steps`` cut short.

    Lightning counts an epoch as processed before its ``on_train_epoch_end`` hooks, so a checkpoint written there (by
    ``ModelCheckpoint`` or :class:`Checkpoint`) would resume at the next epoch, and the rest of the cut epoch would
    be trained under the next epoch's number and the run would end one epoch early. Here the fit loop's saved epoch
    count goes back to "started, not processed", the state of a checkpoint written during the epoch, which Lightning
    resumes in the same epoch. A checkpoint without that state (written elsewhere, or without loops) is left as it is.

    >>> ckpt = {"loops": {"fit_loop": {"epoch_progress": {k: {"ready": 2, "started": 2, "processed": 2, "completed": 1}
    ...                                                    for k in ("total", "current")}}}}
    >>> keep_epoch_open(ckpt); ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]
    {'ready': 2, 'started': 2, 'processed': 1, 'completed': 1}
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    for counts in (progress.get("total"), progress.get("current")):
        if counts is not None and counts["processed"] == counts["completed"] + 1:
            counts["processed"] -= 1


#: optimizer hyper-parameters that a resumed run may take from the config instead of the checkpoint
_STATE_FREE = ("params", "initial_lr")


class StepSchedule(pl.Callback):
    """Step learning-rate schedule at fractions of training: every optimizer's learning rates are multiplied by ``gamma``
    at each milestone, as ``torch.optim.lr_scheduler.MultiStepLR`` stepped once per epoch, with the milestones given as
    fractions of ``trainer.max_epochs`` (so a shortened run keeps the schedule's shape).

    Epoch ``e`` (0-based) of ``E`` runs at ``lr_0 * gamma ** #{m in milestones : e >= floor(m * E)}``; with the default
    milestones (0.5, 0.75) and ``E = 100`` the rate drops at epochs 50 and 75, the schedule of biotorch's benchmarks
    (Sanfiz & Akrout 2021, ``MultiStepLR(milestones=[50, 75], gamma=0.1)``). ``lr_0`` is each parameter group's
    configured rate, kept in the group as ``initial_lr`` (saved with the optimizer, so a resumed run continues the
    schedule). It replaces the rule's own linear decay, which must be off (``lr_final_factor: 1.0``). It applies to
    every optimizer of the rule (the forward one and, for learned feedback, the feedback one), as the linear decay does.

    Args:
        milestones: increasing fractions of training in ``(0, 1)`` at which the rates drop.
        gamma: the factor in ``(0, 1]`` applied at each milestone.

    >>> schedule = StepSchedule(milestones=(0.5, 0.75), gamma=0.1)
    >>> [schedule.factor(e, epochs=8) for e in range(8)]
    [1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.010000000000000002, 0.010000000000000002]
    """

    def __init__(self, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1):
        milestones = [float(m) for m in milestones]
        if not milestones or any(not 0 < m < 1 for m in milestones) or milestones != sorted(milestones):
            raise ConfigError(f"StepSchedule milestones must be increasing fractions of training in (0, 1), got {milestones}")
        if not 0 < gamma <= 1:
            raise ConfigError(f"StepSchedule gamma must be in (0, 1], got {gamma}")
        self.milestones, self.gamma = milestones, float(gamma)

    def factor(self, epoch: int, epochs: int) -> float:
        """The multiplier of the initial rates in epoch ``epoch`` (0-based) of ``epochs``."""
        return self.gamma ** sum(epoch >= int(m * epochs) for m in self.milestones)

    def on_fit_start(self, trainer, pl_module) -> None:
        if getattr(pl_module, "lr_final_factor", 1.0) != 1.0:
            raise ConfigError(f"StepSchedule replaces the rule's linear learning-rate decay: set the rule's lr_final_factor "
                              f"to 1.0 (got {pl_module.lr_final_factor})")  # fmt: skip
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ConfigError(f"StepSchedule needs trainer.max_epochs >= 1 (its milestones are fractions of it), got {trainer.max_epochs}")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        f = self.factor(trainer.current_epoch, trainer.max_epochs)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * f


def _hyperparameters(optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k not in _STATE_FREE} for g in optimizer.param_groups]


class ReapplyOptimizerConfig(pl.Callback):
    """On a resumed run, set the restored optimizers' hyper-parameters to the configured ones.

    ``trainer.fit(..., ckpt_path=...)`` restores every optimizer from the checkpoint, its learning
    rate, momentum, weight decay included: an ``--model.init_args.forward_optimizer.init_args.lr``
    given on resume would silently have no effect. With ``reapply=True`` (``train.py
    --reapply_optimizer_config true``) the configured values replace the restored ones after the
    restore, and the learning-rate schedule is rebuilt from the config (its horizon follows
    ``trainer.max_epochs``, so a run can also be extended) and continues at the restored epoch
    from the new initial rate; the optimizer *state* (momentum buffers, Adam moments) is kept.
    With ``reapply=False`` a warning names every configured value the checkpoint overrides. ``target_stepsize`` and the
    other rule arguments are not optimizer state: they always come from the config.

    >>> ReapplyOptimizerConfig(reapply=True).ignored  # filled with the overridden values on a resumed run
    []
    """

    def __init__(self, reapply: bool = False):
        self.reapply = reapply
        self.ignored: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.ckpt_path or not hasattr(pl_module, "build_optimizers"):
            return
        configured = pl_module.configure_optimizers()
        fresh, fresh_schedulers = configured if isinstance(configured, tuple) else (configured, [])
        restored = trainer.optimizers
        schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
        names = ["forward_optimizer", "feedback_optimizer"]
        self.ignored = []
        for i, (new, old) in enumerate(zip(fresh, restored)):
            name = names[i] if i < len(names) else f"optimizer {i}"
            for j, (gn, go) in enumerate(zip(_hyperparameters(new), _hyperparameters(old))):
                base_old = old.param_groups[j].get("initial_lr", go.get("lr"))
                for key, value in gn.items():
                    was = base_old if key == "lr" else go.get(key)
                    if key in go and not _same(value, was):
                        self.ignored.append(f"{name}.{key}: config {value}, checkpoint {was}")
                if self.reapply:
                    group = old.param_groups[j]
                    for key, value in gn.items():
                        if key != "lr":
                            group[key] = value
                    group["initial_lr"] = gn["lr"]
            if i < len(schedulers) and i < len(fresh_schedulers):
                s, f = schedulers[i], fresh_schedulers[i]
                old_l, new_l = getattr(s, "lr_lambdas", None), getattr(f, "lr_lambdas", None)
                if old_l is not None and new_l is not None:
                    if [vars(x) for x in old_l if hasattr(x, "__dict__")] != [vars(x) for x in new_l if hasattr(x, "__dict__")]:
                        self.ignored.append(f"{name} schedule: config {_describe(new_l)}, checkpoint {_describe(old_l)}")
                    if self.reapply:
                        s.lr_lambdas = list(new_l)
            if self.reapply and i < len(schedulers):
                s = schedulers[i]
                s.base_lrs = [g["initial_lr"] for g in old.param_groups]
                lambdas = getattr(s, "lr_lambdas", None)
                for g, base, f in zip(old.param_groups, s.base_lrs, lambdas or [lambda e: 1.0] * len(s.base_lrs)):
                    g["lr"] = base * f(s.last_epoch)
            elif self.reapply:
                for g in old.param_groups:
                    g["lr"] = g["initial_lr"]
        if self.ignored and not self.reapply:
            warnings.warn(
                "resuming from a checkpoint restores the optimizers and their schedules, so these configured values "
                "are ignored: " + "; ".join(self.ignored) + ". Add --reapply_optimizer_config true "
                "(or ReapplyOptimizerConfig(reapply=True)) to use the configured values.",
                UserWarning,
                stacklevel=2,
            )


def _describe(lambdas) -> str:
    return ", ".join(f"{type(f).__name__}({', '.join(f'{k}={v}' for k, v in vars(f).items())})" if hasattr(f, "__dict__") else repr(f) for f in lambdas)


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors, tuples of tensors
        return repr(a) == repr(b)
