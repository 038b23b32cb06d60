"""Batch normalisation's running statistics asserted directly (thesis Alg. A.1; :mod:`tplightning.normalization`).

As the module documents: per unit, over the batch, the mean and the *biased* variance (divided by ``B``, not ``B - 1``
as ``torch.nn.BatchNorm1d``'s running variance is); running values updated as ``r <- (1 - m) r + m x`` from ``0`` (mean)
and ``1`` (variance); evaluation normalises with the running values, ``(h - r_mean) / sqrt(r_var + eps)``. The
expectations are computed here in numpy, batch by batch, with batches of 5 samples (biased and unbiased variance differ
by 5/4) and a momentum of 0.25.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import tplightning as tp
from conftest import quiet_trainer
from tplightning._lightning import pl  # the Lightning package the project's switch chose
from tplightning.normalization import InputNormalization

MOMENTUM, EPS = 0.25, 1e-3
SIZES = [5, 6, 4, 3]


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def data(n: int = 15, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 1.5 + 2.0 * torch.randn(n, SIZES[0], generator=g)  # mean and spread far from 0 and 1
    y = 0.5 * torch.rand(n, SIZES[-1], generator=g) - 0.25
    return x, y


def numpy_pass(Ws, x, mean, var, train: bool):
    """The normalised forward pass (tanh everywhere) and the running statistics after it, in numpy.

    ``mean``/``var``: running values per layer input, updated in place when ``train``."""
    h = x
    for j, W in enumerate(Ws):
        if train:
            mu, v = h.mean(0), ((h - h.mean(0)) ** 2).sum(0) / h.shape[0]
            mean[j] = (1 - MOMENTUM) * mean[j] + MOMENTUM * mu
            var[j] = (1 - MOMENTUM) * var[j] + MOMENTUM * v
        else:
            mu, v = mean[j], var[j]
        h = np.tanh((h - mu) / np.sqrt(v + EPS) @ W.T)
    return h


def test_input_normalization_running_statistics_after_known_batches():
    torch.manual_seed(0)
    rule = tp.BP(sizes=SIZES, activation="tanh", output_activation="tanh").double()
    norm = InputNormalization(SIZES[:-1], momentum=MOMENTUM, eps=EPS).double()
    x, _ = data()
    Ws = [np_(w) for w in rule.forward_weights]
    mean, var = [np.zeros(n) for n in SIZES[:-1]], [np.ones(n) for n in SIZES[:-1]]
    for k in range(3):
        xb = x[5 * k : 5 * k + 5].double()
        hs = norm.forward_all(rule.net, xb, train=True, update=True)[0]
        np.testing.assert_allclose(np_(hs[-1]), numpy_pass(Ws, np_(xb), mean, var, train=True), rtol=1e-10, atol=1e-12)
    state = norm.state_dict()
    for j in range(len(SIZES) - 1):
        np.testing.assert_allclose(np_(state[f"running_mean_{j}"]), mean[j], rtol=1e-10, atol=1e-12, err_msg=f"mean {j}")
        np.testing.assert_allclose(np_(state[f"running_var_{j}"]), var[j], rtol=1e-10, atol=1e-12, err_msg=f"var {j}")
    # literal check of the first layer input: 3 batches from 0 / 1 with momentum 1/4
    xs = [np_(x[5 * k : 5 * k + 5]) for k in range(3)]
    m0 = sum(0.25 * 0.75 ** (2 - k) * xb.mean(0) for k, xb in enumerate(xs))
    v0 = 0.75**3 + sum(0.25 * 0.75 ** (2 - k) * xb.var(0, ddof=0) for k, xb in enumerate(xs))
    np.testing.assert_allclose(np_(state["running_mean_0"]), m0, rtol=1e-10)
    np.testing.assert_allclose(np_(state["running_var_0"]), v0, rtol=1e-10)
    # a pass without update leaves them; evaluation normalises with them
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    xe = x[:7].double()
    norm.forward_all(rule.net, xe, train=True, update=False)
    ev = norm.forward_all(rule.net, xe, train=False, update=False)[0][-1]
    for k, v in norm.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    np.testing.assert_allclose(np_(ev), numpy_pass(Ws, np_(xe), mean, var, train=False), rtol=1e-10, atol=1e-12)


class RecordWeights(pl.Callback):
    """The forward weights each training batch starts from."""

    def __init__(self):
        self.weights: list[list[np.ndarray]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append([np_(w) for w in pl_module.forward_weights])


class Batches(pl.LightningDataModule):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)


def test_batch_normalised_rule_keeps_the_running_statistics_of_its_training_batches():
    """MTP (``batch_norm=True``) over 3 batches of 5: every layer input's running mean and biased variance follow the
    momentum update from the weights each step started with; evaluation uses them."""
    torch.manual_seed(1)
    sgd = functools.partial(torch.optim.SGD, lr=0.05)
    rule = tp.MTP(sizes=SIZES, activation="tanh", output_activation="tanh", bn_momentum=MOMENTUM, bn_eps=EPS,
                  forward_optimizer=sgd, feedback_optimizer=sgd)  # fmt: skip
    x, y = data()
    spy = RecordWeights()
    quiet_trainer(max_epochs=1, callbacks=[spy]).fit(rule, datamodule=Batches(x, y, 5))
    assert len(spy.weights) == 3
    assert any(not np.array_equal(a, b) for a, b in zip(spy.weights[0], spy.weights[2]))  # the weights moved
    mean, var = [np.zeros(n) for n in SIZES[:-1]], [np.ones(n) for n in SIZES[:-1]]
    for k, Ws in enumerate(spy.weights):
        numpy_pass(Ws, np_(x[5 * k : 5 * k + 5]), mean, var, train=True)
    state = rule.state_dict()
    for j in range(len(SIZES) - 1):
        np.testing.assert_allclose(np_(state[f"normalization.running_mean_{j}"]), mean[j], rtol=1e-5, atol=1e-6, err_msg=f"mean {j}")
        np.testing.assert_allclose(np_(state[f"normalization.running_var_{j}"]), var[j], rtol=1e-5, atol=1e-6, err_msg=f"var {j}")
    rule.eval()
    final = [np_(w) for w in rule.forward_weights]
    with torch.no_grad():
        out = rule(x[:6])
    np.testing.assert_allclose(np_(out), numpy_pass(final, np_(x[:6]), mean, var, train=False), rtol=1e-5, atol=1e-6)


def test_difference_targets_under_batch_norm_vanish_with_the_output_error():
    """With ``eta^ -> 0`` the output target is the output, so every difference target must equal its activation
    (eq. 4.101's correction cancels the map's reconstruction error), with or without batch normalisation."""
    torch.manual_seed(0)
    sgd = functools.partial(torch.optim.SGD, lr=0.01)
    rule = tp.DTPAI(sizes=[5, 6, 6, 3], activation="tanh", batch_norm=True, target_stepsize=1e-12,
                    forward_optimizer=sgd, feedback_optimizer=sgd).double()  # fmt: skip
    x, y = data(8)
    hs, targets = rule.compute_targets(x.double(), y.double())
    for i in (1, 2):
        np.testing.assert_allclose(np_(targets[i - 1]), np_(hs[i]), rtol=0, atol=1e-8, err_msg=f"h^_{i}")
