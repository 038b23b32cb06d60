"""The shared base of every learning rule: forward, loss, eval steps, metrics, schedule, safety."""
from __future__ import annotations

import inspect
from abc import ABCMeta, abstractmethod
from collections.abc import Sequence
from typing import Literal

import torch
import torchmetrics
from torch import Tensor

from .._lightning import OptimizerCallable, pl
from ..checkpoints import describe_factory, read as read_checkpoint, recorded_class, recorded_optimizers
from ..errors import ConfigError
from ..layers import Layer, Network, build_network, resolve_layers
from ..losses import get_loss, loss_for_task
from .state import CheckpointState

__all__ = ["LearningRule", "DivergenceError", "DivergenceMonitor", "LinearDecay"]


#: the end of a divergence message; the CLI replaces it with the exact command (or says no checkpoint exists yet)
RESUME_HINT = ". No checkpoint was written after this step; resume from the last good one with --ckpt_path, with a smaller learning rate or target_stepsize."


def check_optimizer_factory(name: str, factory) -> None:
    """:class:`~tplightning.errors.ConfigError` unless ``factory`` can build an optimizer from parameters (a class or a
    partial of one).

    >>> check_optimizer_factory("forward_optimizer", torch.optim.SGD)
    >>> check_optimizer_factory("forward_optimizer", 0.1)
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: forward_optimizer must build an optimizer from parameters, e.g. functools.partial(torch.optim.SGD, lr=0.01); got 0.1
    """
    if not callable(factory):
        raise ConfigError(f"{name} must build an optimizer from parameters, e.g. functools.partial(torch.optim.SGD, lr=0.01); "
                          f"got {factory!r}")  # fmt: skip


class DivergenceError(RuntimeError):
    """Raised when a loss becomes NaN/inf; no checkpoint is written after the bad step.

    >>> issubclass(DivergenceError, RuntimeError)  # not a config error: the run itself went wrong
    True
    """


