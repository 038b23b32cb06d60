"""Tests that fail on six realistic slips which earlier tests, run with degenerate parameters, let through.

Each expectation is a literal or is computed here, in numpy or plain torch, from the rule's public weights; none
calls the library function under test. The parameters are those where the bug shows: a tanh output (``D_{s_L}``
is not 1), ``sigma != 1``, a batch-normalised network (``mu != 0``, ``sigma != 1``), two ranks, epochs past the
schedule's horizon.
"""
from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import torch

import tplightning as tp
from conftest import quiet_trainer, tiny_data
from tplightning._lightning import pl  # the Lightning package the project's switch chose
from tplightning.functional import regularised_inverse
from tplightning.rules.base import LinearDecay


def sgd(lr: float):
    return functools.partial(torch.optim.SGD, lr=lr)


def batch(n_in: int, n_out: int, b: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n_in, generator=g, dtype=torch.float64)
    y = 0.8 * torch.rand(b, n_out, generator=g, dtype=torch.float64) - 0.4  # inside tanh's range
    return x, y


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# --------------------------------------------------------------------------------------------
# (a) the learning rate a resumed run takes after --reapply_optimizer_config
# --------------------------------------------------------------------------------------------


class EpochLR(pl.Callback):
    """The forward optimizer's learning rate at the start of every training epoch."""

    def __init__(self):
        self.seen: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_reapplied_learning_rate_continues_the_rebuilt_schedule_at_the_resumed_epoch(tmp_path):
    pl.seed_everything(0)
    first = tp.BP(sizes=[6, 6, 6], forward_optimizer=sgd(0.1))
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(first, datamodule=tiny_data())
    trainer.save_checkpoint(tmp_path / "after2.ckpt")  # two epochs done, schedule LinearDecay(2, 0.2)

    spy = EpochLR()
    resumed = tp.BP(sizes=[6, 6, 6], forward_optimizer=sgd(0.05))  # a new initial rate, and 5 epochs instead of 2
    quiet_trainer(max_epochs=5, callbacks=[tp.ReapplyOptimizerConfig(reapply=True), spy]).fit(
        resumed, datamodule=tiny_data(), ckpt_path=tmp_path / "after2.ckpt"
    )
    # epochs 2, 3, 4 of 5 at 0.05 * (1 - 0.8 e / 4): 0.6, 0.4 and 0.2 of the new rate
    assert spy.seen == pytest.approx([0.03, 0.02, 0.01], rel=1e-12)


# --------------------------------------------------------------------------------------------
# (b) DFA's targets carry the output derivative D_{s_L}
# --------------------------------------------------------------------------------------------


def test_dfa_targets_scale_the_output_error_by_the_output_derivative():
    torch.manual_seed(3)
    eta = 0.5
    rule = tp.DFA(sizes=[5, 6, 7, 3], activation="tanh", output_activation="tanh", forward_optimizer=sgd(0.01), target_stepsize=eta).double()
    x, y = batch(5, 3)
    hs, targets = rule.compute_targets(x, y)

    W = [np_(w) for w in rule.forward_weights]
    B = [np_(b) for b in rule.feedback_weights]  # B~_i, (n_i, n_L)
    h = [np_(x)]
    for Wi in W:
        h.append(np.tanh(h[-1] @ Wi.T))
    h_hat_L = h[3] - eta * (h[3] - np_(y))
    delta = (1 - h[3] ** 2) * (h_hat_L - h[3])  # D_{s_L} (h^_L - h_L), tanh' = 1 - tanh^2
    expected = [h[i] + delta @ B[i - 1].T for i in (1, 2)] + [h_hat_L]
    assert float(np.abs(1 - h[3] ** 2 - 1).max()) > 0.05  # the derivative is far from 1 here
    for i, (t, e) in enumerate(zip(targets, expected), start=1):
        np.testing.assert_allclose(np_(t), e, rtol=1e-10, atol=1e-12, err_msg=f"h^_{i}")


# --------------------------------------------------------------------------------------------
# (c) the linear decay holds its final factor past its horizon
# --------------------------------------------------------------------------------------------


def test_linear_decay_holds_the_final_factor_after_its_horizon():
    decay = LinearDecay(epochs=3, final=0.2)
    assert [decay(e) for e in range(7)] == pytest.approx([1.0, 0.6, 0.2, 0.2, 0.2, 0.2, 0.2], rel=1e-12)
    assert LinearDecay(epochs=1, final=0.2)(4) == 1.0  # one epoch: no decay at all
    # a 3-epoch run steps the schedule to epoch 3 after its last epoch: the rate stays 0.2 * 0.01, not 1 - 0.8 * 3/2 < 0
    rule = tp.BP(sizes=[6, 6, 6], forward_optimizer=sgd(0.01))
    quiet_trainer(max_epochs=3).fit(rule, datamodule=tiny_data())
    assert rule.optimizers().param_groups[0]["lr"] == pytest.approx(0.002, rel=1e-12)


# --------------------------------------------------------------------------------------------
# (d) batch normalisation de-normalises propagated targets, not a gradient target
# --------------------------------------------------------------------------------------------


