"""The shared base of every learning rule: forward, loss, eval steps, metrics, schedule, safety."""
from __future__ import annotations

import inspect
import warnings
from abc import ABCMeta, abstractmethod
from collections.abc import Sequence
from typing import Literal

import torch
import torchmetrics
from torch import Tensor, nn

from .._lightning import OptimizerCallable, check_same_lightning, pl
from ..callbacks import _NOT_RESUMABLE, keep_epoch_open, resume_mid_epoch
from ..checkpoints import describe_factory, read as read_checkpoint, recorded_class, recorded_optimizers
from ..errors import ConfigError
from ..layers import Layer, Network, build_network, resolve_layers
from ..losses import get_loss, loss_for_task
from .state import CheckpointState

__all__ = ["LearningRule", "DivergenceError", "DivergenceMonitor", "LinearDecay"]


# the rules check their first training batch in on_after_batch_transfer (the one hook before the batch's own); Lightning
# warns that a data module's hook of that name would take precedence, which is what a data module overriding it wants
warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a")

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


#: the default ``norm_guard`` of the rules (:class:`DivergenceMonitor`): far above what any shipped config reaches in
#: training (docs/divergence.md has the measurements), far below float32's overflow
NORM_GUARD = 1e3


class DivergenceError(RuntimeError):
    """Raised when a loss becomes NaN/inf, or a parameter or buffer non-finite or beyond the norm guard; no checkpoint
    is written after the bad step.

    >>> issubclass(DivergenceError, RuntimeError)  # not a config error: the run itself went wrong
    True
    """


