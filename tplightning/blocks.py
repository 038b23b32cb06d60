"""Blocks: any PyTorch ``nn.Module`` as a target-propagation layer ``f_i``, and :func:`convert` for ``nn.Sequential`` models.

A :class:`Block` wraps a module ``f_i`` (one torch module, or an ``nn.Sequential`` of several such as
``Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d``, or a residual block of your own) and gives the rules what they need
from a layer (:class:`~tplightning.layers.Layer`):

* the local-loss gradient ``mean_b 1/2 ||f_i(h_{i-1}) - h^_i||^2`` (thesis eq. 4.12) with respect to every parameter of
  every submodule, by autograd (a vector-Jacobian product); :meth:`Block.vjp` gives ``J_{f_i}^T v`` for feedback that
  follows the block's Jacobian (backprop-like maps such as LeeDTP's gradient target);
* a learned feedback module ``g_i`` (:meth:`Block.make_feedback`), built from the block by the mirror rule below, or
  the module you give (``feedback=``); the learned target maps call it where a dense layer's map multiplies by a matrix
  ``Q`` (:meth:`Block.transpose`).

A block has no split into a pre-activation and an activation: :meth:`Block.forward_pre` returns ``(h_i, h_i)`` and
:attr:`Block.activation` is the block's *trailing* activation (the last element-wise non-linearity, followed only by
pooling, dropout or flattening; the identity when there is none). The learned original-form maps
``g_i(h) = s_i(G_{i+1}(h))`` (eq. 5.54 with the matrix ``Q`` replaced by the mirror module ``G``) end with it, so that
the feedback lands in the range of ``h_i``. What needs a matrix or an inverse activation (exact inverses, the thesis
form ``Q s^{-1}``, the modified ``D^{-1}`` rules, ``D_{s_i}``) raises a :class:`~tplightning.errors.ConfigError`
naming the block.

Batch-norm statistics and dropout follow ``train()``/``eval()`` as in plain PyTorch. The running statistics are
updated by one forward pass per training batch: the rule's forward pass. Every other evaluation of the block in the
same step (the local loss, the feedback losses, a fresh pass after the forward update) runs inside
:meth:`~tplightning.layers.Network.frozen_state`: in training mode it still normalises by the batch's own statistics,
but on copies of the buffers, so ``running_mean``, ``running_var`` and ``num_batches_tracked`` move once per batch.
The local loss and :meth:`Block.vjp` replay the dropout mask of that forward pass (the random generator's state is
kept when a block holds dropout), so the gradient is that of the function that produced ``h_i``.

The automatic feedback module mirrors the block's modules in reverse order:

| forward module | feedback module |
| --- | --- |
| ``Linear(n_in, n_out)`` | ``Linear(n_out, n_in, bias=False)`` |
| ``Conv2d(c_in, c_out, k, s, p, d)`` | ``ConvTranspose2d(c_out, c_in, k, s, p, output_padding, d, bias=False)``, exact shape |
| ``MaxPool2d``, ``AvgPool2d``, adaptive 2-d pools | ``Upsample(size=input size, mode="nearest")`` |
| ``Flatten``, ``Unflatten`` | ``Unflatten`` / ``Flatten`` back to the input's shape |
| batch norm, dropout, activations, ``Identity`` | nothing (skipped) |
| anything else | refused: give ``feedback=`` |

(Convolutions with groups 1 and zero padding; ``output_padding`` makes the output the convolution's input shape.)

Nearest upsampling is chosen over ``MaxUnpool2d`` because a target has no pooling indices of its own (the indices of
the forward pass belong to ``h_i``, not to ``h^_i``). Feedback weights are drawn Gaussian with std ``1/sqrt(fan-in)``
(the learned maps' ``random`` initialisation) in the shape of the forward weight's transpose, so a ``Linear -> Tanh``
block draws what a :class:`~tplightning.layers.Dense` layer's map draws; ``feedback_init='pinv'`` then sets each
mirrored ``Linear`` to the pseudo-inverse of its forward weight and each ``ConvTranspose2d`` to the convolution's
adjoint (as :class:`~tplightning.layers.Conv2d` does).

Checkpoints rebuild a block from its :attr:`~tplightning.layers.Layer.spec`: torch modules do not keep their
constructor arguments, so :func:`describe_module` reads them from the attributes of the common torch modules
(:data:`DESCRIBERS`); a module of your own is described when it has an ``_init_args`` dict (or register a describer).
A block holding a module that cannot be described still saves its weights; loading names the module and asks for the
model (``tp.load(path, network=tp.convert(model))``).
"""
from __future__ import annotations

import contextlib
import importlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import functional as F
from .errors import ConfigError
from .functional import Activation, get_activation
from .layers import Layer, Network, random_feedback
from .losses import D, LocalScaling

