"""Forward layers as values: each ``f_i`` with the gradient of its local loss (pure torch, no Lightning).

A target-propagation network is a stack of layers ``h_i = f_i(h_{i-1})`` (thesis eq. 4.1). Each layer
knows four things the rules need and nothing else:

* ``forward_pre(h_prev) -> (a_i, h_i)``: the pre-activation and the activation ``h_i = s_i(a_i)``;
* ``local_grads(h_prev, a, h, h_hat)``: the gradient of the local loss
  ``mean_b 1/2 ||f_i(h_{i-1}) - h^_i||^2`` with respect to its parameters, ``h_{i-1}`` and ``h^_i``
  fixed (eq. 4.12, Alg. A.10) -- closed form for dense layers, autograd for the others;
* ``transpose(v, M)``: the linear map from its output space to its input space with a weight ``M`` of
  the transposed shape (``v M^T`` for dense layers, a transposed convolution for convolutions), the
  building block of every feedback map ``g_{i-1}`` (eq. 4.16, 4.90, 5.54);
* ``linear_out(h_prev)`` and ``pre_output(h)``: ``W h`` without bias, and ``s^{-1}(h) - b``, in the
  layer's output coordinates (what the thesis-form inverse ``Q s^{-1}`` and Alg. A.8 need).

:class:`Dense` is ``s(W h (+ b))``; :class:`Conv2d` is ``s(maxpool(conv(h) (+ b)))``: for the monotone
activations of this library max-pooling commutes with ``s``, so this equals ``maxpool(s(conv(h)))`` and
its output is again an element-wise ``s`` of a pre-activation. :class:`AuxiliaryDense` is AO-SDTP's
output layer with fixed auxiliary units. :class:`Network` stacks layers; :func:`dense_stack` builds the
thesis' MLP from layer sizes.
"""
from __future__ import annotations

import contextlib
import math
import operator
from abc import ABCMeta, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from . import functional as F
from .errors import ConfigError
from .functional import Activation, get_activation
from .losses import D, LocalScaling

__all__ = ["Layer", "Dense", "AuxiliaryDense", "Conv2d", "Network", "dense_stack", "build_network", "check_sizes", "build_layer", "resolve_layers", "random_feedback", "sign_feedback_scales", "FEEDBACK_LAWS"]


def check_sizes(sizes: Sequence[int]) -> list[int]:
    """Validate layer sizes ``[n_0, ..., n_L]`` (at least input and output, all positive ints).

    >>> check_sizes([4, 3, 2])
    [4, 3, 2]
    >>> check_sizes([4])
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: sizes must list at least an input and an output size, got [4]
    """
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise ConfigError(f"sizes must be a list of layer sizes such as [784, 256, 10], got {sizes!r}")
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ConfigError(f"sizes must list at least an input and an output size, got {sizes}")
    bad = [n for n in sizes if not isinstance(n, int) or isinstance(n, bool) or n <= 0]
    if bad:
        raise ConfigError(f"layer sizes must be positive integers, got {sizes} (bad: {bad})")
    return sizes