class DivergenceMonitor:
    """Stops training with :class:`DivergenceError` naming the batch and the layer when a step's loss is NaN/inf.

    :meth:`check` takes a step's loss and activations. On the CPU it reads the finiteness flag at once (reading costs
    nothing there). On an accelerator reading it would stall the host every step, so the step's flags (the loss and
    each layer's activations finite) stay on the device until :meth:`raise_pending` reads them all at once; the rules
    call it at every logging step, at the end of each epoch and before writing a checkpoint, so no checkpoint ever
    follows a non-finite step.

    Args:
        net: the network whose weights the message inspects.
        defer: ``None`` defers on accelerators only; ``True`` or ``False`` forces either way.

    >>> from tplightning.layers import Network, Dense
    >>> monitor = DivergenceMonitor(Network([Dense(2, 2)]), defer=True)
    >>> monitor.check(torch.tensor(float("nan")), [torch.ones(1, 2), torch.ones(1, 2)], batch=7, epoch=0)
    >>> monitor.raise_pending()
    Traceback (most recent call last):
    ...
    tplightning.rules.base.DivergenceError: training diverged at batch 7 (epoch 0): loss is nan, ...
    """

    def __init__(self, net: Network, defer: bool | None = None):
        self.net, self.defer = net, defer
        self._pending: list[tuple[int, int, Tensor, Tensor]] = []

    def check(self, loss: Tensor, activations: Sequence[Tensor], batch: int, epoch: int) -> None:
        """Raise at once, or keep the flags for :meth:`raise_pending`, when ``loss`` is not finite."""
        defer = self.defer if self.defer is not None else loss.device.type != "cpu"
        if not defer:
            if not bool(torch.isfinite(loss)):
                self._raise(batch, epoch, loss, [bool(torch.isfinite(h).all()) for h in activations])
            return
        flags = torch.stack([torch.isfinite(loss)] + [torch.isfinite(h).all() for h in activations])  # no host sync
        self._pending.append((batch, epoch, loss.detach(), flags))

    def raise_pending(self) -> None:
        """Read the deferred flags (one host sync) and raise for the first non-finite step."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        finite = torch.stack([flags[0] for *_, flags in pending]).tolist()
        if all(finite):
            return
        batch, epoch, loss, flags = pending[finite.index(False)]
        self._raise(batch, epoch, loss, flags[1:].tolist())

    def _raise(self, batch: int, epoch: int, loss: Tensor, finite_layers: list[bool]) -> None:
        layer = finite_layers.index(False) if False in finite_layers else None
        bad_w = [i for i, W in enumerate(self.net.weights, start=1) if not bool(torch.isfinite(W).all())]
        where = f"layer {layer}" if layer is not None else "the output loss"
        raise DivergenceError(
            f"training diverged at batch {batch} (epoch {epoch}): loss is "
            f"{loss.item()}, first non-finite activation in {where}, non-finite weights in layers "
            f"{bad_w or 'none'}" + RESUME_HINT
        )


def abstract_rule_message(name: str) -> str:
    """What building the abstract base ``name`` of the rules says (directly, or through a config that names it).

    >>> abstract_rule_message("TargetPropRule")[:44]
    'TargetPropRule is a base of the rules, not a'
    """
    return (f"{name} is a base of the rules, not a rule; choose a rule such as tplightning.DTPAI or tplightning.BP "
            "(README, 'The rules'), or subclass it")  # fmt: skip


class _AbstractRule(ABCMeta):
    """:class:`abc.ABCMeta` whose abstract classes (the bases of the rules) refuse to be built with a message that names
    a rule to choose, as a :class:`~tplightning.errors.ConfigError` (a config that names a base class is wrong)."""

    def __call__(cls, *args, **kwargs):
        if inspect.isabstract(cls):
            raise ConfigError(abstract_rule_message(cls.__name__))
        return super().__call__(*args, **kwargs)

    @property
    def __signature__(cls) -> inspect.Signature:  # the constructor's, as without the ``__call__`` above
        sig = inspect.signature(cls.__init__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])


class LinearDecay:
    """Learning-rate factor decaying linearly from 1 to ``final`` over ``epochs`` epochs.

    The thesis' schedule (captions of figs. 5.7 and 5.13-5.19): every learning rate decays
    linearly from its initial value to 1/5 of it over training. Epoch ``e`` (0-based) of ``E``
    uses ``1 - (1 - final) * e / (E - 1)``, so the last epoch runs at ``final``.

    >>> decay = LinearDecay(epochs=5, final=0.2)
    >>> [round(decay(e), 2) for e in range(6)]
    [1.0, 0.8, 0.6, 0.4, 0.2, 0.2]
    """

    def __init__(self, epochs: int, final: float):
        self.epochs, self.final = int(epochs), float(final)

    def __call__(self, epoch: int) -> float:
        if self.epochs <= 1:
            return 1.0
        return 1.0 - (1.0 - self.final) * min(epoch, self.epochs - 1) / (self.epochs - 1)


def build_optimizer(name: str, factory, params) -> torch.optim.Optimizer:
    """The optimizer that ``factory`` (the rule's argument ``name``) builds for ``params``; a bad setting (a negative
    learning rate, an unknown argument) is a :class:`~tplightning.errors.ConfigError` naming the argument.

    >>> import functools
    >>> build_optimizer("forward_optimizer", functools.partial(torch.optim.SGD, lr=-1.0), [torch.zeros(1, requires_grad=True)])
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: forward_optimizer: Invalid learning rate: -1.0
    """
    try:
        return factory(params)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{name}: {err}") from err


class RunningMean(torchmetrics.MeanMetric):
    """``torchmetrics.MeanMetric`` of one 0-d value per update, lean enough for every training batch.

    The parent's ``update`` broadcasts weights, casts and checks for NaN (a host read on an accelerator); here a batch
    adds its value and a count of one, in float32, nothing else. No reduction over DDP replicas at ``compute``
    (the epoch mean is logged with ``sync_dist``, the window mean per replica).

    >>> m = RunningMean()
    >>> for v in (1.0, 2.0, 4.5):
    ...     m.update(torch.tensor(v))
    >>> m.compute()
    tensor(2.5000)
    """

    def __init__(self):
        super().__init__(nan_strategy="disable", sync_on_compute=False)

    def update(self, value: Tensor) -> None:  # type: ignore[override]
        self.mean_value.add_(value.float())  # in place: no module attribute assignment per batch
        self.weight.add_(1)


def check_data(rule: "LearningRule", datamodule) -> None:
    """:class:`~tplightning.errors.ConfigError` when the data's input/output dimensions or task do not fit ``rule``.

    >>> import tplightning as tp
    >>> from types import SimpleNamespace
    >>> check_data(tp.BP(sizes=[3, 2]), SimpleNamespace(input_dim=3, output_dim=2, task="classification"))
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: loss='mse' does not fit the data's task 'classification'; use loss='cross_entropy'
    """
    n_in, n_out = rule.net.sizes[0], rule.output_dim
    d_in = getattr(datamodule, "input_dim", None)
    d_out = getattr(datamodule, "output_dim", None)
    if d_in is not None and d_in != n_in:
        raise ConfigError(f"model sizes[0]={n_in} does not match the data's input dimension {d_in}")
    if d_out is not None and d_out != n_out:
        raise ConfigError(f"model sizes[-1]={n_out} does not match the data's output dimension {d_out}")
    task = getattr(datamodule, "task", None)
    expected = loss_for_task(task)
    if expected is not None and expected.task != rule.loss.task:
        raise ConfigError(f"loss={rule.loss.name!r} does not fit the data's task {task!r}; use loss={expected.name!r}")


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [] if x is None else [x]


class LearningRule(CheckpointState, pl.LightningModule, metaclass=_AbstractRule):
    """Base of all rules: a :class:`~tplightning.layers.Network` trained with manual optimization.

    The network is given (``network``: a list of layers, or their ``{class_path, init_args}`` specs as in
    a config) or built from ``sizes`` and the options below by
    :func:`~tplightning.layers.build_network`, the thesis' MLP. Subclasses implement ``training_step``.
    The base provides the forward pass, the output loss
    (per-sample ``1/2 ||h_L - y||^2`` for ``mse``, cross-entropy on logits for
    ``cross_entropy``), validation/test steps with torchmetrics, the learning-rate schedule,
    divergence checks (:class:`DivergenceMonitor`, ``self.divergence``) and the bookkeeping a resumed run needs to
    continue identically. It is abstract (:mod:`abc`): building it, or a rule that lacks ``training_step``, is a
    :class:`~tplightning.errors.ConfigError` naming a rule to choose.

    Args:
        sizes: layer sizes ``[n_0, ..., n_L]``.
        activation: hidden non-linearity (``leaky_relu``, ``tanh``, ``linear``, ``relu``).
        output_activation: output non-linearity (``linear`` for regression and logits).
        negative_slope: leaky-ReLU slope for negative inputs (thesis: 0.35, toy: 0.1).
        bias: give every layer a bias (the thesis uses none).
        loss: ``mse`` (regression) or ``cross_entropy`` (classification on logits); the rule holds the
            :class:`~tplightning.losses.Loss` of that name as ``self.loss``.
        init_std: std of the Gaussian initial weights (``None``: ``1/sqrt(n_in)``).
        init: ``gaussian`` or ``orthogonal`` initial weights (all singular values 1; see
            :class:`~tplightning.networks.MLP`). Deep tanh networks such as MNIST's need
            ``orthogonal`` for target propagation: the inverses of square Gaussian layers are
            so ill-conditioned that the propagated targets leave tanh's range.
        forward_optimizer: optimizer of the forward weights ``W_i`` (SGD in the thesis).
        lr_final_factor: the learning rate decays linearly to this fraction of its initial
            value over ``trainer.max_epochs`` (thesis: 0.2); 1.0 keeps it constant.
        train_layers: 1-based indices of the layers whose weights learn (negative counts
            from the output, ``-1`` is the output layer); ``None`` trains all.
        network: the layers to train instead of the MLP of ``sizes`` (e.g. a small CNN: a list of
            :class:`~tplightning.layers.Conv2d` and :class:`~tplightning.layers.Dense`); ``sizes``,
            ``activation``, ``negative_slope``, ``bias``, ``init_std`` and ``init`` then do not apply.

    Example (a concrete rule; tiny sizes):

    >>> import tplightning as tp
    >>> rule = tp.BP(sizes=[3, 4, 2])
    >>> rule(torch.zeros(5, 3)).shape
    torch.Size([5, 2])
    >>> tp.LearningRule()
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: LearningRule is a base of the rules, not a rule; choose a rule such as tplightning.DTPAI or tplightning.BP (README, 'The rules'), or subclass it
    """

    def __init__(
        self,
        sizes: Sequence[int] = (6, 6, 6),
        activation: str = "leaky_relu",
        output_activation: str = "linear",
        negative_slope: float = 0.35,
        bias: bool = False,
        loss: Literal["mse", "cross_entropy"] = "mse",
        init_std: float | None = None,
        init: Literal["gaussian", "orthogonal"] = "gaussian",
        forward_optimizer: OptimizerCallable = torch.optim.SGD,
        lr_final_factor: float = 0.2,
        train_layers: Sequence[int] | None = None,
        network: Sequence[Layer] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["forward_optimizer", "feedback_optimizer", "network"])
        self.automatic_optimization = False
        self.loss = get_loss(loss)
        if not 0 < lr_final_factor <= 1:
            raise ConfigError(f"lr_final_factor must be in (0, 1], got {lr_final_factor}")
        check_optimizer_factory("forward_optimizer", forward_optimizer)
        self.net = self.make_network(
            sizes=sizes, activation=activation, output_activation=output_activation, negative_slope=negative_slope,
            bias=bias, init_std=init_std, init=init, network=network,
        )
        if network is not None:
            self.hparams["network"] = self.net.spec  # plain data: a checkpoint rebuilds the layers from it
        self.output_dim = self.net.output_dim  # the model's outputs (AOSDTP's network has extra units)
        self.forward_optimizer = forward_optimizer
        self.lr_final_factor = lr_final_factor
        self.train_layers = resolve_layers(train_layers, self.net.num_layers)
        for i, layer in enumerate(self.net.layers, start=1):
            if i not in self.train_layers:
                layer.requires_grad_(False)
        self.divergence = DivergenceMonitor(self.net)
        self.window_loss, self.epoch_loss = RunningMean(), RunningMean()  # train/loss and train/loss_epoch
        self.val_metrics = torchmetrics.MetricCollection(self.loss.metric(self.output_dim), prefix="val/")
        self.test_metrics = self.val_metrics.clone(prefix="test/")

    # ----------------------------------------------------------------------------- structure
    @property
    def num_layers(self) -> int:
        return self.net.num_layers

    @property
    def forward_weights(self) -> list[Tensor]:
        """The live forward weight tensors ``[W_1, ..., W_L]``, ``W_i`` of shape ``(n_i, n_{i-1})``."""
        return list(self.net.weights)

    def make_network(self, **options) -> Network:
        """The network this rule trains (AOSDTP adds its auxiliary outputs); see :func:`~tplightning.layers.build_network`."""
        return build_network(**options)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def load_forward_weights(self, weights: Sequence[Tensor]) -> None:
        """Overwrite ``[W_1..W_L]`` in place (e.g. a student near its teacher) and refresh derived state."""
        if len(weights) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} weight matrices, got {len(weights)}")
        with torch.no_grad():
            for i, (W, new) in enumerate(zip(self.net.weights, weights), start=1):
                if tuple(new.shape) != tuple(W.shape):
                    raise ValueError(f"weight {i} must have shape {tuple(W.shape)}, got {tuple(new.shape)}")
                W.copy_(new)
        self.on_forward_weights_changed()

    def on_forward_weights_changed(self) -> None:
        """Hook: recompute state derived from ``W`` (inverses, feedback initialisation)."""

    def weight_is_acceptable(self, i: int, W: Tensor) -> bool:
        """Whether ``W`` may serve as layer ``i``'s weights (exact-inverse rules demand robust invertibility)."""
        return True

    # ----------------------------------------------------------------------------- training
    @abstractmethod
    def training_step(self, batch, batch_idx):
        """One training batch with manual optimization; returns the batch's loss."""

    def loss_from_output(self, h_L: Tensor, y: Tensor) -> Tensor:
        """Batch mean of the per-sample loss of the model's outputs (``h_L[:, :output_dim]``)."""
        return self.loss.per_sample(self.net.model_output(h_L), y).mean()

    def check_finite(self, loss: Tensor, activations: Sequence[Tensor]) -> None:
        """This step's :meth:`DivergenceMonitor.check`."""
        self.divergence.check(loss, activations, self.batches_seen, self.current_epoch)

    def log_train(self, loss: Tensor, batch_size: int) -> None:
        """Accumulate the training loss on the device; log it every ``log_every_n_steps`` batches.

        ``self.log`` costs about as much as a small TP step, so the hot path only updates two running means (no
        host sync); the window mean goes out as ``train/loss`` and the epoch mean as ``train/loss_epoch``.
        """
        value = loss.detach()
        self.window_loss.update(value)
        self.epoch_loss.update(value)
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if (self.batches_seen + 1) % every == 0:
            self.divergence.raise_pending()
            self.log("train/loss", self.window_loss.compute(), prog_bar=True, on_step=True, on_epoch=False)
            self.window_loss.reset()

    def on_train_epoch_end(self) -> None:
        self.divergence.raise_pending()
        if self.epoch_loss.update_count:
            self.log("train/loss_epoch", self.epoch_loss.compute(), on_step=False, on_epoch=True, sync_dist=True)
        self.window_loss.reset()
        self.epoch_loss.reset()
        if self.epoch_finished():
            self.step_schedulers()

    def epoch_finished(self) -> bool:
        """Whether the training epoch ending now ran all its batches (``False`` when ``max_steps`` stopped it midway:
        its schedule must not move on, or a run resumed from its checkpoint would finish the epoch at the next
        epoch's rate)."""
        if self._trainer is None:
            return True
        total = self.trainer.num_training_batches
        return total == float("inf") or self.trainer.fit_loop.epoch_loop.batch_progress.current.completed >= total

    # ----------------------------------------------------------------------------- optimizers
    def feedback_parameters(self) -> list[Tensor]:
        return []

    def build_optimizers(self) -> list[torch.optim.Optimizer]:
        """The forward optimizer on the weights of the trained layers, then their biases (the order optimizer states
        were saved in); rules with learned feedback add the feedback optimizer."""
        layers = [self.net.layers[i - 1] for i in self.train_layers]
        params = [layer.weight for layer in layers] + [layer.bias for layer in layers if layer.bias is not None]
        return [build_optimizer("forward_optimizer", self.forward_optimizer, params)]

    def configure_optimizers(self):
        optimizers = self.build_optimizers()
        epochs = self.trainer.max_epochs if self._trainer is not None else None
        if self.lr_final_factor == 1.0 or not epochs or epochs < 1:
            return optimizers
        decay = LinearDecay(epochs, self.lr_final_factor)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in optimizers]
        return optimizers, schedulers

    def optimizer_list(self) -> list:
        return _as_list(self.optimizers())

    def step_schedulers(self) -> None:
        for s in _as_list(self.lr_schedulers()):
            s.step()

    def apply_gradients(self, optimizer, grads: dict[Tensor, Tensor]) -> None:
        """Set ``p.grad`` (averaged over DDP replicas) for each ``p`` and take one optimizer step.

        Target-propagation updates are computed in closed form, not by autograd, so DDP does not
        all-reduce them; this does, which keeps replicas identical.
        """
        distributed = self._trainer is not None and self.trainer.world_size > 1
        optimizer.zero_grad(set_to_none=True)
        for p, g in grads.items():
            p.grad = self.trainer.strategy.reduce(g, reduce_op="mean") if distributed else g
        self.step_optimizer(optimizer)

    #: the ``batches_seen`` of the last batch whose optimizer step Lightning counted (see :meth:`step_optimizer`)
    _counted_batch: int = -1

    def step_optimizer(self, optimizer) -> None:
        """``optimizer.step()``, counted by Lightning once per training batch.

        Lightning's ``global_step`` (and so ``Trainer(max_steps=...)``, ``every_n_train_steps`` and the ``step=`` of
        checkpoint names) counts the steps of the optimizers it wraps (``self.optimizers()``); a target-propagation
        batch steps two (feedback and forward) or more. So the first step of a batch goes through Lightning's wrapper
        and counts, and the others go to the wrapped torch optimizer (``LightningOptimizer.optimizer``): ``global_step``
        counts batches for every rule, as ``max_steps`` means. The uncounted steps skip Lightning's
        ``on_before_optimizer_step`` hooks and its precision plugin's step (the updates are set in closed form, not by a
        scaled backward pass). With a gradient scaler (``16-mixed`` on a GPU) every step goes through the precision
        plugin, which unscales and checks the gradients, so there ``global_step`` counts optimizer steps (two or more
        per target-propagation batch). Lightning counts only steps taken inside ``training_step``, so a rule whose batch may
        change no optimizer's parameters (an exact-inverse layer drawn by RTP-EI) still calls it, with no gradients
        set (a no-op step).
        """
        if self._trainer is None:
            optimizer.step()
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if self._counted_batch == self.batches_seen and scaler is None:
            getattr(optimizer, "optimizer", optimizer).step()
            return
        self._counted_batch = self.batches_seen
        optimizer.step()

    # ----------------------------------------------------------------------------- eval
    def validation_step(self, batch, batch_idx):
        return _evaluate(self, batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        return _evaluate(self, batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        """The model's outputs for a batch of inputs ``x`` or of ``(x, y)`` pairs (``y`` is ignored)."""
        return self(batch[0] if isinstance(batch, (list, tuple)) else batch)

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            check_data(self, dm)

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.divergence.raise_pending()  # before the file is written: no checkpoint after a non-finite step
        super().on_save_checkpoint(checkpoint)
        # the optimizer factories and the schedule as plain data: load_from_checkpoint rebuilds the rule with them
        names = [n for n in ("forward_optimizer", "feedback_optimizer") if hasattr(self, n)]
        checkpoint["tplightning"]["optimizers"] = {n: describe_factory(getattr(self, n)) for n in names}
        epochs = self.trainer.max_epochs if self._trainer is not None else None
        checkpoint["tplightning"]["schedule"] = {"lr_final_factor": self.lr_final_factor, "epochs": epochs}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint``, building the rule class the checkpoint records with the optimizer
        factories it records (see :mod:`tplightning.checkpoints`; ``forward_optimizer=...`` and the like override them)."""
        target = recorded_class(checkpoint_path, cls)
        if inspect.isabstract(target):
            raise ConfigError(f"checkpoint {checkpoint_path} records no tplightning rule class; load it with the rule's own "
                              "class, e.g. tplightning.DTPAI.load_from_checkpoint(path)")  # fmt: skip
        if target is not cls:
            return target.load_from_checkpoint(checkpoint_path, *args, **kwargs)
        kwargs = {**recorded_optimizers(read_checkpoint(checkpoint_path), checkpoint_path), **kwargs}
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)


def _evaluate(rule: LearningRule, batch, metrics, prefix: str) -> Tensor:
    """A validation or test step: the batch's loss and metrics, logged under ``prefix``."""
    x, y = batch
    out = rule(x)
    loss = rule.loss_from_output(out, y)
    metrics.update(out, y)
    rule.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", sync_dist=True, batch_size=x.shape[0])
    rule.log_dict(metrics, prog_bar=prefix == "val")
    return loss