__all__ = ["Block", "convert", "describe_module", "build_module", "ModuleActivation", "AutoFeedback", "Residual", "DESCRIBERS"]

#: modules with weights: each starts a new block in :func:`convert`'s default split
WEIGHTED = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: element-wise activation modules (a block's trailing activation is one of them)
ACTIVATIONS = (nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.Hardtanh, nn.ReLU6,
               nn.Mish, nn.CELU, nn.SELU, nn.Softsign, nn.Tanhshrink, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid)
#: modules that may follow a block's trailing activation (they keep its range)
_AFTER_ACTIVATION = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                     nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                     nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten, nn.Unflatten, nn.Identity)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_SKIPPED_IN_FEEDBACK = _NORMS + _DROPOUT + ACTIVATIONS + (nn.Identity, nn.PReLU)
#: modules the converter refuses, with the reason
REFUSED: tuple[tuple[type, str], ...] = (
    (nn.RNNBase, "a recurrent module takes and returns sequences with a hidden state (a tuple), not one tensor per layer"),
    (nn.MultiheadAttention, "attention returns a tuple (output, weights) and takes three inputs"),
    (nn.Transformer, "a transformer takes two inputs"),
    (nn.TransformerEncoderLayer, "it holds attention; wrap it in a module of your own that returns one tensor, and give its feedback"),
    (nn.TransformerDecoderLayer, "it takes two inputs"),
    (nn.Embedding, "it takes integer indices, not the float activations target propagation moves"),
    (nn.EmbeddingBag, "it takes integer indices, not the float activations target propagation moves"),
)


# ----------------------------------------------------------------------------------------------------------- describing
def _bool_bias(m: nn.Module) -> bool:
    return getattr(m, "bias", None) is not None


def _conv(m) -> dict:
    args = {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "bias": _bool_bias(m), "padding_mode": m.padding_mode}  # fmt: skip
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        args["output_padding"] = list(m.output_padding)
        del args["padding_mode"]
    return args


def _pool(m) -> dict:
    return {k: getattr(m, k) for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices",
                                       "count_include_pad", "divisor_override") if hasattr(m, k)}  # fmt: skip


def _norm(m) -> dict:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine, "track_running_stats": m.track_running_stats}


def _attrs(*names: str) -> Callable[[nn.Module], dict]:
    return lambda m: {n: (list(v) if isinstance(v, tuple) else v) for n in names for v in [getattr(m, n)]}


#: ``{torch module class: function(module) -> constructor arguments}``: how :func:`describe_module` records a module
DESCRIBERS: dict[type, Callable[[nn.Module], dict]] = {
    nn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": _bool_bias(m)},
    **{c: _conv for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)},
    **{c: _pool for c in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)},
    **{c: _attrs("output_size") for c in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)},
    **{c: _norm for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)},
    nn.LayerNorm: lambda m: {"normalized_shape": list(m.normalized_shape), "eps": m.eps, "elementwise_affine": m.elementwise_affine},
    nn.GroupNorm: _attrs("num_groups", "num_channels", "eps", "affine"),
    nn.Flatten: _attrs("start_dim", "end_dim"),
    nn.Unflatten: _attrs("dim", "unflattened_size"),
    **{c: _attrs("p", "inplace") for c in _DROPOUT},
    **{c: (lambda m: {}) for c in (nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Identity, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Mish)},
    **{c: _attrs("inplace") for c in (nn.ReLU, nn.ReLU6, nn.SELU, nn.Hardswish, nn.Hardsigmoid)},
    nn.LeakyReLU: _attrs("negative_slope", "inplace"),
    nn.ELU: _attrs("alpha", "inplace"),
    nn.CELU: _attrs("alpha", "inplace"),
    nn.GELU: _attrs("approximate"),
    nn.Softplus: _attrs("beta", "threshold"),
    nn.Hardtanh: _attrs("min_val", "max_val", "inplace"),
    nn.PReLU: lambda m: {"num_parameters": m.num_parameters},
    nn.Upsample: lambda m: {"size": list(m.size) if isinstance(m.size, tuple) else m.size, "scale_factor": m.scale_factor, "mode": m.mode},
}


def _class_path(cls: type) -> str:
    module = cls.__module__
    if module.startswith("torch.nn.modules"):
        module = "torch.nn"  # the public path, as configs name it
    return f"{module}.{cls.__qualname__}"


