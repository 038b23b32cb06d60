"""The shared base of every learning rule: forward, loss, eval steps, metrics, schedule, safety."""
from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torchmetrics
from torch import Tensor

from .. import functional as F
from .._lightning import OptimizerCallable, pl
from ..layers import Layer, Network, build_network
from .state import CheckpointState

__all__ = ["LearningRule", "DivergenceError", "LinearDecay"]


#: the end of a divergence message; the CLI replaces it with the exact command (or says no checkpoint exists yet)
RESUME_HINT = ". No checkpoint was written after this step; resume from the last good one with --ckpt_path, with a smaller learning rate or target_stepsize."


def check_optimizer_factory(name: str, factory) -> None:
    """``ValueError`` unless ``factory`` can build an optimizer from parameters (a class or a partial of one)."""
    if not callable(factory):
        raise ValueError(f"{name} must build an optimizer from parameters, e.g. functools.partial(torch.optim.SGD, lr=0.01); "
                         f"got {factory!r}")  # fmt: skip


#: the bases that are not rules by themselves (LearningRule, TargetPropRule): they cannot be built
ABSTRACT: set[type] = set()


class DivergenceError(RuntimeError):
    """Raised when a loss becomes NaN/inf; no checkpoint is written after the bad step."""


class LinearDecay:
    """Learning-rate factor decaying linearly from 1 to ``final`` over ``epochs`` epochs.

    The thesis' schedule (captions of figs. 5.7 and 5.13-5.19): every learning rate decays
    linearly from its initial value to 1/5 of it over training. Epoch ``e`` (0-based) of ``E``
    uses ``1 - (1 - final) * e / (E - 1)``, so the last epoch runs at ``final``.
    """

    def __init__(self, epochs: int, final: float):
        self.epochs, self.final = int(epochs), float(final)

    def __call__(self, epoch: int) -> float:
        if self.epochs <= 1:
            return 1.0
        return 1.0 - (1.0 - self.final) * min(epoch, self.epochs - 1) / (self.epochs - 1)