def test_gradient_target_under_batch_norm_is_not_de_normalised():
    """LeeDTP's ``h^_{L-1} = h_{L-1} - eta^ W_L^T D_{s_L} e_L`` in a batch-normalised net.

    ``a_L = W_L h~_{L-1}`` with ``h~ = (h - mu) / sigma`` (batch mean, biased variance, eps): the gradient is the one
    of the loss with respect to the input ``W_L`` multiplies, and it is added to the raw ``h_{L-1}`` as it is.
    """
    torch.manual_seed(4)
    eta, eps = 0.3, 1e-5
    rule = tp.LeeDTP(sizes=[5, 6, 7, 3], activation="tanh", output_activation="tanh", batch_norm=True, bn_eps=eps,
                     target_stepsize=eta, forward_optimizer=sgd(0.01), feedback_optimizer=sgd(0.01)).double()  # fmt: skip
    x, y = batch(5, 3, b=9)
    hs, targets = rule.compute_targets(x, y)

    h, stats = [np_(x)], []
    for Wi in (np_(w) for w in rule.forward_weights):
        mu, var = h[-1].mean(0), h[-1].var(0)  # numpy's var is the biased one (ddof=0)
        stats.append((mu, np.sqrt(var + eps)))
        h.append(np.tanh((h[-1] - mu) / np.sqrt(var + eps) @ Wi.T))
    for i in range(4):
        np.testing.assert_allclose(np_(hs[i]), h[i], rtol=1e-10, atol=1e-12, err_msg=f"h_{i}")
    mu2, sigma2 = stats[2]  # statistics of h_2, the input of layer 3
    assert np.abs(mu2).max() > 0.05 and np.abs(sigma2 - 1).max() > 0.05  # de-normalising would change the target
    W3 = np_(rule.forward_weights[2])
    e = h[3] - np_(y)
    expected = h[2] - eta * ((1 - h[3] ** 2) * e) @ W3
    np.testing.assert_allclose(np_(targets[1]), expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# (e) every DDP rank draws its own feedback noise
# --------------------------------------------------------------------------------------------


def _on_rank(rule, rank: int):
    rule.trainer = types.SimpleNamespace(global_rank=rank)  # what LightningModule.global_rank reads under DDP
    return rule


def _dtpai(seed: int = 0, rank: int = 0):
    torch.manual_seed(5)  # the same forward and (random, not yet trained) feedback weights for every rule built here
    rule = tp.DTPAI(sizes=[5, 6, 6, 4], activation="tanh", forward_optimizer=sgd(0.01), feedback_optimizer=sgd(0.01),
                    feedback_noise_std=0.7, feedback_init="random", feedback_seed=seed)  # fmt: skip
    return _on_rank(rule.double(), rank)


def test_feedback_noise_is_seeded_by_seed_plus_rank():
    draws = {r: _dtpai(seed=11, rank=r).noise((4, 6)) for r in (0, 1, 2)}
    for r, noise in draws.items():
        expected = torch.randn(4, 6, generator=torch.Generator().manual_seed(11 + r), dtype=torch.float64)
        torch.testing.assert_close(noise, expected, rtol=0, atol=0, msg=f"rank {r}")
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_feedback_updates_differ_between_ranks():
    """Two ranks with the same weights and batch compute different feedback gradients (their noise differs); rank 1 with
    seed s is rank 0 with seed s + 1."""
    x, _ = batch(5, 4, b=6)
    grads = {}
    for seed, rank in ((3, 0), (3, 1), (4, 0)):
        rule = _dtpai(seed, rank)
        hs, pre = rule.forward_pass(x, update_state=False)
        grads[seed, rank] = [g.detach().clone() for g in rule.feedback_grads(hs, pre).values()]
    assert len(grads[3, 0]) == 2
    for a, b in zip(grads[3, 0], grads[3, 1]):
        assert (a - b).abs().max() > 1e-3
    for a, b in zip(grads[3, 1], grads[4, 0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# (f) the regularised initialisation uses lambda / sigma^2
# --------------------------------------------------------------------------------------------


def _numpy_regularised_inverse(W: np.ndarray, gamma: float) -> np.ndarray:
    """``W^T (W W^T + gamma I)^{-1}``, theorem 4.7."""
    return W.T @ np.linalg.inv(W @ W.T + gamma * np.eye(W.shape[0]))


def test_regularised_feedback_init_divides_lambda_by_sigma_squared():
    lam, sigma = 0.3, 2.0
    rule = tp.TPAI(sizes=[5, 6, 4, 3], activation="tanh", forward_optimizer=sgd(0.01), feedback_optimizer=sgd(0.01),
                   feedback_weight_decay=lam, feedback_noise_std=sigma, feedback_init="regularised").double()  # fmt: skip
    rule.init_feedback_pinv()  # recomputed in float64 after .double()
    for Q, W in zip(rule.feedback_weights, rule.forward_weights[1:]):
        np.testing.assert_allclose(np_(Q), _numpy_regularised_inverse(np_(W), lam / sigma**2), rtol=1e-9, atol=1e-12)
    rule.load_forward_weights([torch.eye(6, 5, dtype=torch.float64), 3 * torch.eye(4, 6, dtype=torch.float64), torch.eye(3, 4, dtype=torch.float64)])
    # Q_1 = 3 / (9 + 0.3 / 4) on the diagonal of W_2^T's shape; Q_2 = 1 / (1 + 0.075)
    np.testing.assert_allclose(np_(rule.feedback_weights[0]), np.eye(6, 4) * 3 / 9.075, rtol=1e-12, atol=0)
    np.testing.assert_allclose(np_(rule.feedback_weights[1]), np.eye(4, 3) / 1.075, rtol=1e-12, atol=0)


def test_regularised_inverse_matches_numpy():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(4, 7, generator=g, dtype=torch.float64)
    for gamma in (0.0, 0.075, 2.5):
        expected = np.linalg.pinv(np_(W)) if gamma == 0 else _numpy_regularised_inverse(np_(W), gamma)
        np.testing.assert_allclose(np_(regularised_inverse(W, gamma)), expected, rtol=1e-9, atol=1e-12)