def describe_module(module: nn.Module) -> dict:
    """``{"class_path", "init_args"}`` of a torch module, from which :func:`build_module` builds an equal one (weights
    apart); ``init_args`` is ``None`` for a module whose arguments cannot be read (not in :data:`DESCRIBERS`, no
    ``_init_args`` attribute). An ``nn.Sequential`` lists its children (``init_args: {"modules": [...]}``, and their
    names when they are not ``0, 1, ...``).

    >>> describe_module(nn.Conv2d(1, 6, 5, padding=2))["init_args"]["padding"]
    [2, 2]
    >>> describe_module(nn.Sequential(nn.Linear(3, 2), nn.Tanh()))["init_args"]["modules"][1]
    {'class_path': 'torch.nn.Tanh', 'init_args': {}}
    """
    cls = type(module)
    if cls is nn.Sequential:
        names = [n for n, _ in module.named_children()]
        args: dict = {"modules": [describe_module(m) for m in module.children()]}
        if names != [str(k) for k in range(len(names))]:
            args["names"] = names
        return {"class_path": "torch.nn.Sequential", "init_args": args}
    describer = DESCRIBERS.get(cls)
    if describer is not None:
        return {"class_path": _class_path(cls), "init_args": describer(module)}
    own = getattr(module, "_init_args", None)
    return {"class_path": _class_path(cls), "init_args": dict(own) if isinstance(own, dict) else None}


def build_module(spec: nn.Module | dict) -> nn.Module:
    """The module a :func:`describe_module` spec (or a config's ``class_path``/``init_args``) describes; a module passes
    through.

    >>> build_module({"class_path": "torch.nn.Linear", "init_args": {"in_features": 3, "out_features": 2}}).weight.shape
    torch.Size([2, 3])
    """
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ConfigError(f"a block's module must be an nn.Module or a {{class_path, init_args}} mapping, got {spec!r}")
    path, args = str(spec["class_path"]), spec.get("init_args", {})
    if args is None:
        raise ConfigError(f"the constructor arguments of {path} were not recorded (torch keeps none, and it has no _init_args); "
                          "rebuild the model and pass it: tp.load(path, network=tp.convert(model))")  # fmt: skip
    if path in ("torch.nn.Sequential", "torch.nn.modules.container.Sequential"):
        children = [build_module(m) for m in args.get("modules", [])]
        names = args.get("names")
        return nn.Sequential(OrderedDict(zip(names, children))) if names else nn.Sequential(*children)
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"cannot import the module class {path!r} of a block ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"{path!r} is not an nn.Module class")
    return cls(**args)


# ----------------------------------------------------------------------------------------------------------- pieces
class ModuleActivation(Activation):
    """A torch activation module as an :class:`~tplightning.functional.Activation` (a block's trailing ELU, GELU,
    Sigmoid, ...): element-wise, its derivative by autograd, no inverse.

    >>> s = ModuleActivation(nn.Sigmoid())
    >>> round(s.derivative(torch.zeros(1)).item(), 4), s.invertible
    (0.25, False)
    """

    invertible = False

    def __init__(self, module: nn.Module):
        self.module = module
        self.name = type(module).__name__.lower()

    def __call__(self, a: Tensor) -> Tensor:
        return self.module(a)

    def derivative(self, a: Tensor, h: Tensor | None = None) -> Tensor:
        with torch.enable_grad():
            a = a.detach().requires_grad_(True)
            return torch.autograd.grad(self.module(a).sum(), a)[0]

    def inverse(self, h: Tensor) -> Tensor:
        raise ConfigError(f"{type(self.module).__name__} has no inverse here; use a map that needs none (original form, DRL, L-DRL)")

    def __repr__(self) -> str:
        return f"ModuleActivation({self.module!r})"


def _as_activation(module: nn.Module | None) -> Activation:
    if module is None:
        return get_activation("linear")
    if type(module) is nn.Tanh:
        return get_activation("tanh")
    if type(module) is nn.ReLU:
        return get_activation("relu")
    if type(module) is nn.LeakyReLU:
        return get_activation("leaky_relu", module.negative_slope)
    return ModuleActivation(module)


def leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``[(position, module)]``: an ``nn.Sequential``'s modules with nested ``nn.Sequential``s flattened, in order.

    >>> [p for p, _ in leaves(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Tanh(), nn.Linear(2, 1))))]
    ['0', '1.0', '1.1']
    """
    if type(module) is not nn.Sequential:
        return [(prefix or type(module).__name__, module)]
    out = []
    for name, child in module.named_children():
        out += leaves(child, f"{prefix}.{name}" if prefix else name)
    return out


def refusal(module: nn.Module) -> str | None:
    """Why the converter cannot serve ``module`` (or any module inside it), or ``None``.

    >>> refusal(nn.LSTM(3, 4))[:22]
    'LSTM: a recurrent modu'
    >>> refusal(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) is None
    True
    """
    for sub in module.modules():
        for cls, why in REFUSED:
            if isinstance(sub, cls):
                return f"{type(sub).__name__}: {why}"
        if getattr(sub, "return_indices", False):
            return f"{type(sub).__name__}(return_indices=True) returns a tuple (output, indices), not one tensor"
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in sub.parameters(recurse=False)):
            return f"{type(sub).__name__} is a lazy module: give its sizes (a block's shapes are fixed when it is built)"
        own_buffers = [n for n, _ in sub.named_buffers(recurse=False)]
        if own_buffers and not isinstance(sub, _NORMS):
            return (f"{type(sub).__name__} keeps state in buffers ({', '.join(own_buffers)}) that a forward pass may change; "
                    "target propagation re-runs blocks, and only batch-norm statistics are known to be safe")  # fmt: skip
    return None


class AutoFeedback(nn.Sequential):
    """The feedback module :meth:`Block.make_feedback` builds (the mirror rule of :mod:`tplightning.blocks`); it knows
    which forward module each of its weighted modules mirrors (:meth:`Block.init_feedback` reads that)."""

    def __init__(self, modules: Sequence[nn.Module], mirrors: Sequence[tuple[int, nn.Module]]):
        super().__init__(*modules)
        self._mirrors = tuple(mirrors)  # (index of a feedback module, the forward module it mirrors): not submodules

    @property
    def mirrors(self) -> tuple[tuple[int, nn.Module], ...]:
        return self._mirrors


class Residual(nn.Module):
    """``x + F(x)``: a residual connection around the modules ``F`` (He et al. 2016, eq. 1), whose output has the shape of
    its input. The activation after the sum (He et al.'s ``ReLU``) is the module that follows it in the model, so that
    :func:`convert` makes ``Residual -> ReLU`` one block whose trailing activation is the ``ReLU``.

    In a block, the automatic feedback module mirrors it as a residual too: ``G(v) = v + G_F(v)``, ``G_F`` the mirror of
    ``F``'s modules (:meth:`Block.make_feedback`'s rule, weights drawn at random; ``feedback_init='pinv'`` leaves them so).

    Args:
        modules: the modules of ``F`` in order (torch modules, or ``{class_path, init_args}`` specs as configs and
            checkpoints give them).

    >>> block = Residual([nn.Linear(3, 3), nn.Tanh()])
    >>> x = torch.ones(2, 3)
    >>> torch.equal(block(x), x + block.body(x))
    True
    """

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.body = nn.Sequential(*[build_module(m) for m in modules])
        self._init_args = {"modules": [describe_module(m) for m in self.body]}  # how describe_module records it

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)

    def mirror(self, in_shape: Sequence[int], law: str = "random") -> nn.Module:
        """The feedback module of this residual for inputs of shape ``in_shape``: ``v + G_F(v)``, ``G_F``'s weights drawn
        under ``law`` (:meth:`Block.make_feedback`)."""
        return Residual(list(Block(self.body, input_shape=in_shape).make_feedback(law)))


class Block(Layer):
    """``h_i = f_i(h_{i-1})`` for any ``nn.Module`` ``f_i`` (see :mod:`tplightning.blocks` for what a block means to the
    rules).

    Args:
        module: the block's function: an ``nn.Module``, a list of modules (made an ``nn.Sequential``), or a
            ``{class_path, init_args}`` spec as checkpoints give it. Its parameters are the layer's forward parameters.
        input_shape: the shape of one input (without the batch dimension); ``None`` takes it from a first ``Linear``
            (``(in_features,)``) or ``Unflatten(1, shape)`` (``(prod(shape),)``). Flat inputs are reshaped to it.
        feedback: the block's feedback module ``G`` (output shape -> input shape), used by the learned maps instead
            of the automatic mirror; ``feedback_init`` does not change its weights.

    >>> block = Block(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2)), input_shape=(1, 4, 4))
    >>> block.out_shape, block.activation, block(torch.zeros(5, 16)).shape
    ((2, 2, 2), Tanh(), torch.Size([5, 2, 2, 2]))
    >>> [type(m).__name__ for m in block.make_feedback()]
    ['Upsample', 'ConvTranspose2d']
    """

    closed_form = False
    supports_exact_inverse = False
    matrix_structure = False

    def __init__(
        self,
        module: nn.Module | Sequence[nn.Module] | dict,
        input_shape: Sequence[int] | None = None,
        feedback: nn.Module | dict | None = None,
    ):
        super().__init__()
        if isinstance(module, (list, tuple)):  # a config's list of modules (jsonargparse cannot fill nn.Sequential(*modules))
            module = nn.Sequential(*[build_module(m) for m in module])
        module = build_module(module)
        why = refusal(module)
        if why is not None:
            raise ConfigError(f"a block cannot hold {why}")
        self.module = module
        self.in_shape = _input_shape(module) if input_shape is None else tuple(int(n) for n in input_shape)
        self._frozen = 0  # > 0 inside Network.frozen_state(): no running-statistics update
        self._rng: tuple | None = None  # the generator state of the last training forward pass (blocks with dropout)
        self._stochastic = any(isinstance(m, _DROPOUT) for m in module.modules())
        self._stateful = any(True for _ in module.buffers())
        self._trace = self._shapes()  # [(position, module, in shape, out shape)] over the leaves
        self.out_shape = self._trace[-1][3] if self._trace else self.in_shape
        self.activation = _as_activation(self._trailing_activation())
        self._feedback = (build_module(feedback),) if feedback is not None else None  # a tuple: the map owns it
        if self._feedback is not None:
            self._check_feedback(self._feedback[0])
        self._init_args = {"module": describe_module(module), "input_shape": list(self.in_shape),
                           "feedback": describe_module(self._feedback[0]) if self._feedback else None}  # fmt: skip

    # ----------------------------------------------------------------------------- structure
    def _shapes(self) -> list[tuple[str, nn.Module, tuple, tuple]]:
        """Run zeros of ``in_shape`` through the leaves in eval mode (no statistics change, no randomness)."""
        p = next(self.module.parameters(), None)
        h = torch.zeros(2, *self.in_shape, dtype=p.dtype if p is not None else torch.get_default_dtype(),
                        device=p.device if p is not None else None)  # fmt: skip
        modes = {m: m.training for m in self.module.modules()}
        self.module.eval()
        trace = []
        try:
            with torch.no_grad():
                for pos, leaf in leaves(self.module):
                    try:
                        out = leaf(h)
                    except RuntimeError as err:
                        if not type(leaf).__module__.startswith("torch.nn."):
                            raise  # a module of your own: its error as it is
                        # a torch module refusing the shape (a wrong input_shape or split): say which, with torch's words
                        raise ConfigError(f"block module {pos} ({type(leaf).__name__}) cannot take inputs of shape "
                                          f"{tuple(h.shape[1:])}: {str(err).splitlines()[0][:160]}") from err  # fmt: skip
                    if not isinstance(out, Tensor):
                        raise ConfigError(f"block module {pos} ({type(leaf).__name__}) returns a {type(out).__name__}, not one tensor")
                    trace.append((pos, leaf, tuple(h.shape[1:]), tuple(out.shape[1:])))
                    h = out
        finally:
            for m, mode in modes.items():
                m.train(mode)
        return trace

    def _trailing_activation(self) -> nn.Module | None:
        for _, leaf, _, _ in reversed(self._trace):
            if isinstance(leaf, _AFTER_ACTIVATION):
                continue
            return leaf if isinstance(leaf, ACTIVATIONS) else None
        return None

    def weighted_modules(self) -> list[tuple[str, nn.Module]]:
        """``[(name, module)]`` of the weighted submodules (``Linear``, convolutions), names as in ``module.named_modules()``:
        what a feedback-alignment map draws a random weight of the same shape for.

        >>> [n for n, _ in Block(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).weighted_modules()]
        ['0', '2']
        """
        return [(n, m) for n, m in self.module.named_modules() if isinstance(m, WEIGHTED)]

    @property
    def weight(self) -> Tensor | None:
        """The weight of the first weighted submodule (what code reading a layer's dtype or device looks at); all the
        block's parameters are ``module.parameters()``."""
        found = self.weighted_modules()
        return found[0][1].weight if found else next(self.module.parameters(), None)

    @property
    def bias(self) -> Tensor | None:
        found = self.weighted_modules()
        return found[0][1].bias if found else None

    def parameter_groups(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(weights, others)``: the parameters named ``weight``, then the rest (biases, batch-norm scales)."""
        named = list(self.module.named_parameters())
        return [p for n, p in named if n.rsplit(".", 1)[-1] == "weight"], [p for n, p in named if n.rsplit(".", 1)[-1] != "weight"]

    def full_weight(self) -> Tensor:
        """The matrix ``W`` of a block that is one ``Linear`` and element-wise modules (what DDTP-linear's ``pinv``
        initialisation multiplies); a :class:`~tplightning.errors.ConfigError` for other blocks."""
        weighted = self.weighted_modules()
        kinds = [leaf for _, leaf, _, _ in self._trace if not isinstance(leaf, _SKIPPED_IN_FEEDBACK)]
        if len(weighted) == 1 and isinstance(weighted[0][1], nn.Linear) and len(kinds) == 1:
            return weighted[0][1].weight
        raise ConfigError(f"{self.describe()} is not one Linear with element-wise modules, so it has no weight matrix; "
                          "use feedback_init: random")  # fmt: skip

    def describe(self) -> str:
        """``block (Conv2d(1, 2, kernel_size=(3, 3), ...) -> Tanh -> MaxPool2d)``, for messages: weighted modules as torch
        prints them, the others by class.

        >>> Block(nn.Sequential(nn.Linear(3, 2), nn.Tanh())).describe()
        'block (Linear(in_features=3, out_features=2, bias=True) -> Tanh)'
        """
        return "block (" + " -> ".join(repr(leaf) if isinstance(leaf, WEIGHTED) else type(leaf).__name__ for _, leaf, _, _ in self._trace) + ")"

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}"

    # ----------------------------------------------------------------------------- forward
    def _unflat(self, h: Tensor) -> Tensor:
        return h if tuple(h.shape[1:]) == self.in_shape else h.reshape(h.shape[0], *self.in_shape)

    def _rng_devices(self, device: torch.device) -> list:
        return [device] if device.type == "cuda" else []

    def _keep_rng(self, device: torch.device) -> None:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self._rng = (torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def _replay(self, device: torch.device):
        """Replay the dropout mask of the last training forward pass (its generator state), then restore the generator."""
        if not (self._stochastic and self.training and self._rng is not None):
            yield
            return
        with torch.random.fork_rng(devices=self._rng_devices(device)):
            torch.set_rng_state(self._rng[0])
            if self._rng[1] is not None:
                torch.cuda.set_rng_state(self._rng[1], device)
            yield

    def call(self, h_prev: Tensor, frozen: bool | None = None) -> Tensor:
        """``f_i(h_{i-1})``.

        ``frozen`` (default: inside :meth:`~tplightning.layers.Network.frozen_state`) evaluates training-mode batch norm
        on copies of its buffers, so its running statistics do not move.
        """
        x = self._unflat(h_prev)
        frozen = self._frozen > 0 if frozen is None else frozen
        if not frozen:
            if self._stochastic and self.training:
                self._keep_rng(x.device)
            return self.module(x)
        if not (self._stateful and self.training):
            return self.module(x)
        state = {n: b.clone() for n, b in self.module.named_buffers()}
        return functional_call(self.module, state, (x,))

    def forward(self, h_prev: Tensor) -> Tensor:
        return self.call(h_prev)

    def forward_pre(self, h_prev: Tensor) -> tuple[Tensor, Tensor]:
        """``(h_i, h_i)``: a block has no pre-activation of its own."""
        h = self.call(h_prev)
        return h, h

    def local_grads(self, h_prev: Tensor, a: Tensor, h: Tensor, h_hat: Tensor, scaling: LocalScaling = D) -> dict[Tensor, Tensor]:
        """``{parameter: gradient}`` of ``mean_b 1/2 ||f_i(h_{i-1}) - h^_i||^2`` (eq. 4.12) over every trainable parameter of
        the module, by autograd; frozen statistics, the forward pass's dropout mask."""
        if scaling.inverse:
            raise ConfigError(f"{self.describe()} has no D^-1 update: the modified rules divide by the activation's derivative, "
                              "which a block does not expose; they need dense layers")  # fmt: skip
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            return {}
        with torch.enable_grad(), self._replay(h_prev.device):
            out = self.call(h_prev.detach(), frozen=True)
            loss = 0.5 * (out - h_hat.detach().reshape(out.shape)).pow(2).sum() / h_prev.shape[0]
            grads = torch.autograd.grad(loss, params)
        return dict(zip(params, grads))

    def vjp(self, h_prev: Tensor, v: Tensor) -> Tensor:
        """``J_{f_i}(h_{i-1})^T v``, shaped as ``h_prev``, by autograd (frozen statistics, the forward pass's dropout
        mask). Feedback alignment does not use it: it needs ``B`` in the backward pass only, at the true forward point
        (:func:`~tplightning.target_maps.feedback_in_backward`).

        >>> block = Block(nn.Linear(3, 2, bias=False))
        >>> v = torch.ones(1, 2)
        >>> torch.allclose(block.vjp(torch.zeros(1, 3), v), v @ block.module.weight)
        True
        """
        with torch.enable_grad(), self._replay(h_prev.device):
            x = h_prev.detach().requires_grad_(True)
            out = self.call(x, frozen=True)
            return torch.autograd.grad(out, x, grad_outputs=v.reshape(out.shape))[0]

    # ----------------------------------------------------------------------------- feedback
    def make_feedback(self, law: str = "random") -> nn.Module:
        """The feedback module ``G_i`` (this block's output shape -> its input shape) a learned map of the layer below
        owns: the module given as ``feedback`` (its weights as given), or the mirror of the block (the table in
        :mod:`tplightning.blocks`), each mirrored weight drawn by :func:`~tplightning.layers.random_feedback` under
        ``law`` (default: Gaussian with std ``1/sqrt(fan-in)``) from torch's global generator."""
        if self._feedback is not None:
            return self._feedback[0]
        modules, mirrors = [], []
        for pos, leaf, in_shape, out_shape in reversed(self._trace):
            if isinstance(leaf, _SKIPPED_IN_FEEDBACK):
                continue
            back = self._mirror(pos, leaf, in_shape, out_shape, law)
            if isinstance(leaf, WEIGHTED):
                mirrors.append((len(modules), leaf))
            modules.append(back)
        return AutoFeedback(modules, mirrors)

    def _mirror(self, pos: str, leaf: nn.Module, in_shape: tuple, out_shape: tuple, law: str) -> nn.Module:
        W = getattr(leaf, "weight", None)
        like = {"dtype": W.dtype, "device": W.device} if W is not None else {}
        if type(leaf) is nn.Linear:
            back = nn.Linear(leaf.out_features, leaf.in_features, bias=False, **like)
            with torch.no_grad():
                back.weight.copy_(random_feedback((leaf.in_features, leaf.out_features), leaf.out_features, law, like=W))
            return back
        if type(leaf) is nn.Conv2d and leaf.groups == 1 and not isinstance(leaf.padding, str) and leaf.padding_mode == "zeros":
            k, s, p, d = leaf.kernel_size, leaf.stride, leaf.padding, leaf.dilation
            extra = [n - ((m - 1) * s[j] - 2 * p[j] + d[j] * (k[j] - 1) + 1) for j, (n, m) in enumerate(zip(in_shape[1:], out_shape[1:]))]
            back = nn.ConvTranspose2d(leaf.out_channels, leaf.in_channels, k, s, p, output_padding=tuple(extra), dilation=d, bias=False, **like)
            with torch.no_grad():
                back.weight.copy_(random_feedback(leaf.weight.shape, leaf.out_channels * k[0] * k[1], law, like=W))
            return back
        if isinstance(leaf, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return nn.Upsample(size=tuple(in_shape[1:]), mode="nearest")
        if isinstance(leaf, Residual):
            return leaf.mirror(in_shape, law)
        if isinstance(leaf, (nn.Flatten, nn.Unflatten)):  # back to the input's shape
            return nn.Flatten(1) if len(in_shape) == 1 else nn.Unflatten(1, in_shape)
        raise ConfigError(f"{self.describe()}: module {pos} ({type(leaf).__name__}) has no automatic feedback module "
                          "(Linear, Conv2d with groups=1 and zero padding, 2-d pooling and Flatten are mirrored; normalisation, "
                          "dropout and activations skipped); give the block a feedback= module")  # fmt: skip

    @torch.no_grad()
    def init_feedback(self, M: nn.Module, gamma: float = 0.0) -> None:
        """``feedback_init='pinv'`` (``gamma = 0``) or ``'regularised'`` for an automatic feedback module: each mirrored
        ``Linear`` takes its forward weight's (regularised) pseudo-inverse ``W^T (W W^T + gamma I)^{-1}``
        (:func:`~tplightning.functional.regularised_inverse`), each ``ConvTranspose2d`` the convolution's weight (the
        adjoint; ``gamma`` must be 0). A feedback module you gave keeps its weights."""
        if not isinstance(M, AutoFeedback):
            return
        for k, fwd in M.mirrors:
            if isinstance(fwd, nn.Linear):
                M[k].weight.copy_(F.regularised_inverse(fwd.weight, gamma))
            else:
                if gamma:
                    raise ConfigError(f"the regularised inverse needs dense layers; {self.describe()} holds a {type(fwd).__name__}")
                M[k].weight.copy_(fwd.weight.detach())

    def transpose(self, v: Tensor, M: nn.Module) -> Tensor:
        """``G_i(v)``: the feedback module ``M`` (from :meth:`make_feedback`) applied to a batch in this block's output space."""
        return M(v.reshape(v.shape[0], *self.out_shape))

    def _check_feedback(self, M: nn.Module) -> None:
        p = next(M.parameters(), None)
        v = torch.zeros(2, *self.out_shape, dtype=p.dtype if p is not None else torch.get_default_dtype(), device=p.device if p is not None else None)
        was = M.training
        M.eval()
        try:
            with torch.no_grad():
                out = M(v)
        finally:
            M.train(was)
        if not isinstance(out, Tensor) or out.shape[0] * math.prod(self.in_shape) != out.numel():
            got = tuple(out.shape[1:]) if isinstance(out, Tensor) else type(out).__name__
            raise ConfigError(f"feedback module of {self.describe()} maps its output shape {self.out_shape} to {got}, "
                              f"expected the block's input shape {self.in_shape}")  # fmt: skip

    # ----------------------------------------------------------------------------- what a block does not have
    def _no(self, what: str, why: str):
        raise ConfigError(f"{self.describe()} has no {what}: {why}; use a learned map (OriginalDTP, LeeDTP, DRL, L-DRL, DDTP-linear) or BP")

    def derivative(self, a, h=None):
        self._no("derivative D_s", "a block has no pre-activation; its Jacobian is vjp()")

    def linear_out(self, h_prev):
        self._no("linear part W h", "the thesis form Q s^-1 and exact inverses need s(W h + b) layers")

    def pre_output(self, h):
        self._no("inverse activation s^-1", "the thesis form Q s^-1 and exact inverses need s(W h + b) layers")

    def feedback_shape(self):
        self._no("feedback matrix shape", "its feedback is a module (make_feedback), not a matrix")

    def adjoint(self):
        self._no("adjoint matrix W^T", "its feedback is a module (make_feedback), not a matrix")

    def pseudo_inverse(self, gamma: float = 0.0):
        self._no("pseudo-inverse matrix", "its feedback is a module (make_feedback), not a matrix")


def _input_shape(module: nn.Module) -> tuple[int, ...]:
    found = leaves(module)
    if not found:
        raise ConfigError("a block needs at least one module, got an empty nn.Sequential")
    first = found[0][1]
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    if isinstance(first, nn.Unflatten) and first.dim in (1, -1):  # of a flat (batch, features) input
        return (math.prod(first.unflattened_size),)
    raise ConfigError(f"give input_shape: the first module, {type(first).__name__}, does not fix the shape of its input "
                      "(a Linear or an Unflatten(1, shape) first does)")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- convert
def _is_weighted(module: nn.Module) -> bool:
    """A ``Linear``/convolution, or a module of your own with parameters (a residual block): it starts a block."""
    if isinstance(module, WEIGHTED):
        return True
    own_class = not type(module).__module__.startswith("torch.")
    return own_class and any(True for _ in module.parameters())


def convert(
    model: nn.Module | Sequence[nn.Module],
    split: Sequence[int] | None = None,
    feedback: dict[int, nn.Module] | None = None,
    input_shape: Sequence[int] | None = None,
) -> Network:
    """A rule's network of blocks (:class:`Block`) from a sequential PyTorch model (the model's own modules, not copies: training
    the rule trains the model).

    Nested sequentials (``nn.Sequential``) are flattened to their modules. The default split: a block ends after each weighted
    module (``Linear``, a convolution, or a module of your own with parameters) together with the non-weighted modules
    that follow it (normalisation, activation, pooling, dropout, flatten) up to the next weighted module; modules before
    the first weighted one join the first block.

    Args:
        model: an ``nn.Sequential`` (or a list of modules, or one module: one block).
        split: where blocks start instead: indices into the flattened module list, e.g. ``[0, 3, 7]``.
        feedback: ``{block index (1-based): feedback module}`` for blocks whose feedback you give.
        input_shape: the shape of one input (no batch dimension); ``None`` reads it from a first ``Linear`` or
            ``Unflatten(1, shape)``.

    Modules that cannot be a target-propagation layer (recurrent modules, attention, embeddings, pools returning
    indices, modules with state of their own) are refused, naming the module and its position.

    >>> net = convert(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    >>> net.sizes, [len(b.module) for b in net.layers]
    ([4, 8, 3], [2, 1])
    """
    if isinstance(model, Network):
        return model
    if isinstance(model, nn.Module):
        found = leaves(model)
    else:
        found = [(str(k), m) for k, m in enumerate(model)]
        if not all(isinstance(m, nn.Module) for _, m in found):
            bad = [f"{k} ({type(m).__name__})" for k, m in found if not isinstance(m, nn.Module)]
            raise ConfigError(f"convert takes torch modules; entries {', '.join(bad)} are not")
        found = [leaf for k, m in found for leaf in leaves(m, k)]
    if not found:
        raise ConfigError("convert: the model holds no modules")
    for pos, module in found:
        if isinstance(module, Layer):
            raise ConfigError(f"module {pos} is a tplightning layer ({type(module).__name__}); give either tplightning layers or torch modules")
        why = refusal(module)
        if why is not None:
            raise ConfigError(f"convert cannot serve module {pos} ({why})")
    if split is None:
        starts = [k for k, (_, m) in enumerate(found) if _is_weighted(m)]
        starts = [0] + starts[1:]  # what precedes the first weighted module joins its block
    else:
        starts = sorted({int(k) for k in split} | {0})
        if starts[-1] >= len(found) or starts[0] < 0:
            raise ConfigError(f"split points must be in 0..{len(found) - 1} (the flattened model has {len(found)} modules), got {list(split)}")
    feedback = dict(feedback or {})
    if set(feedback) - set(range(1, len(starts) + 1)):
        raise ConfigError(f"feedback keys must be block indices 1..{len(starts)}, got {sorted(feedback)}")
    blocks, shape = [], None if input_shape is None else tuple(input_shape)
    for b, (start, end) in enumerate(zip(starts, starts[1:] + [len(found)]), start=1):
        group = nn.Sequential(*[m for _, m in found[start:end]])
        where = ("modules " if end - start > 1 else "module ") + ", ".join(p for p, _ in found[start:end])
        try:
            block = Block(group, input_shape=shape, feedback=feedback.get(b))
        except ConfigError as err:  # say which block (modules at which positions) the message is about
            raise ConfigError(f"block {b} ({where}): {err}") from err
        blocks.append(block)
        shape = block.out_shape
    return Network(blocks)
