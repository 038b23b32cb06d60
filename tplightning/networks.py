"""The thesis' fully connected network ``h_i = s_i(W_i h_{i-1} (+ b_i))`` (eq. 4.1) as a :class:`~tplightning.layers.Network`.

Layers themselves live in :mod:`tplightning.layers`; :class:`MLP` is the stack of dense layers built
from sizes, which the rules' ``sizes=...`` argument and the student-teacher data module's teacher use.

>>> from tplightning.networks import MLP
>>> MLP([784, 256, 10]).sizes
[784, 256, 10]
"""
from __future__ import annotations

from collections.abc import Sequence

from .layers import Network, check_sizes, dense_stack

__all__ = ["MLP", "check_sizes"]


class MLP(Network):
    """Fully connected network of the thesis, ``h_i = s_i(W_i h_{i-1} (+ b_i))``, ``i = 1..L`` (eq. 4.1).

    ``forward(x)`` returns the model output ``h_L``; ``forward_all(x)`` returns every activation and
    pre-activation, ``([h_0, ..., h_L], [a_1, ..., a_L])``. ``W_i`` has shape ``(n_i, n_{i-1})``.

    Args:
        sizes: ``[n_0, n_1, ..., n_L]``, input size first.
        activation: non-linearity ``s_i`` of the hidden layers (``leaky_relu``, ``tanh``, ...).
        output_activation: non-linearity ``s_L`` of the output layer (``linear`` by default).
        negative_slope: slope of ``leaky_relu`` for negative inputs.
        bias: add a bias ``b_i`` to every layer (off by default, as in the thesis).
        init_std: standard deviation of the Gaussian initial weights; ``None`` means
            ``1/sqrt(n_{i-1})``. The thesis' teachers use 1.0.
        generator: optional ``torch.Generator`` for the initial weights.
        init: ``gaussian`` (i.i.d. entries of std ``init_std``) or ``orthogonal``: every ``W_i``
            (semi-)orthogonal, all its singular values 1, so ``W_i^dagger = W_i^T`` and the
            inverses that target propagation relies on start perfectly conditioned (the smallest
            singular value of a square Gaussian matrix is about ``1/n`` of its typical one; see
            ``docs/initialisation.md``). ``init_std`` must be ``None`` with ``orthogonal``.
        aux_units: AO-SDTP's fixed auxiliary output units (0: none).

    >>> import torch
    >>> net = MLP([3, 4, 2], init="orthogonal")
    >>> torch.allclose(net.weights[0].T @ net.weights[0], torch.eye(3), atol=1e-5)  # W_1 is 4 x 3
    True
    """

    def __init__(self, sizes: Sequence[int], *args, **kwargs):
        super().__init__(dense_stack(sizes, *args, **kwargs))
