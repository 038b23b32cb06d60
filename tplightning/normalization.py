"""Batch normalisation of the layer inputs with de-normalised targets (thesis Alg. A.1, A.3), as a piece.

Layer ``i`` receives ``h~_{i-1} = (h_{i-1} - mu) / sigma`` (per unit, over the batch; running statistics
with momentum at evaluation). A target map inverts ``f_{i+1}`` onto ``h~_i``, so the target is
de-normalised, ``h^_i = sigma * g_i(h^_{i+1}) + mu``. Where Alg. A.1 writes ``h_{k-1}`` in the update we
use the normalised input ``h~_{k-1}`` the layer received: the local loss depends on ``W_k`` through
``f_k(h~_{k-1})``, so this is its gradient.

The thesis leaves open which variance and what happens at evaluation. We normalise with the biased
batch variance ``mean_b (h_b - mu)^2`` plus ``eps`` and keep running averages of ``mu`` and of that same
biased variance (``torch.nn.BatchNorm1d`` keeps the unbiased one), which evaluation uses in place of the
batch's statistics.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["InputNormalization"]


class InputNormalization(nn.Module):
    """Running statistics of every layer's input and the normalised forward pass of a network.

    Layer ``j`` (0-based) has buffers ``running_mean_j`` (zeros at first) and ``running_var_j`` (ones),
    updated as ``running <- (1 - momentum) running + momentum * batch`` when :meth:`forward_all` is asked to.

    Args:
        sizes: input features of the layers, ``[n_0, ..., n_{L-1}]``.
        momentum: of the running mean/variance.
        eps: added to the variance.

    >>> from tplightning.layers import Network, Dense
    >>> net = Network([Dense(2, 3), Dense(3, 1)])
    >>> norm = InputNormalization(net.sizes[:-1])
    >>> hs, pre, inputs, stats = norm.forward_all(net, torch.tensor([[1.0, 2.0], [3.0, 6.0]]), train=True, update=True)
    >>> inputs[0]  # layer 1's input, normalised over the batch
    tensor([[-1.0000, -1.0000],
            [ 1.0000,  1.0000]])
    >>> norm.running_mean_0  # moved by momentum 0.1 towards the batch mean [2, 4]
    tensor([0.2000, 0.4000])
    """

    def __init__(self, sizes: Sequence[int], momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        for j, n in enumerate(sizes):
            self.register_buffer(f"running_mean_{j}", torch.zeros(n))
            self.register_buffer(f"running_var_{j}", torch.ones(n))

    def forward_all(self, net, x: Tensor, train: bool, update: bool):
        """``(hs, pre, inputs, stats)``: the pass with normalised layer inputs, those inputs and ``(mu, sigma)`` per layer.

        ``hs = [h_0, ..., h_L]`` and ``pre = [a_1, ..., a_L]`` as :meth:`~tplightning.layers.Network.forward_all`
        returns them, but layer ``j + 1`` receives ``inputs[j] = (h_j - mu_j) / sigma_j`` with
        ``sigma_j = sqrt(var_j + eps)``; ``stats[j] = (mu_j, sigma_j)``, which a target map needs to de-normalise.

        Args:
            net: a :class:`~tplightning.layers.Network` whose layers take the sizes given at construction.
            x: the input batch ``h_0``, ``(B, n_0)``.
            train: normalise with the batch's statistics (``B >= 2``, else ``ValueError``); ``False``: with the
                running ones.
            update: (with ``train``) move the running statistics towards the batch's.
        """
        hs, pre, inputs, stats = [x], [], [], []
        for j, layer in enumerate(net.layers):
            h = hs[-1]
            mean, var = getattr(self, f"running_mean_{j}"), getattr(self, f"running_var_{j}")
            if train:
                if h.shape[0] < 2:
                    raise ConfigError(f"batch_norm normalises over the batch and needs batches of at least 2 samples, got {h.shape[0]}")
                mu = h.mean(0)
                centred = h - mu
                v = (centred * centred).mean(0)  # biased variance; reuses h - mu (torch.var's column reduction is slow on CPU)
                if update:
                    mean.lerp_(mu.to(mean.dtype), self.momentum)  # under autocast the batch's statistics may be bf16/fp16
                    var.lerp_(v.to(var.dtype), self.momentum)
            else:
                mu, v = mean, var
                centred = h - mu
            sigma = (v + self.eps).sqrt()
            stats.append((mu, sigma))
            inputs.append(centred / sigma)
            a, h = layer.forward_pre(inputs[-1])
            pre.append(a)
            hs.append(h)
        return hs, pre, inputs, stats
