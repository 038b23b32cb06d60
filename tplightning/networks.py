"""Networks without Lightning: the forward MLP ``h_i = s_i(W_i h_{i-1} (+ b_i))`` (eq. 4.1)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .functional import Activation, get_activation

__all__ = ["MLP", "check_sizes"]


def check_sizes(sizes: Sequence[int]) -> list[int]:
    """Validate layer sizes ``[n_0, ..., n_L]`` (at least input and output, all positive ints)."""
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes must list at least an input and an output size, got {sizes}")
    bad = [n for n in sizes if not isinstance(n, int) or isinstance(n, bool) or n <= 0]
    if bad:
        raise ValueError(f"layer sizes must be positive integers, got {sizes} (bad: {bad})")
    return sizes


class MLP(nn.Module):
    """Fully connected network of the thesis; returns every activation and pre-activation.

    Args:
        sizes: ``[n_0, n_1, ..., n_L]``, input size first.
        activation: non-linearity ``s_i`` of the hidden layers (``leaky_relu``, ``tanh``, ...).
        output_activation: non-linearity ``s_L`` of the output layer (``linear`` by default).
        negative_slope: slope of ``leaky_relu`` for negative inputs.
        bias: add a bias ``b_i`` to every layer (off by default, as in the thesis).
        init_std: standard deviation of the Gaussian initial weights; ``None`` means
            ``1/sqrt(n_{i-1})``. The thesis' teachers use 1.0.
        init: ``gaussian`` (i.i.d. entries of std ``init_std``) or ``orthogonal``: every ``W_i``
            (semi-)orthogonal, all its singular values 1, so ``W_i^dagger = W_i^T`` and the
            inverses that target propagation relies on start perfectly conditioned (the smallest
            singular value of a square Gaussian matrix is about ``1/n`` of its typical one; at
            ``n = 256`` its inverse amplified MNIST targets 20-80-fold per layer). ``init_std``
            must be ``None`` with ``orthogonal``.
        generator: optional ``torch.Generator`` for the initial weights.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str = "leaky_relu",
        output_activation: str = "linear",
        negative_slope: float = 0.35,
        bias: bool = False,
        init_std: float | None = None,
        generator: torch.Generator | None = None,
        init: str = "gaussian",
    ):
        super().__init__()
        self.sizes = check_sizes(sizes)
        if init not in ("gaussian", "orthogonal"):
            raise ValueError(f"init must be 'gaussian' or 'orthogonal', got {init!r}")
        if init == "orthogonal" and init_std is not None:
            raise ValueError(f"init_std={init_std} applies to Gaussian weights only; leave it None with init='orthogonal'")
        L = len(self.sizes) - 1
        hidden = get_activation(activation, negative_slope)
        self.activations: list[Activation] = [hidden] * (L - 1) + [get_activation(output_activation, negative_slope)]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList() if bias else None
        for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:]):
            std = init_std if init_std is not None else 1.0 / math.sqrt(n_in)
            W = torch.randn(n_out, n_in, generator=generator) * std
            if init == "orthogonal":  # drawn after the Gaussian one, which keeps the seeded stream the MNIST runs used
                nn.init.orthogonal_(W, generator=generator)
            self.weights.append(nn.Parameter(W))
            if self.biases is not None:
                self.biases.append(nn.Parameter(torch.zeros(n_out)))

    @property
    def num_layers(self) -> int:
        return len(self.weights)

    def layer(self, i: int, h_prev: Tensor) -> tuple[Tensor, Tensor]:
        """Layer ``i`` (1-based): returns ``(a_i, h_i)`` with ``a_i = W_i h_{i-1} (+ b_i)``."""
        a = h_prev @ self.weights[i - 1].T
        if self.biases is not None:
            a = a + self.biases[i - 1]
        return a, self.activations[i - 1](a)

    def forward_all(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``([h_0, ..., h_L], [a_1, ..., a_L])``."""
        hs, pre = [x], []
        for i in range(1, self.num_layers + 1):
            a, h = self.layer(i, hs[-1])
            pre.append(a)
            hs.append(h)
        return hs, pre

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i in range(1, self.num_layers + 1):
            h = self.layer(i, h)[1]
        return h