class LearningRule(CheckpointState, pl.LightningModule):
    """Base of all rules: a :class:`~tplightning.layers.Network` trained with manual optimization.

    The network is given (``network``: a list of layers, or their ``{class_path, init_args}`` specs as in
    a config) or built from ``sizes`` and the options below by
    :func:`~tplightning.layers.build_network`, the thesis' MLP. Subclasses implement ``training_step``.
    The base provides the forward pass, the output loss
    (per-sample ``1/2 ||h_L - y||^2`` for ``mse``, cross-entropy on logits for
    ``cross_entropy``), validation/test steps with torchmetrics, the learning-rate schedule,
    divergence checks and the bookkeeping a resumed run needs to continue identically.

    Args:
        sizes: layer sizes ``[n_0, ..., n_L]``.
        activation: hidden non-linearity (``leaky_relu``, ``tanh``, ``linear``, ``relu``).
        output_activation: output non-linearity (``linear`` for regression and logits).
        negative_slope: leaky-ReLU slope for negative inputs (thesis: 0.35, toy: 0.1).
        bias: give every layer a bias (the thesis uses none).
        loss: ``mse`` (regression) or ``cross_entropy`` (classification on logits).
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
    """

    #: ``True``: defer the per-step finiteness check (:meth:`check_finite`), ``False``: read it at once, ``None``: defer on accelerators only
    defer_finite_check: ClassVar[bool | None] = None

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
        if type(self) in ABSTRACT:
            raise TypeError(f"{type(self).__name__} is a base of the rules, not a rule; choose a rule such as tplightning.DTPAI "
                            "or tplightning.BP (README, 'The rules'), or subclass it")  # fmt: skip
        super().__init__()
        self.save_hyperparameters(ignore=["forward_optimizer", "feedback_optimizer", "network"])
        self.automatic_optimization = False
        if loss not in ("mse", "cross_entropy"):
            raise ValueError(f"unknown loss {loss!r}; expected 'mse' or 'cross_entropy'")
        if not 0 < lr_final_factor <= 1:
            raise ValueError(f"lr_final_factor must be in (0, 1], got {lr_final_factor}")
        check_optimizer_factory("forward_optimizer", forward_optimizer)
        self.net = self.make_network(
            sizes=sizes, activation=activation, output_activation=output_activation, negative_slope=negative_slope,
            bias=bias, init_std=init_std, init=init, network=network,
        )
        if network is not None:
            self.hparams["network"] = self.net.spec  # plain data: a checkpoint rebuilds the layers from it
        self.output_dim = self.net.output_dim  # the model's outputs (AOSDTP's network has extra units)
        self.loss_name = loss
        self.forward_optimizer = forward_optimizer
        self.lr_final_factor = lr_final_factor
        self.train_layers = self._resolve_layers(train_layers)
        for i, layer in enumerate(self.net.layers, start=1):
            if i not in self.train_layers:
                layer.requires_grad_(False)
        self._train_sums: Tensor | None = None
        self._pending_checks: list[tuple[int, int, Tensor, Tensor]] = []  # deferred finiteness flags (check_finite)
        self.batches_seen = 0  # training batches, saved in checkpoints (global_step counts optimizer steps)
        metrics = (
            {"mse": torchmetrics.MeanSquaredError()}
            if loss == "mse"
            else {"acc": torchmetrics.Accuracy(task="multiclass", num_classes=self.output_dim)}
        )
        self.val_metrics = torchmetrics.MetricCollection(metrics, prefix="val/")
        self.test_metrics = self.val_metrics.clone(prefix="test/")

    # ----------------------------------------------------------------------------- structure
    def _resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        L = self.net.num_layers
        if layers is None:
            return list(range(1, L + 1))
        given = layers
        layers = [] if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__") else list(layers)
        if not layers:
            raise ValueError(f"train_layers must list at least one layer index (1..{L}, or -1 for the output layer), got {given!r}")
        out = []
        for i in layers:
            try:
                if isinstance(i, bool):
                    raise TypeError
                i = operator.index(i)  # ints, numpy and 0-d tensor integers
            except TypeError:
                raise ValueError(f"train_layers entries must be integers, got {i!r}") from None
            j = i + L + 1 if i < 0 else i
            if not 1 <= j <= L:
                raise ValueError(f"train_layers entry {i} is out of range for a network with {L} layers (1..{L}, or -{L}..-1 from the output)")
            out.append(j)
        return sorted(set(out))

    @property
    def num_layers(self) -> int:
        return self.net.num_layers

    @property
    def forward_weights(self) -> list[Tensor]:
        """The live forward weight tensors ``[W_1, ..., W_L]``, ``W_i`` of shape ``(n_i, n_{i-1})``."""
        return list(self.net.weights)

    def make_network(self, **options) -> Network:
        """The network this rule trains (hook: AOSDTP adds its auxiliary outputs); see :func:`build_network`."""
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

    # ----------------------------------------------------------------------------- losses
    def loss_from_output(self, h_L: Tensor, y: Tensor) -> Tensor:
        """Batch mean of the per-sample loss of the model's outputs (``h_L[:, :output_dim]``)."""
        return F.per_sample_loss(self.net.model_output(h_L), y, self.loss_name).mean()

    def check_finite(self, loss: Tensor, activations: Sequence[Tensor]) -> None:
        """Stop with :class:`DivergenceError` naming the batch and the layer when ``loss`` is NaN/inf.

        On the CPU the check is immediate (reading a flag costs nothing). On an accelerator reading it would stall
        the host every step, so the step's flags (the loss and each layer's activations finite) stay on the device
        and :meth:`raise_if_diverged` reads them all at once: at the next logging step, at the end of the epoch and
        before any checkpoint is written, so no checkpoint ever follows a non-finite step. ``defer_finite_check``
        (``None``: deferred on accelerators only) forces either way.
        """
        defer = self.defer_finite_check if self.defer_finite_check is not None else loss.device.type != "cpu"
        if not defer:
            if not bool(torch.isfinite(loss)):
                flags = [bool(torch.isfinite(h).all()) for h in activations]
                self._raise_divergence(self.batches_seen, self.current_epoch, loss, flags)
            return
        flags = torch.stack([torch.isfinite(loss)] + [torch.isfinite(h).all() for h in activations])  # no host sync
        self._pending_checks.append((self.batches_seen, self.current_epoch, loss.detach(), flags))

    def raise_if_diverged(self) -> None:
        """Read the deferred flags of :meth:`check_finite` (one host sync) and raise for the first non-finite step."""
        if not self._pending_checks:
            return
        pending, self._pending_checks = self._pending_checks, []
        finite = torch.stack([flags[0] for *_, flags in pending]).tolist()
        if all(finite):
            return
        batch, epoch, loss, flags = pending[finite.index(False)]
        self._raise_divergence(batch, epoch, loss, flags[1:].tolist())

    def _raise_divergence(self, batch: int, epoch: int, loss: Tensor, finite_layers: list[bool]) -> None:
        layer = finite_layers.index(False) if False in finite_layers else None
        bad_w = [i for i, W in enumerate(self.net.weights, start=1) if not bool(torch.isfinite(W).all())]
        where = f"layer {layer}" if layer is not None else "the output loss"
        raise DivergenceError(
            f"training diverged at batch {batch} (epoch {epoch}): loss is "
            f"{loss.item()}, first non-finite activation in {where}, non-finite weights in layers "
            f"{bad_w or 'none'}" + RESUME_HINT
        )

    # ----------------------------------------------------------------------------- optimizers
    def forward_parameters(self) -> list[Tensor]:
        """Weights of the trained layers, then their biases (the order optimizer states were saved in)."""
        layers = [self.net.layers[i - 1] for i in self.train_layers]
        return [layer.weight for layer in layers] + [layer.bias for layer in layers if layer.bias is not None]

    def feedback_parameters(self) -> list[Tensor]:
        return []

    def build_optimizers(self) -> list[torch.optim.Optimizer]:
        """The forward optimizer, then (in rules with learned feedback) the feedback optimizer."""
        return [self.make_optimizer("forward_optimizer", self.forward_parameters())]

    def make_optimizer(self, name: str, params) -> torch.optim.Optimizer:
        """The optimizer that the factory ``self.<name>`` builds for ``params``; a bad setting (a negative learning
        rate, an unknown argument) is reported as ``ValueError`` naming the factory."""
        try:
            return getattr(self, name)(params)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{name}: {err}") from err

    def configure_optimizers(self):
        optimizers = self.build_optimizers()
        epochs = self.trainer.max_epochs if self._trainer is not None else None
        if self.lr_final_factor == 1.0 or not epochs or epochs < 1:
            return optimizers
        decay = LinearDecay(epochs, self.lr_final_factor)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in optimizers]
        return optimizers, schedulers

    def optimizer_list(self) -> list:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def on_train_epoch_end(self) -> None:
        self.raise_if_diverged()
        self._log_epoch_loss()
        self.step_schedulers()

    def step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for s in schedulers if isinstance(schedulers, list) else [schedulers]:
            s.step()

    def apply_gradients(self, optimizer, grads: dict[Tensor, Tensor]) -> None:
        """Set ``p.grad`` (averaged over DDP replicas) for each ``p`` and take one optimizer step.

        Target-propagation updates are computed in closed form, not by autograd, so DDP does not
        all-reduce them; :meth:`reduce_mean` does, which keeps replicas identical.
        """
        optimizer.zero_grad(set_to_none=True)
        for p, g in grads.items():
            p.grad = self.reduce_mean(g)
        optimizer.step()

    def reduce_mean(self, t: Tensor) -> Tensor:
        """Mean over DDP replicas (identity on one device)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return t
        return self.trainer.strategy.reduce(t, reduce_op="mean")

    # ----------------------------------------------------------------------------- eval
    def _eval_step(self, batch, metrics, prefix: str) -> Tensor:
        x, y = batch
        out = self(x)
        loss = self.loss_from_output(out, y)
        metrics.update(out, y)
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", sync_dist=True, batch_size=x.shape[0])
        self.log_dict(metrics, prog_bar=prefix == "val")
        return loss

    def validation_step(self, batch, batch_idx):
        return self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        return self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        """The model's outputs for a batch of inputs ``x`` or of ``(x, y)`` pairs (``y`` is ignored)."""
        return self(batch[0] if isinstance(batch, (list, tuple)) else batch)

    def log_train(self, loss: Tensor, batch_size: int) -> None:
        """Accumulate the training loss on-device; log it every ``log_every_n_steps`` batches.

        ``self.log`` costs about as much as a small TP step, so the hot path only adds to a
        running sum (no host sync); the window mean goes out as ``train/loss`` and the epoch
        mean as ``train/loss_epoch``.
        """
        if self._train_sums is None:
            self._train_sums = torch.zeros(4, device=loss.device)  # window sum, window n, epoch sum, epoch n
        self._train_sums += torch.stack([loss.detach().float(), loss.new_ones((), dtype=torch.float)] * 2)
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if (self.batches_seen + 1) % every == 0:
            self.raise_if_diverged()
            self.log("train/loss", self._train_sums[0] / self._train_sums[1], prog_bar=True, on_step=True, on_epoch=False)
            self._train_sums[:2] = 0

    def on_train_epoch_start(self) -> None:
        self._train_sums = None

    def _log_epoch_loss(self) -> None:
        if self._train_sums is not None and self._train_sums[3] > 0:
            self.log("train/loss_epoch", self._train_sums[2] / self._train_sums[3], on_step=False, on_epoch=True, sync_dist=True)

    # ----------------------------------------------------------------------------- data checks
    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        n_in, n_out = self.net.sizes[0], self.output_dim
        d_in = getattr(dm, "input_dim", None)
        d_out = getattr(dm, "output_dim", None)
        if d_in is not None and d_in != n_in:
            raise ValueError(f"model sizes[0]={n_in} does not match the data's input dimension {d_in}")
        if d_out is not None and d_out != n_out:
            raise ValueError(f"model sizes[-1]={n_out} does not match the data's output dimension {d_out}")
        task = getattr(dm, "task", None)
        expected = {"regression": "mse", "classification": "cross_entropy"}.get(task)
        if expected is not None and expected != self.loss_name:
            raise ValueError(f"loss={self.loss_name!r} does not fit the data's task {task!r}; use loss={expected!r}")

    # ----------------------------------------------------------------------------- checkpoints
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.batches_seen += 1

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_diverged()  # before the file is written: no checkpoint after a non-finite step
        super().on_save_checkpoint(checkpoint)

    def extra_state(self) -> dict:
        return {**super().extra_state(), "batches_seen": self.batches_seen}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.batches_seen = int(state.get("batches_seen", 0))

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint``, building the rule class the checkpoint records (see :mod:`tplightning.checkpoints`)."""
        from ..checkpoints import recorded_class

        target = recorded_class(checkpoint_path, cls)
        if target in ABSTRACT:
            raise ValueError(f"checkpoint {checkpoint_path} records no tplightning rule class; load it with the rule's own "
                             "class, e.g. tplightning.DTPAI.load_from_checkpoint(path)")  # fmt: skip
        if target is not cls:
            return target.load_from_checkpoint(checkpoint_path, *args, **kwargs)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)


ABSTRACT.add(LearningRule)