class Layer(nn.Module, metaclass=ABCMeta):
    """Base of the forward layers. Subclasses set ``activation``, ``in_shape``, ``out_shape`` and the
    parameters ``weight`` (and ``bias`` or ``None``), and record their constructor arguments in
    ``spec`` so a checkpoint can rebuild them (:func:`build_layer`).

    A layer is abstract; :class:`Dense` is the usual one:

    >>> layer = Dense(3, 2, activation="tanh")
    >>> a, h = layer.forward_pre(torch.zeros(4, 3))
    >>> torch.equal(h, torch.tanh(a)), layer.closed_form
    (True, True)
    """

    activation: Activation
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    #: whether the local gradient (eq. 4.12) and the feedback gradients through :meth:`transpose` have closed forms
    #: (dense layers); otherwise autograd computes them, and ``D_i^{-1}`` (the modified rules) is not available
    closed_form: bool = False
    #: whether an exact inverse ``W^{-1}`` can be kept: square dense layers only
    supports_exact_inverse: bool = False
    #: whether the layer is ``s(W h + b)`` with a weight matrix (``linear_out``, ``pre_output``, ``feedback_shape``);
    #: a :class:`~tplightning.blocks.Block` is not
    matrix_structure: bool = True

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)

    @property
    def spec(self) -> dict:
        """``{"class_path": ..., "init_args": {...}}``, the form LightningCLI configs use."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": dict(self._init_args)}

    @abstractmethod
    def forward_pre(self, h_prev: Tensor) -> tuple[Tensor, Tensor]:
        """``(a_i, h_i)``: the pre-activation and the activation ``h_i = s_i(a_i)``."""

    def forward(self, h_prev: Tensor) -> Tensor:
        return self.forward_pre(h_prev)[1]

    def derivative(self, a: Tensor, h: Tensor | None = None) -> Tensor:
        """Diagonal of ``D_{s_i}`` at the pre-activation ``a`` (``h = s(a)`` reused where it helps)."""
        return self.activation.derivative(a, h)

    def local_grads(self, h_prev: Tensor, a: Tensor, h: Tensor, h_hat: Tensor, scaling: LocalScaling = D) -> dict[Tensor, Tensor]:
        """``{parameter: gradient}`` of ``mean_b 1/2 ||f_i(h_{i-1}) - h^_i||^2`` (autograd; ``scaling`` must be ``D``)."""
        if scaling.inverse:
            raise ConfigError(f"{type(self).__name__} has no D^-1 update (modified rules need dense layers)")
        params = [p for p in (self.weight, self.bias) if p is not None and p.requires_grad]
        with torch.enable_grad():
            out = self(h_prev.detach())
            loss = 0.5 * (out - h_hat.detach()).pow(2).sum() / h_prev.shape[0]
            grads = torch.autograd.grad(loss, params)
        return dict(zip(params, grads))

    @abstractmethod
    def linear_out(self, h_prev: Tensor) -> Tensor:
        """``W h_{i-1}`` in output coordinates, without bias (``s^{-1}(f_i(h)) - b``)."""

    def pre_output(self, h: Tensor) -> Tensor:
        """``s_i^{-1}(h) - b_i`` for a batch ``h`` in this layer's output space."""
        a = self.activation.inverse(h)
        return a if self.bias is None else a - self._bias_view()

    @abstractmethod
    def transpose(self, v: Tensor, M: Tensor) -> Tensor:
        """``M``'s linear map from this layer's output space to its input space (``M`` shaped as :meth:`feedback_shape`)."""

    @abstractmethod
    def feedback_shape(self) -> tuple[int, ...]:
        """The shape of a weight ``M`` that :meth:`transpose` takes (``W^T``'s for dense layers)."""

    @abstractmethod
    def adjoint(self) -> Tensor:
        """The transposed weight ``W^T`` in :meth:`feedback_shape` (a feedback weight that starts as the adjoint)."""

    def make_feedback(self, law: str = "random") -> Tensor | nn.Module:
        """A fresh feedback operator ``M`` for :meth:`transpose`, as the learned maps draw it: a parameter of
        :meth:`feedback_shape` drawn by :func:`random_feedback` under ``law`` (default: Gaussian with std
        ``1/sqrt(feedback_fan_in)``) from torch's global generator (a :class:`~tplightning.blocks.Block` returns a
        feedback module instead)."""
        W = self.weight
        return nn.Parameter(random_feedback(self.feedback_shape(), self.feedback_fan_in, law, like=W))

    @torch.no_grad()
    def init_feedback(self, M: Tensor | nn.Module, gamma: float = 0.0) -> None:
        """Set a feedback operator from :meth:`make_feedback` to :meth:`pseudo_inverse` (``feedback_init='pinv'``, or
        ``'regularised'`` with ``gamma``)."""
        M.copy_(self.pseudo_inverse(gamma))

    def parameter_groups(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(weights, biases)``: the forward parameters, in the order the forward optimizer holds them."""
        return [self.weight], ([self.bias] if self.bias is not None else [])

    def vjp(self, h_prev: Tensor, v: Tensor) -> Tensor:
        """``J_{f_i}(h_{i-1})^T v`` by autograd, shaped as ``h_prev``."""
        with torch.enable_grad():
            h = h_prev.detach().requires_grad_(True)
            return torch.autograd.grad(self(h), h, grad_outputs=v)[0]

    def describe(self) -> str:
        """The layer in a few words, for messages."""
        return f"{type(self).__name__} {self.in_shape} -> {self.out_shape}"

    def pseudo_inverse(self, gamma: float = 0.0) -> Tensor:
        """``W^dagger`` (``gamma = 0``) or theorem 4.7's ``W^T (W W^T + gamma I)^{-1}`` in :meth:`feedback_shape`, where it is
        cheap (dense layers); the adjoint ``W^T`` otherwise (for a convolution the adjoint is a transposed convolution,
        and the pseudo-inverse is not one)."""
        if gamma:
            raise ConfigError(f"the regularised inverse needs a dense layer above, not a {type(self).__name__}")
        return self.adjoint()

    @property
    def feedback_fan_in(self) -> int:
        """Inputs per unit of a map from this layer's output space back to its input space."""
        return self.out_features

    def _bias_view(self) -> Tensor:
        return self.bias


class Dense(Layer):
    """``h_i = s_i(W_i h_{i-1} (+ b_i))`` with ``W_i`` of shape ``(n_i, n_{i-1})`` (eq. 4.1).

    Inputs of more than two dimensions are flattened (a dense layer above a convolution).

    Args:
        in_features: ``n_{i-1}``. out_features: ``n_i``.
        activation: ``leaky_relu``, ``tanh``, ``linear`` or ``relu`` (or an :class:`~tplightning.functional.Activation`).
        negative_slope: leaky-ReLU slope.
        bias: learn a bias ``b_i`` (initially 0).
        init: ``gaussian`` (std ``init_std``, default ``1/sqrt(n_{i-1})``), ``orthogonal``
            (all singular values 1; the Gaussian draw is still made first, which keeps seeded streams) or
            ``xavier_normal`` (std ``sqrt(2 / (n_{i-1} + n_i))``, the same draw rescaled).
        init_std: std of the Gaussian weights.
        generator: optional ``torch.Generator`` of the initial weights.

    >>> layer = Dense(2, 2, activation="linear")
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    >>> layer(torch.tensor([[1.0, 1.0]])).detach()
    tensor([[1., 2.]])
    >>> h_prev, h_hat = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 2.0]])
    >>> with torch.no_grad():
    ...     a, h = layer.forward_pre(h_prev)
    ...     grads = layer.local_grads(h_prev, a, h, h_hat)
    >>> grads[layer.weight]  # D (h - h^) h_prev^T with D = 1
    tensor([[1., 1.],
            [0., 0.]])
    """

    closed_form = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str | Activation = "leaky_relu",
        negative_slope: float = 0.35,
        bias: bool = False,
        init: str = "gaussian",
        init_std: float | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        check_sizes([in_features, out_features])
        self._init_args = {"in_features": in_features, "out_features": out_features, "activation": getattr(activation, "name", activation),
                           "negative_slope": negative_slope, "bias": bias, "init": init, "init_std": init_std}  # fmt: skip
        self.activation = get_activation(activation, negative_slope)
        self.in_shape, self.out_shape = (in_features,), (out_features,)
        self.weight = nn.Parameter(_initial_weight((out_features, in_features), init, init_std, generator))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.supports_exact_inverse = in_features == out_features

    def forward_pre(self, h_prev: Tensor) -> tuple[Tensor, Tensor]:
        if h_prev.dim() > 2:
            h_prev = h_prev.flatten(1)
        a = h_prev @ self.weight.T
        if self.bias is not None:
            a = a + self.bias
        return a, self.activation(a)

    def local_grads(self, h_prev, a, h, h_hat, scaling=D):
        """Closed form (eq. 4.12): ``(1/B) sum_b D_i (h_i - h^_i) h_{i-1}^T`` and ``mean_b D_i (h_i - h^_i)``
        for the bias; ``D_i^{-1}`` with ``scaling=D_INVERSE`` (the modified rules, Alg. A.1, A.6)."""
        delta = self.delta(a, h, h_hat, scaling)
        return self.grads_from_delta(delta, h_prev)

    def delta(self, a: Tensor, h: Tensor, h_hat: Tensor, scaling: LocalScaling = D) -> Tensor:
        """``D_i (h_i - h^_i)`` per sample (``D_i^{-1}`` with ``scaling=D_INVERSE``), ``(B, n_i)``."""
        return F.local_delta(self.derivative(a, h), h, h_hat, scaling)

    def grads_from_delta(self, delta: Tensor, h_prev: Tensor) -> dict[Tensor, Tensor]:
        if h_prev.dim() > 2:
            h_prev = h_prev.flatten(1)
        grads = {}
        if self.weight.requires_grad:
            grads[self.weight] = F.delta_update(delta, h_prev)
        if self.bias is not None and self.bias.requires_grad:
            grads[self.bias] = delta.mean(0)
        return grads

    def linear_out(self, h_prev: Tensor) -> Tensor:
        return h_prev.flatten(1) @ self.weight.T

    def transpose(self, v: Tensor, M: Tensor) -> Tensor:
        return v @ M.T

    def feedback_shape(self) -> tuple[int, ...]:
        return (self.weight.shape[1], self.weight.shape[0])

    def adjoint(self) -> Tensor:
        return self.weight.detach().T.clone()

    def full_weight(self) -> Tensor:
        return self.weight

    def pseudo_inverse(self, gamma: float = 0.0) -> Tensor:
        return F.regularised_inverse(self.full_weight(), gamma)


class AuxiliaryDense(Dense):
    """AO-SDTP's output layer (thesis 3.1.2, eq. 3.16): ``h_L = [o, z]``, ``o = s(W h)`` the model's outputs
    and ``z = s(W~ h)`` auxiliary units with fixed weights ``W~`` (a buffer: they never change).

    ``weight`` holds the ``out_features`` trained rows; the network's output is ``[o, z]`` and the
    model's prediction is ``o`` (:meth:`model_output`). The rows are drawn as one
    ``(out_features + aux_units, in_features)`` matrix, as a plain dense layer of that width would be.

    It takes every argument of :class:`Dense` too.

    Args:
        aux_units: number of auxiliary outputs (at least 1).

    >>> layer = AuxiliaryDense(3, 2, aux_units=1)
    >>> h = layer(torch.zeros(1, 3))
    >>> h.shape, layer.model_output(h).shape
    (torch.Size([1, 3]), torch.Size([1, 2]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        aux_units: int,
        activation: str | Activation = "leaky_relu",
        negative_slope: float = 0.35,
        bias: bool = False,
        init: str = "gaussian",
        init_std: float | None = None,
        generator: torch.Generator | None = None,
    ):
        if not isinstance(aux_units, int) or aux_units < 1:
            raise ConfigError(f"aux_units must be a positive integer, got {aux_units!r}")
        super().__init__(in_features, out_features + aux_units, activation, negative_slope, bias, init, init_std, generator)
        self._init_args.update(out_features=out_features, aux_units=aux_units)
        full = self.weight.detach()
        self.weight = nn.Parameter(full[:out_features].clone())
        self.register_buffer("aux_weight", full[out_features:].clone())
        if self.bias is not None:
            self.bias = nn.Parameter(torch.zeros(out_features))
        self.model_outputs, self.aux_units = out_features, aux_units
        self.supports_exact_inverse = False

    def forward_pre(self, h_prev):
        W = torch.cat([self.weight, self.aux_weight])
        a = h_prev.flatten(1) @ W.T
        if self.bias is not None:
            a = a + torch.cat([self.bias, self.bias.new_zeros(self.aux_units)])
        return a, self.activation(a)

    def model_output(self, h: Tensor) -> Tensor:
        return h[..., : self.model_outputs]

    def output_target(self, o_hat: Tensor, h: Tensor) -> Tensor:
        """``[o^, z]``: the auxiliary units keep their values (no target)."""
        return torch.cat([o_hat, h[:, self.model_outputs :]], dim=1)

    def grads_from_delta(self, delta, h_prev):
        return super().grads_from_delta(delta[:, : self.model_outputs], h_prev)

    def linear_out(self, h_prev):
        return h_prev.flatten(1) @ torch.cat([self.weight, self.aux_weight]).T

    def pre_output(self, h):
        a = self.activation.inverse(h)
        return a if self.bias is None else a - torch.cat([self.bias, self.bias.new_zeros(self.aux_units)])

    def feedback_shape(self):
        return (self.weight.shape[1], self.weight.shape[0] + self.aux_units)

    def adjoint(self):
        return self.full_weight().detach().T.clone()

    def full_weight(self) -> Tensor:
        """``[W; W~]``, the whole ``(out_features + aux_units, in_features)`` matrix."""
        return torch.cat([self.weight, self.aux_weight])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        W = state_dict.get(prefix + "weight")  # a checkpoint of the full-width layer (tplightning 0.1)
        if W is not None and prefix + "aux_weight" not in state_dict and W.shape[0] == self.model_outputs + self.aux_units:
            state_dict[prefix + "weight"], state_dict[prefix + "aux_weight"] = W[: self.model_outputs], W[self.model_outputs :]
            b = state_dict.get(prefix + "bias")
            if b is not None:
                state_dict[prefix + "bias"] = b[: self.model_outputs]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Conv2d(Layer):
    """``h_i = s_i(maxpool(conv(h_{i-1}, W_i) (+ b_i)))`` on ``(B, C, H, W)`` feature maps.

    Max-pooling commutes with the monotone activations of this library, so ``h_i = maxpool(s(conv))``
    too, and ``s^{-1}(h_i) - b`` is the pooled convolution: a feedback map undoes the pooling by
    nearest-neighbour upsampling and the convolution by a transposed convolution. The local gradient
    comes from autograd. Flat ``(B, prod(input_shape))`` inputs are reshaped to ``input_shape``.

    Args:
        input_shape: ``(C, H, W)`` of the input.
        out_channels: feature maps.
        kernel_size: of the convolution.
        stride: of the convolution.
        padding: of the convolution.
        pool: max-pooling window and stride (1: none).
        activation: as for :class:`Dense`.
        negative_slope: as for :class:`Dense`.
        bias: as for :class:`Dense`.
        init: as for :class:`Dense` (``orthogonal`` makes the flattened ``(out_channels, C k^2)`` kernel orthogonal).
        init_std: as for :class:`Dense` (the fan-in is ``C k^2``).
        generator: as for :class:`Dense`.

    >>> layer = Conv2d((1, 6, 6), out_channels=2, kernel_size=3, pool=2)
    >>> layer.out_shape, layer(torch.zeros(5, 36)).shape
    ((2, 2, 2), torch.Size([5, 2, 2, 2]))
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        pool: int = 1,
        activation: str | Activation = "tanh",
        negative_slope: float = 0.35,
        bias: bool = True,
        init: str = "gaussian",
        init_std: float | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        input_shape = tuple(int(n) for n in input_shape)
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ConfigError(f"input_shape must be (channels, height, width) of positive ints, got {input_shape}")
        for name, v, low in (("out_channels", out_channels, 1), ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0), ("pool", pool, 1)):
            if not isinstance(v, int) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
        self._init_args = {"input_shape": list(input_shape), "out_channels": out_channels, "kernel_size": kernel_size, "stride": stride,
                           "padding": padding, "pool": pool, "activation": getattr(activation, "name", activation),
                           "negative_slope": negative_slope, "bias": bias, "init": init, "init_std": init_std}  # fmt: skip
        self.activation = get_activation(activation, negative_slope)
        self.stride, self.padding, self.pool = stride, padding, pool
        C, H, W = input_shape
        conv_hw = [(n + 2 * padding - kernel_size) // stride + 1 for n in (H, W)]
        if min(conv_hw) < 1 or min(conv_hw) < pool:
            raise ConfigError(f"kernel_size {kernel_size}, padding {padding}, stride {stride}, pool {pool} do not fit input {input_shape}")
        self.conv_shape = (out_channels, *conv_hw)
        self.in_shape, self.out_shape = input_shape, (out_channels, conv_hw[0] // pool, conv_hw[1] // pool)
        flat = _initial_weight((out_channels, C * kernel_size * kernel_size), init, init_std, generator)
        self.weight = nn.Parameter(flat.reshape(out_channels, C, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def _unflat(self, h: Tensor) -> Tensor:
        return h.reshape(h.shape[0], *self.in_shape) if h.dim() == 2 else h

    def _pool(self, a: Tensor) -> Tensor:
        return nnf.max_pool2d(a, self.pool) if self.pool > 1 else a

    def forward_pre(self, h_prev):
        a = self._pool(nnf.conv2d(self._unflat(h_prev), self.weight, self.bias, self.stride, self.padding))
        return a, self.activation(a)

    def linear_out(self, h_prev):
        return self._pool(nnf.conv2d(self._unflat(h_prev), self.weight, None, self.stride, self.padding))

    def _bias_view(self):
        return self.bias[:, None, None]

    def transpose(self, v, M):
        v = v.reshape(v.shape[0], *self.out_shape)
        if self.pool > 1:  # nearest-neighbour upsampling undoes the max-pooling's window
            v = v.repeat_interleave(self.pool, 2).repeat_interleave(self.pool, 3)
            pad_h, pad_w = self.conv_shape[1] - v.shape[2], self.conv_shape[2] - v.shape[3]
            if pad_h or pad_w:
                v = nnf.pad(v, (0, pad_w, 0, pad_h), mode="replicate")
        H, W = self.in_shape[1:]
        k = M.shape[-1]
        extra = [n - ((m - 1) * self.stride - 2 * self.padding + k) for n, m in zip((H, W), self.conv_shape[1:])]
        return nnf.conv_transpose2d(v, M, None, self.stride, self.padding, output_padding=tuple(extra))

    def feedback_shape(self):
        return tuple(self.weight.shape)

    @property
    def feedback_fan_in(self) -> int:
        return self.weight.shape[0] * self.weight.shape[2] * self.weight.shape[3]

    def adjoint(self):
        return self.weight.detach().clone()


_LAYERS = {"Dense": Dense, "AuxiliaryDense": AuxiliaryDense, "Conv2d": Conv2d}


def _layer_classes() -> dict[str, type]:
    from .blocks import Block  # blocks builds on this module

    return {**_LAYERS, "Block": Block}


def build_layer(spec: Layer | dict) -> Layer:
    """A layer from a :class:`Layer` or its ``{"class_path", "init_args"}`` spec (as checkpoints store it).

    >>> build_layer({"class_path": "tplightning.layers.Dense", "init_args": {"in_features": 3, "out_features": 2}}).weight.shape
    torch.Size([2, 3])
    """
    if isinstance(spec, Layer):
        return spec
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ConfigError(f"a network layer must be a Layer or a {{class_path, init_args}} mapping, got {spec!r}")
    name, classes = str(spec["class_path"]).rsplit(".", 1)[-1], _layer_classes()
    if name not in classes:
        raise ConfigError(f"unknown layer class {spec['class_path']!r}; expected one of {sorted(classes)}")
    return classes[name](**spec.get("init_args", {}))


#: the initial weights a layer can draw: Gaussian (std ``init_std``, default ``1/sqrt(fan_in)``), orthogonal, or Xavier
#: normal (Gaussian with std ``sqrt(2 / (fan_in + fan_out))``, Glorot & Bengio 2010; Meulemans et al. 2020's
#: ``initialization: xavier_normal``)
INITS = ("gaussian", "orthogonal", "xavier_normal")


#: the laws of a random feedback weight (:func:`random_feedback`): the library's Gaussian with std ``1/sqrt(fan-in)``,
#: and Glorot & Bengio (2010)'s Xavier normal and Xavier uniform laws
FEEDBACK_LAWS = ("random", "xavier_normal", "xavier_uniform")


def sign_feedback_scales(feedback_shape: Sequence[int]) -> tuple[float, float]:
    """``(sqrt(2 / (fan_in + fan_out)), sqrt(6 / (fan_in + fan_out)))`` of a weight: the std of a Xavier (Glorot) law and the
    bound ``a`` of Xavier's uniform law ``U(-a, a)`` (Glorot & Bengio 2010, eq. 16 with ``sqrt(6)``), the scales biotorch gives
    sign-concordant feedback. ``fan_in + fan_out`` is symmetric in the two leading dimensions, so the weight's shape or its
    transpose's give the same numbers: for a dense ``(n_out, n_in)`` weight it is ``n_out + n_in``, for a
    ``(C_out, C_in, k, k)`` kernel ``(C_out + C_in) k^2`` (what ``torch.nn.init.xavier_normal_`` computes).

    >>> sign_feedback_scales((3, 5))  # dense: sqrt(2/8), sqrt(6/8)
    (0.5, 0.8660254037844386)
    >>> sign_feedback_scales((2, 1, 3, 3))[0] == (2 / 27) ** 0.5
    True
    """
    n = (feedback_shape[0] + feedback_shape[1]) * math.prod(feedback_shape[2:])
    return (2 / n) ** 0.5, (6 / n) ** 0.5


def random_feedback(shape: Sequence[int], fan_in: int, law: str = "random", *, like: Tensor | None = None) -> Tensor:
    """A random feedback weight of ``shape`` (a feedback shape: ``W^T``'s for a dense map, the kernel's for a convolution)
    drawn from torch's global generator under ``law``, in ``like``'s dtype and device:

    * ``random``: Gaussian with std ``1/sqrt(fan_in)``, ``fan_in`` the inputs per unit of the map back (the library's
      default for every random feedback matrix; one ``torch.randn`` call, so seeded runs keep their numbers);
    * ``xavier_normal``: Gaussian with std ``sqrt(2 / (fan_in + fan_out))`` of the flattened weight (Glorot & Bengio 2010;
      ``torch.nn.init.xavier_normal_``'s fans, :func:`sign_feedback_scales`), the law of Meulemans et al. (2020)'s feedback;
    * ``xavier_uniform``: ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))`` (biotorch's feedback alignment draws).

    ``fan_in`` is used by ``random`` only (Xavier's fans follow from ``shape``). A
    :class:`~tplightning.errors.ConfigError` names ``feedback_init`` for an unknown law.

    >>> _ = torch.manual_seed(0)
    >>> B = random_feedback((1000, 10), 10, "xavier_uniform")
    >>> round(float(B.abs().max()), 2), round(sign_feedback_scales((1000, 10))[1], 2)  # within Xavier's bound
    (0.08, 0.08)
    """
    like = {} if like is None else {"dtype": like.dtype, "device": like.device}
    if law == "random":
        return torch.randn(*shape, **like) / fan_in**0.5
    std, bound = sign_feedback_scales(shape)
    if law == "xavier_normal":
        return torch.randn(*shape, **like) * std
    if law == "xavier_uniform":
        return (2 * torch.rand(*shape, **like) - 1) * bound
    raise ConfigError(f"feedback_init must be one of {', '.join(map(repr, FEEDBACK_LAWS))} for a random draw, got {law!r}")


def _initial_weight(shape: tuple[int, int], init: str, init_std: float | None, generator: torch.Generator | None) -> Tensor:
    if init not in INITS:
        raise ConfigError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    if init != "gaussian" and init_std is not None:
        raise ConfigError(f"init_std={init_std} applies to Gaussian weights only; leave it None with init={init!r}")
    if init_std is not None and not init_std > 0:
        raise ConfigError(f"init_std must be > 0 (or None for 1/sqrt(n_in)), got {init_std}")
    if init == "xavier_normal":  # Glorot & Bengio 2010: std sqrt(2 / (fan_in + fan_out)), fans of the flattened matrix
        std = math.sqrt(2.0 / (shape[0] + shape[1]))
    else:
        std = init_std if init_std is not None else 1.0 / math.sqrt(shape[1])
    W = torch.randn(*shape, generator=generator) * std
    if init == "orthogonal":  # drawn after the Gaussian one, which keeps the seeded stream the MNIST runs used
        nn.init.orthogonal_(W, generator=generator)
    return W


class Network(nn.Module):
    """A stack of layers ``h_i = f_i(h_{i-1})``, ``i = 1..L``; returns every activation and pre-activation.

    Consecutive layers must fit (``out_features`` of one = ``in_features`` of the next). The last
    layer may carry units that are not model outputs (:class:`AuxiliaryDense`): :meth:`forward`
    returns the model's outputs, :meth:`forward_all` the whole ``h_L``.

    >>> net = Network([Dense(3, 4), Dense(4, 2, activation="linear")])
    >>> hs, pre = net.forward_all(torch.zeros(5, 3))
    >>> net.sizes, len(hs), len(pre)
    ([3, 4, 2], 3, 2)
    """

    def __init__(self, layers: Sequence[Layer | dict]):
        super().__init__()
        layers = [build_layer(layer) for layer in layers]
        if not layers:
            raise ConfigError("a network needs at least one layer")
        for k, (lower, upper) in enumerate(zip(layers[:-1], layers[1:]), start=1):
            if lower.out_features != upper.in_features:
                raise ConfigError(
                    f"layer {k} outputs {lower.out_features} features {lower.out_shape} but layer {k + 1} expects "
                    f"{upper.in_features} {upper.in_shape}"
                )
        self.layers = nn.ModuleList(layers)
        self._register_load_state_dict_pre_hook(_legacy_mlp_keys)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def sizes(self) -> list[int]:
        """``[n_0, n_1, ..., n_L]`` (flattened feature counts)."""
        return [self.layers[0].in_features] + [layer.out_features for layer in self.layers]

    @property
    def output_dim(self) -> int:
        """The number of model outputs (AO-SDTP's auxiliary units excluded)."""
        return getattr(self.layers[-1], "model_outputs", self.layers[-1].out_features)

    @property
    def weights(self) -> list[Tensor]:
        """The live forward weights ``[W_1, ..., W_L]``."""
        return [layer.weight for layer in self.layers]

    @property
    def biases(self) -> list[Tensor] | None:
        """The biases ``[b_1, ..., b_L]``, or ``None`` when no layer has one."""
        biases = [layer.bias for layer in self.layers]
        return None if all(b is None for b in biases) else biases

    @property
    def activations(self) -> list[Activation]:
        return [layer.activation for layer in self.layers]

    @property
    def spec(self) -> list[dict]:
        return [layer.spec for layer in self.layers]

    @contextlib.contextmanager
    def frozen_state(self):
        """Inside, the layers' forward passes leave their state alone: a :class:`~tplightning.blocks.Block` in training
        mode normalises by the batch's statistics but does not update its running statistics. The target-propagation
        rules run everything after a batch's forward pass inside it, so the statistics move once per batch.

        >>> net = Network([Dense(2, 2)])
        >>> with net.frozen_state():
        ...     net(torch.zeros(1, 2)).shape
        torch.Size([1, 2])
        """
        held = [layer for layer in self.layers if hasattr(layer, "_frozen")]
        for layer in held:
            layer._frozen += 1
        try:
            yield
        finally:
            for layer in held:
                layer._frozen -= 1

    def layer(self, i: int, h_prev: Tensor) -> tuple[Tensor, Tensor]:
        """Layer ``i`` (1-based): ``(a_i, h_i)``."""
        return self.layers[i - 1].forward_pre(h_prev)

    def forward_all(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``([h_0, ..., h_L], [a_1, ..., a_L])``."""
        hs, pre = [x], []
        for layer in self.layers:
            a, h = layer.forward_pre(hs[-1])
            pre.append(a)
            hs.append(h)
        return hs, pre

    def model_output(self, h_L: Tensor) -> Tensor:
        last = self.layers[-1]
        return last.model_output(h_L) if hasattr(last, "model_output") else h_L

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.layers:
            h = layer(h)
        return self.model_output(h).contiguous()


def _legacy_mlp_keys(state_dict, prefix, *args) -> None:
    """Read tplightning 0.1 checkpoints, whose MLP kept ``weights.k`` / ``biases.k`` parameter lists."""
    for key in [k for k in state_dict if k.startswith(prefix + "weights.") or k.startswith(prefix + "biases.")]:
        kind, k = key[len(prefix) :].split(".", 1)
        state_dict[f"{prefix}layers.{k}.{'weight' if kind == 'weights' else 'bias'}"] = state_dict.pop(key)


def dense_stack(
    sizes: Sequence[int],
    activation: str = "leaky_relu",
    output_activation: str = "linear",
    negative_slope: float = 0.35,
    bias: bool = False,
    init_std: float | None = None,
    generator: torch.Generator | None = None,
    init: str = "gaussian",
    aux_units: int = 0,
) -> list[Layer]:
    """The thesis' fully connected layers for sizes ``[n_0, ..., n_L]``: ``activation`` in the hidden
    layers, ``output_activation`` at the output; ``aux_units > 0`` makes the output an :class:`AuxiliaryDense`.

    >>> [type(layer).__name__ for layer in dense_stack([3, 4, 2], aux_units=1)]
    ['Dense', 'AuxiliaryDense']
    """
    sizes = check_sizes(sizes)
    if init not in INITS:
        raise ConfigError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    L = len(sizes) - 1
    common = {"negative_slope": negative_slope, "bias": bias, "init": init, "init_std": init_std, "generator": generator}
    layers: list[Layer] = [Dense(sizes[k], sizes[k + 1], activation, **common) for k in range(L - 1)]
    if aux_units:
        layers.append(AuxiliaryDense(sizes[-2], sizes[-1], aux_units, activation=output_activation, **common))
    else:
        layers.append(Dense(sizes[-2], sizes[-1], output_activation, **common))
    return layers


_DEFAULT_SIZES = (6, 6, 6)


def build_network(
    sizes: Sequence[int] = _DEFAULT_SIZES,
    activation: str = "leaky_relu",
    output_activation: str = "linear",
    negative_slope: float = 0.35,
    bias: bool = False,
    init_std: float | None = None,
    init: str = "gaussian",
    network: Sequence[Layer | dict | nn.Module] | nn.Module | None = None,
    aux_units: int = 0,
) -> Network:
    """The network of a rule: ``network`` when given (layers or their specs, or a PyTorch model: an ``nn.Sequential`` or
    a list of torch modules, converted to blocks by :func:`tplightning.blocks.convert`), else the MLP of ``sizes``.

    With ``network``, ``sizes`` must be left at its default or equal the network's sizes.

    >>> build_network([3, 4, 2]).sizes
    [3, 4, 2]
    >>> build_network(network=[{"class_path": "tplightning.layers.Dense", "init_args": {"in_features": 3, "out_features": 2}}]).sizes
    [3, 2]
    """
    if network is None:
        return Network(dense_stack(sizes, activation, output_activation, negative_slope, bias, init_std, None, init, aux_units))
    if isinstance(network, Network):
        net = network
    elif isinstance(network, nn.Module) or any(isinstance(m, nn.Module) and not isinstance(m, Layer) for m in network):
        from .blocks import convert  # blocks builds on this module

        net = convert(network)
    else:
        net = Network(list(network))
    if tuple(sizes) != _DEFAULT_SIZES and list(sizes) != net.sizes:
        raise ConfigError(f"give either sizes or network: sizes={list(sizes)} but the network's sizes are {net.sizes}")
    if aux_units:
        raise ConfigError("aux_units apply to the MLP built from sizes; put an AuxiliaryDense output layer in the network instead")
    return net


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """The sorted 1-based indices of ``train_layers`` for a network of ``num_layers`` layers (negative indices count
    from the output, ``-1`` is the output layer); ``None`` means all. Bad entries are a
    :class:`~tplightning.errors.ConfigError` naming ``train_layers``.

    >>> resolve_layers([-1, 1], 3)
    [1, 3]
    >>> resolve_layers(None, 2)
    [1, 2]
    """
    L = num_layers
    if layers is None:
        return list(range(1, L + 1))
    given = layers
    layers = [] if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__") else list(layers)
    if not layers:
        raise ConfigError(f"train_layers must list at least one layer index (1..{L}, or -1 for the output layer), got {given!r}")
    out = []
    for i in layers:
        try:
            if isinstance(i, bool):
                raise TypeError
            i = operator.index(i)  # ints, numpy and 0-d tensor integers
        except TypeError:
            raise ConfigError(f"train_layers entries must be integers, got {i!r}") from None
        j = i + L + 1 if i < 0 else i
        if not 1 <= j <= L:
            raise ConfigError(f"train_layers entry {i} is out of range for a network with {L} layers (1..{L}, or -{L}..-1 from the output)")
        out.append(j)
    return sorted(set(out))