class DivergenceMonitor:
    """Stops training with :class:`DivergenceError` naming the batch, the layer and the tensors when a run diverges.

    Two checks:

    * every step (:meth:`check`): the loss and each layer's activations are finite;
    * at every read of the flags (:meth:`raise_pending`): every floating-point parameter and buffer of ``module``
      (forward and feedback weights, kept inverses, batch-norm statistics) is finite, and every parameter's Frobenius
      norm stays within the guard ``||T|| <= norm_guard * max(||T_0||, 1)``, where ``||T_0||`` is its norm at the
      first checked step of training (saved in checkpoints, so a resumed run keeps the bound). The guard stops a run
      whose weights explode before they overflow to inf; the ``max(., 1)`` keeps a tensor that starts near zero
      (a zero bias) from tripping it on its first steps. Buffers are derived state and have no bound: a kept inverse's
      norm is about ``1 / sigma_min(W)``, which grows by hundreds in normal TP-EI training. The state's norms are one
      reduction per tensor, stacked on the device and read with the step flags in one host read.

    On the CPU :meth:`check` reads the loss's flag at once (reading costs nothing there). On an accelerator reading it
    would stall the host every step, so the step's flags (the loss and each layer's activations finite) stay on the
    device until :meth:`raise_pending` reads them all at once; the rules call it at every logging step, at the end of
    each epoch and before writing a checkpoint, so no checkpoint ever follows a non-finite step or holds a tensor
    that fails the check.

    Args:
        module: the module whose parameters and buffers are checked (a rule passes itself).
        defer: ``None`` defers on accelerators only; ``True`` or ``False`` forces either way.
        norm_guard: the factor of the norm guard; ``None`` checks finiteness only.

    >>> from tplightning.layers import Network, Dense
    >>> monitor = DivergenceMonitor(Network([Dense(2, 2)]), defer=True)
    >>> monitor.check(torch.tensor(float("nan")), [torch.ones(1, 2), torch.ones(1, 2)], batch=7, epoch=0)
    >>> monitor.raise_pending()
    Traceback (most recent call last):
    ...
    tplightning.rules.base.DivergenceError: training diverged at batch 7 (epoch 0): loss is nan, ...
    >>> net = Network([Dense(2, 2)])
    >>> monitor = DivergenceMonitor(net, norm_guard=10.0)
    >>> monitor.check(torch.tensor(1.0), [torch.ones(1, 2), torch.ones(1, 2)], batch=3, epoch=0)
    >>> with torch.no_grad():
    ...     _ = net.layers[0].weight.fill_(100.0)
    >>> monitor.raise_pending()
    Traceback (most recent call last):
    ...
    tplightning.rules.base.DivergenceError: training diverged at batch 3 (epoch 0): non-finite tensors: none, parameter norms beyond norm_guard 10 x max(initial norm, 1): layers.0.weight 200 (initial ...
    """

    def __init__(self, module: torch.nn.Module, defer: bool | None = None, norm_guard: float | None = NORM_GUARD):
        if norm_guard is not None and not norm_guard >= 1:
            raise ConfigError(f"norm_guard must be >= 1 (or None: no guard), got {norm_guard}")
        self.module, self.defer, self.norm_guard = module, defer, norm_guard
        self._pending: list[tuple[int, int, Tensor, Tensor]] = []
        self._last = (0, 0)  # the batch and epoch of the last checked step
        self._initial: dict[str, Tensor] | None = None  # 0-d norms on the device, recorded at the first check
        #: checkpoints whose state passed the check (:meth:`passed_checkpoint`), in this process
        self.checkpoints_passed = 0

    def tensors(self) -> dict[str, Tensor]:
        """The floating-point parameters and buffers the check covers, by their ``state_dict`` names."""
        found = dict(self.module.named_parameters())
        found.update(self.module.named_buffers())
        return {name: t.detach() for name, t in found.items() if t.is_floating_point()}

    def initial_norms(self) -> dict[str, float]:
        """``{name: ||T_0||}`` for a checkpoint (a host read: only when one is written)."""
        return {} if self._initial is None else {n: float(v) for n, v in self._initial.items()}

    def load_initial_norms(self, norms: dict[str, float] | None) -> None:
        """Restore what :meth:`initial_norms` saved; nothing (older checkpoints): the first checked step records them."""
        if norms:
            device = next(iter(self.tensors().values()), torch.zeros(())).device
            self._initial = {n: torch.tensor(float(v), device=device) for n, v in norms.items()}

    def check(self, loss: Tensor, activations: Sequence[Tensor], batch: int, epoch: int) -> None:
        """Raise at once, or keep the flags for :meth:`raise_pending`, when ``loss`` is not finite."""
        self._last = (batch, epoch)
        if self._initial is None:  # the first checked step: its weights are the initial ones (no host read)
            params = {n for n, _ in self.module.named_parameters()}
            self._initial = {n: torch.linalg.vector_norm(t.float()) for n, t in self.tensors().items() if n in params}
        defer = self.defer if self.defer is not None else loss.device.type != "cpu"
        if not defer:
            if not bool(torch.isfinite(loss)):
                self._raise(batch, epoch, loss, [bool(torch.isfinite(h).all()) for h in activations])
            return
        flags = torch.stack([torch.isfinite(loss)] + [torch.isfinite(h).all() for h in activations])  # no host sync
        self._pending.append((batch, epoch, loss.detach(), flags))

    def _state_ok(self, tensors: dict[str, Tensor]) -> Tensor | None:
        """One flag per tensor, on the device: finite, and within the guard (NaN and inf norms fail both)."""
        if not tensors:
            return None
        norms = torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors.values()])
        if self.norm_guard is None or self._initial is None:
            return torch.isfinite(norms)
        initial = [self._initial.get(n) for n in tensors]
        bounds = torch.stack([norms.new_tensor(float("inf")) if v is None else v.to(norms.device) for v in initial])
        return torch.isfinite(norms) & (norms <= self.norm_guard * bounds.clamp(min=1.0))  # a buffer's bound is inf

    def raise_pending(self) -> None:
        """Read the deferred step flags and the state's flags (one host sync); raise for the first non-finite step, or
        for the tensors that fail the check."""
        pending, self._pending = self._pending, []
        tensors = self.tensors()
        state = self._state_ok(tensors)
        parts = [flags[:1] for *_, flags in pending] + ([state.to(torch.bool)] if state is not None else [])
        if not parts:
            return
        read = torch.cat([p.to(parts[-1].device) for p in parts]).tolist()
        steps = read[: len(pending)]
        if not all(steps):
            batch, epoch, loss, flags = pending[steps.index(False)]
            self._raise(batch, epoch, loss, flags[1:].tolist())
        if not all(read[len(pending):]):
            self._raise(*self._last)

    def passed_checkpoint(self) -> None:
        """The check before a checkpoint: :meth:`raise_pending`, then count the checkpoint as good."""
        self.raise_pending()
        self.checkpoints_passed += 1

    def failures(self, tensors: dict[str, Tensor] | None = None) -> tuple[list[str], list[str]]:
        """The names of the non-finite tensors and ``"name norm (initial n)"`` of those beyond the guard (host reads:
        for the message)."""
        tensors = self.tensors() if tensors is None else tensors
        bad = [n for n, t in tensors.items() if not bool(torch.isfinite(t).all())]
        big = []
        if self.norm_guard is not None and self._initial is not None:
            for n, t in tensors.items():
                norm, start = float(torch.linalg.vector_norm(t.float())), self._initial.get(n)
                if n not in bad and start is not None and not norm <= self.norm_guard * max(float(start), 1.0):
                    big.append(f"{n} {norm:.3g} (initial {float(start):.3g})")
        return bad, big

    def _raise(self, batch: int, epoch: int, loss: Tensor | None = None, finite_layers: list[bool] | None = None) -> None:
        parts = []
        if loss is not None:
            layer = finite_layers.index(False) if finite_layers and False in finite_layers else None
            where = f"layer {layer}" if layer is not None else "the output loss"
            parts.append(f"loss is {loss.item()}, first non-finite activation in {where}")
        bad, big = self.failures()
        parts.append(f"non-finite tensors: {_names(bad)}")
        if big:
            parts.append(f"parameter norms beyond norm_guard {self.norm_guard:g} x max(initial norm, 1): {_names(big)}")
        raise DivergenceError(f"training diverged at batch {batch} (epoch {epoch}): " + ", ".join(parts) + RESUME_HINT)


def _names(items: list[str], most: int = 6) -> str:
    """``a, b, c`` (``none`` for no item, the first ``most`` and a count of the others for many)."""
    if not items:
        return "none"
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def abstract_rule_message(name: str) -> str:
    """What building the abstract base ``name`` of the rules says (directly, or through a config that names it).

    >>> abstract_rule_message("TargetPropRule")[:44]
    'TargetPropRule is a base of the rules, not a'
    """
    return (f"{name} is a base of the rules, not a rule; choose a rule such as tplightning.DTPAI or tplightning.BP "
            "(the user guide, docs/guide.md, 'The rules'), or subclass it")  # fmt: skip


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

    The settings are tried first on a probe parameter, so only an error of the settings becomes a short error; one
    that ``params`` cause (a bug of the rule) keeps its traceback.

    >>> import functools
    >>> build_optimizer("forward_optimizer", functools.partial(torch.optim.SGD, lr=-1.0), [torch.zeros(1, requires_grad=True)])
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: forward_optimizer: Invalid learning rate: -1.0
    """
    try:
        factory([torch.zeros(1, requires_grad=True)])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{name}: {err}") from err
    return factory(params)


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


def check_batch(rule: "LearningRule", batch) -> None:
    """:class:`~tplightning.errors.ConfigError` (option ``--data``) when a training batch does not fit ``rule``'s network.

    A batch must be a pair ``(x, y)``: ``x`` of ``B`` items, float of the network's dtype, whose features (all
    dimensions but the first) number ``sizes[0]``, and all finite; ``y`` of ``B`` items, for ``mse`` float targets of
    shape ``(B, n_out)``, all finite, for ``cross_entropy`` integer labels of shape ``(B,)`` in ``[0, n_out)`` (one-hot
    float targets are refused: the loss takes class indices). The values are read back from the device once (one
    host sync), which is why the rules call it on the first training batch only.

    Args:
        rule: the rule whose network the batch must fit.
        batch: the batch as the data module yields it (after the transfer to the device).

    >>> import tplightning as tp
    >>> rule = tp.BP(sizes=[3, 2], loss="cross_entropy")
    >>> check_batch(rule, (torch.zeros(4, 3), torch.tensor([0, 1, 1, 0])))
    >>> check_batch(rule, (torch.zeros(4, 3), torch.tensor([0, 1, 2, 5])))
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: the first training batch has 2 labels outside [0, 2) (smallest 0, largest 5)
    """
    def refuse(message: str):
        raise ConfigError(f"the first training batch {message}", option="--data")

    if not isinstance(batch, (list, tuple)) or len(batch) != 2 or not all(torch.is_tensor(t) for t in batch):
        refuse(f"must be a pair of tensors (inputs, targets), got {type(batch).__name__}")
    x, y = batch
    n_in, n_out, dtype = rule.net.sizes[0], rule.output_dim, rule.dtype
    features = int(torch.tensor(x.shape[1:]).prod()) if x.dim() > 1 else 1
    if x.dim() < 2 or features != n_in:
        refuse(f"has inputs of shape {tuple(x.shape)}: {features} features per item, the model's sizes[0] is {n_in}")
    if x.dtype != dtype:
        refuse(f"has inputs of dtype {x.dtype}, the model computes in {dtype}")
    if len(y) != len(x):
        refuse(f"has {len(x)} inputs but {len(y)} targets")
    classes = rule.loss.task == "classification"
    if classes and (y.is_floating_point() or y.dim() != 1):
        refuse(f"has {y.dtype} targets of shape {tuple(y.shape)}; loss={rule.loss.name!r} takes integer class labels of "
               f"shape ({len(x)},) (not one-hot rows)")  # fmt: skip
    if not classes and (not y.is_floating_point() or tuple(y.shape) != (len(x), n_out)):
        refuse(f"has {y.dtype} targets of shape {tuple(y.shape)}; loss={rule.loss.name!r} takes float targets of shape "
               f"({len(x)}, {n_out})")  # fmt: skip
    zero = x.new_zeros((), dtype=torch.long)
    counts = [(~torch.isfinite(x)).sum(), (~torch.isfinite(y)).sum() if not classes else zero]
    counts += [((y < 0) | (y >= n_out)).sum(), y.min().long(), y.max().long()] if classes and len(y) else [zero] * 3
    bad_x, bad_y, bad_labels, low, high = torch.stack([c.long() for c in counts]).tolist()
    if bad_x:
        refuse(f"holds {bad_x} non-finite input values (NaN or inf): the data is broken, not the learning rate")
    if bad_y:
        refuse(f"holds {bad_y} non-finite target values (NaN or inf): the data is broken, not the learning rate")
    if bad_labels:
        refuse(f"has {bad_labels} labels outside [0, {n_out}) (smallest {low}, largest {high})")


def check_eval_counts(rule: "LearningRule", prefix: str) -> None:
    """Fail a validation or test epoch whose loss was NaN/inf in some batch (read once, at the epoch's end): a
    :class:`~tplightning.errors.ConfigError` (option ``--data``) when those batches' inputs were non-finite, else a
    :class:`DivergenceError` (the model's outputs are not finite). A NaN metric would otherwise be logged, and a
    checkpoint monitoring it kept as the "best".

    Args:
        rule: the rule whose counts (:attr:`_eval_counts`, filled by its validation and test steps) are read and reset.
        prefix: ``val`` or ``test``.

    >>> import tplightning as tp
    >>> rule = tp.BP(sizes=[3, 2])
    >>> rule._eval_counts = {"val": torch.tensor([2, 2])}
    >>> check_eval_counts(rule, "val")
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: the val loss is NaN or inf in 2 batches, whose inputs hold NaN or inf: ...
    """
    counts = getattr(rule, "_eval_counts", {}).pop(prefix, None)
    if counts is None:
        return
    bad, bad_inputs = counts.tolist()
    what = f"the {prefix} loss is NaN or inf in {bad} batch{'es' if bad != 1 else ''}"
    if bad_inputs:
        raise ConfigError(f"{what}, whose inputs hold NaN or inf: the {prefix} data is broken ({bad_inputs} "
                          f"batch{'es' if bad_inputs != 1 else ''} with non-finite inputs); no metric or checkpoint "
                          "is made from it", option="--data")  # fmt: skip
    if bad:
        raise DivergenceError(f"{what} (finite inputs): the model's outputs are not finite; no metric or checkpoint is "
                              "made from them")  # fmt: skip


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
            :class:`~tplightning.layers.Conv2d` and :class:`~tplightning.layers.Dense`), or a PyTorch model: an
            ``nn.Sequential`` or a list of torch modules, split into blocks (:class:`~tplightning.blocks.Block`) by
            :func:`~tplightning.blocks.convert`; ``sizes``, ``activation``, ``negative_slope``, ``bias``, ``init_std`` and
            ``init`` then do not apply.
        norm_guard: training stops (:class:`DivergenceError`) when a parameter's norm exceeds ``norm_guard`` times
            ``max(its initial norm, 1)``, before it overflows to inf (:class:`DivergenceMonitor`); ``None``: no guard.

    Example (a concrete rule; tiny sizes):

    >>> import tplightning as tp
    >>> rule = tp.BP(sizes=[3, 4, 2])
    >>> rule(torch.zeros(5, 3)).shape
    torch.Size([5, 2])
    >>> tp.LearningRule()
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: LearningRule is a base of the rules, not a rule; choose a rule such as tplightning.DTPAI or tplightning.BP (the user guide, docs/guide.md, 'The rules'), or subclass it
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
        network: Sequence[Layer | nn.Module] | nn.Module | None = None,
        norm_guard: float | None = NORM_GUARD,
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
        self.divergence = DivergenceMonitor(self, norm_guard=norm_guard)
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
        groups = [layer.parameter_groups() for layer in layers]  # dense layers: ([W], [b]); a block: every parameter
        params = [p for weights, _ in groups for p in weights] + [p for _, others in groups for p in others]
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
        all-reduce them; this does, which keeps replicas identical. Under mixed precision a gradient computed in
        the autocast dtype is cast to its parameter's dtype, and with a gradient scaler (``16-mixed`` on a GPU) it is
        scaled (``scaler.scale``) as a loss would be, since the precision plugin's step unscales every gradient
        (closed-form gradients never came from the scaled loss; the scale is a power of two, so the round trip is
        exact).
        """
        distributed = self._trainer is not None and self.trainer.world_size > 1
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        optimizer.zero_grad(set_to_none=True)
        for p, g in grads.items():
            g = g.to(p.dtype) if g.dtype != p.dtype else g
            if scaler is not None:
                g = scaler.scale(g)
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

    def configure_callbacks(self):
        """No callbacks of its own; the first hook Lightning calls with the trainer attached, so a trainer or data module
        of the other Lightning package is named here, before Lightning trips over it (see :mod:`tplightning._lightning`)."""
        if self._trainer is not None:
            check_same_lightning(self._trainer, "the trainer")
            if (dm := getattr(self._trainer, "datamodule", None)) is not None:
                check_same_lightning(dm, "the data module")
        return super().configure_callbacks()

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            check_data(self, dm)
        self._batch_unchecked = stage == "fit"  # the first training batch of this fit is checked (check_batch)
        self._eval_counts: dict[str, Tensor] = {}

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """The first training batch of a fit, on the device, goes through :func:`check_batch` (once: later batches are
        not read back); this hook runs before the batch's callbacks and step."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if getattr(self, "_batch_unchecked", False) and self._trainer is not None and self.trainer.training:
            self._batch_unchecked = False
            check_batch(self, batch)
        return batch

    def on_validation_epoch_end(self) -> None:
        self.divergence.raise_pending()  # a training step's divergence, not its consequence on the validation outputs
        check_eval_counts(self, "val")

    def on_test_epoch_end(self) -> None:
        check_eval_counts(self, "test")

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.divergence.passed_checkpoint()  # before the file is written: no checkpoint of a state that fails the check
        super().on_save_checkpoint(checkpoint)
        checkpoint["tplightning"]["initial_norms"] = self.divergence.initial_norms()  # the guard's bounds on resume
        # the optimizer factories and the schedule as plain data: load_from_checkpoint rebuilds the rule with them
        names = [n for n in ("forward_optimizer", "feedback_optimizer") if hasattr(self, n)]
        checkpoint["tplightning"]["optimizers"] = {n: describe_factory(getattr(self, n)) for n in names}
        epochs = self.trainer.max_epochs if self._trainer is not None else None
        checkpoint["tplightning"]["schedule"] = {"lr_final_factor": self.lr_final_factor, "epochs": epochs}
        if not self.epoch_finished():  # a max_steps stop: the resumed run finishes this epoch (exact resume)
            keep_epoch_open(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.divergence.load_initial_norms(checkpoint.get("tplightning", {}).get("initial_norms"))

    def on_train_start(self) -> None:
        """A fit resumed from the middle of an epoch continues with that epoch's next batch (:func:`resume_mid_epoch`),
        whatever callback wrote the checkpoint; Lightning's warning that such a resume is unreliable is then silenced
        until ``teardown``."""
        self._resume_filter = None
        if resume_mid_epoch(self.trainer):
            warnings.filterwarnings("ignore", message=_NOT_RESUMABLE)
            self._resume_filter = warnings.filters[0]

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        if getattr(self, "_resume_filter", None) in warnings.filters:
            warnings.filters.remove(self._resume_filter)
        self._resume_filter = None

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
    # on the device, read once at the epoch's end (check_eval_counts): non-finite losses, of them with non-finite inputs
    flags = torch.stack([~torch.isfinite(loss), ~torch.isfinite(x).all()]).long()
    counts = getattr(rule, "_eval_counts", None)
    if counts is None:
        counts = rule._eval_counts = {}
    counts[prefix] = flags if prefix not in counts else counts[prefix] + flags
    rule.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", sync_dist=True, batch_size=x.shape[0])
    rule.log_dict(metrics, prog_bar=prefix == "val")
    return loss
