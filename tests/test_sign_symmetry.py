"""The feedback-alignment family beyond FA (issue 27, item 4): sign symmetry (uSF, frSF, brSF; Liao, Leibo & Poggio 2016)
and Kolen–Pollack feedback (KP; Akrout et al. 2019).

The references are independent of the library's maps: numpy forward passes and targets written out here, magnitudes
redrawn with plain ``torch.Generator``s, and the geometric law ``W - B^T <- (1 - eta lambda)(W - B^T)`` of KP computed from
the learning rate and the weight decay alone.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import tplightning as tp
from conftest import OneBatch, quiet_trainer, tiny_data
from tplightning._lightning import pl
from tplightning.errors import ConfigError
from tplightning.layers import AuxiliaryDense, Conv2d, Dense


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def sgd(lr: float, weight_decay: float = 0.0):
    return functools.partial(torch.optim.SGD, lr=lr, weight_decay=weight_decay)


# ------------------------------------------------------------------------------------------------ uSF
def test_usf_targets_and_step_equal_the_closed_form_with_sign_feedback():
    """4-5-3-2, tanh everywhere (a nonlinear output), mse, eta^ = 1: h^_L = y, then
    h^_i = h_i + c_i sign(W_{i+1})^T ((1 - h_{i+1}^2) * (h^_{i+1} - h_{i+1})) with c_i = sqrt(2 / (n_i + n_{i+1})), and each
    W_i takes -lr mean_b ((1 - h_i^2) * (h_i - h^_i)) h_{i-1}^T."""
    torch.manual_seed(3)
    lr = 0.1
    rule = tp.USF(sizes=[4, 5, 3, 2], activation="tanh", output_activation="tanh", forward_optimizer=sgd(lr), lr_final_factor=1.0).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    Ws = [np_(W) for W in rule.forward_weights]
    hs = [np_(x)]
    for W in Ws:
        hs.append(np.tanh(hs[-1] @ W.T))
    c = {1: 0.5, 2: np.sqrt(2 / 5)}  # W_2 is 3x5, W_3 is 2x3
    targets = {3: np_(y)}
    for i in (2, 1):
        delta = (1 - hs[i + 1] ** 2) * (targets[i + 1] - hs[i + 1])
        targets[i] = hs[i] + delta @ (c[i] * np.sign(Ws[i]))  # rows: (B_i delta)^T = delta^T B_i^T, B_i^T = c sign(W_{i+1})
    _, got = rule.compute_targets(x, y)
    for i in (1, 2, 3):
        np.testing.assert_allclose(np_(got[i - 1]), targets[i], rtol=1e-12, atol=1e-12)
    expected = [W - lr * ((1 - hs[i] ** 2) * (hs[i] - targets[i])).T @ hs[i - 1] / 7 for i, W in enumerate(Ws, start=1)]
    quiet_trainer().fit(rule, datamodule=OneBatch(x, y))
    for W, want in zip(rule.forward_weights, expected):
        np.testing.assert_allclose(np_(W), want, rtol=1e-12, atol=1e-12)
    # not FA's step in disguise: with the true W_{i+1}^T (backprop) layer 1's target differs
    bp_delta = (1 - hs[2] ** 2) * (((1 - hs[3] ** 2) * (targets[3] - hs[3])) @ Ws[2])
    assert np.abs(hs[1] + bp_delta @ Ws[1] - targets[1]).max() > 1e-3


def test_usf_feedback_follows_the_forward_signs_on_a_convolution():
    conv = Conv2d((1, 6, 6), out_channels=2, kernel_size=3, pool=2)
    g = tp.target_maps.SignSymmetry().bind(1, Dense(36, 36), conv)
    with torch.no_grad():
        conv.weight.neg_()
    c = (2 / ((2 + 1) * 9)) ** 0.5  # (C_out + C_in) k^2 = 27
    assert torch.equal(g.B, c * torch.sign(conv.weight.detach()))
    assert g.B.shape == conv.weight.shape


def test_an_unknown_magnitude_is_a_short_error():
    with pytest.raises(ConfigError, match="^magnitude must be one of 'uniform', 'fixed', 'batch', got 'random'$"):
        tp.target_maps.SignSymmetry("random")


# ------------------------------------------------------------------------------------------------ frSF
def test_frsf_magnitudes_stay_fixed_while_the_signs_follow_the_weights():
    torch.manual_seed(1)
    rule = tp.FRSF(sizes=[6, 6, 6, 6], forward_optimizer=sgd(0.1))  # some weights change sign
    R = [m.R.clone() for m in rule.maps]
    a = [(6 / 12) ** 0.5] * 2
    assert all(bool((r >= 0).all() and (r < bound).all()) for r, bound in zip(R, a))
    W0 = [W.detach().clone() for W in rule.forward_weights]
    quiet_trainer(max_epochs=3).fit(rule, datamodule=tiny_data(sizes=(6, 6, 6, 6)))
    flipped = sum(int((torch.sign(W) != torch.sign(w0)).sum()) for W, w0 in zip(rule.forward_weights[1:], W0[1:]))
    assert flipped > 0
    for m, r, W in zip(rule.maps, R, rule.forward_weights[1:]):
        assert torch.equal(m.R, r)
        assert torch.equal(m.B, r * torch.sign(W.detach()).T)


# ------------------------------------------------------------------------------------------------ brSF
class RecordMagnitudes(pl.Callback):
    def __init__(self):
        self.seen: list[list[torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append([m.R.clone() for m in pl_module.maps])


def _brsf(seed: int = 5) -> tp.BRSF:
    torch.manual_seed(2)
    return tp.BRSF(sizes=[6, 5, 4, 6], forward_optimizer=sgd(0.05), feedback_seed=seed)


def test_brsf_redraws_the_magnitudes_for_every_batch_from_its_seed():
    rule, record = _brsf(), RecordMagnitudes()
    first = [m.R.clone() for m in rule.maps]
    quiet_trainer(max_epochs=2, callbacks=[record]).fit(rule, datamodule=tiny_data(sizes=(6, 5, 4, 6)))
    assert len(record.seen) == 16
    g = torch.Generator().manual_seed(5)
    bounds = [(6 / 9) ** 0.5, (6 / 10) ** 0.5]  # B_1 ~ W_2 (4x5), B_2 ~ W_3 (6x4)
    expected = [first] + [[b * torch.rand(shape, generator=g) for b, shape in zip(bounds, [(5, 4), (4, 6)])] for _ in range(15)]
    for k, (got, want) in enumerate(zip(record.seen, expected)):
        for r, w in zip(got, want):
            torch.testing.assert_close(r, w, rtol=0, atol=0, msg=f"batch {k}")
    assert not torch.equal(record.seen[1][0], record.seen[2][0])
    for m, W in zip(rule.maps, rule.forward_weights[1:]):
        assert torch.equal(m.B, m.R * torch.sign(W.detach()).T)


def test_brsf_is_reproducible_from_its_seed_and_differs_across_seeds():
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        rule = _brsf(seed)
        quiet_trainer(max_epochs=1).fit(rule, datamodule=tiny_data(sizes=(6, 5, 4, 6)))
        runs[name] = [W.detach().clone() for W in rule.forward_weights]
    assert all(torch.equal(p, q) for p, q in zip(runs["a"], runs["b"]))
    assert not all(torch.equal(p, q) for p, q in zip(runs["a"], runs["c"]))


class StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_brsf_resume_continues_the_magnitudes_exactly(tmp_path):
    folder = tmp_path / "ckpt"
    quiet_trainer(max_epochs=3, enable_checkpointing=True, callbacks=[tp.Checkpoint(dirpath=folder, save_top_k=0), StopAfterEpoch(0)]).fit(
        _brsf(), datamodule=tiny_data(sizes=(6, 5, 4, 6)))  # fmt: skip
    resumed, record_resumed = tp.load(folder / "last.ckpt"), RecordMagnitudes()
    quiet_trainer(max_epochs=3, callbacks=[record_resumed]).fit(resumed, datamodule=tiny_data(sizes=(6, 5, 4, 6)), ckpt_path=folder / "last.ckpt")
    straight, record = _brsf(), RecordMagnitudes()
    quiet_trainer(max_epochs=3, callbacks=[record]).fit(straight, datamodule=tiny_data(sizes=(6, 5, 4, 6)))
    assert len(record_resumed.seen) == 16 and len(record.seen) == 24
    for got, want in zip(record_resumed.seen, record.seen[8:]):
        assert all(torch.equal(r, w) for r, w in zip(got, want))
    sa, sb = resumed.state_dict(), straight.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------------------------------ KP
class Batches(pl.LightningDataModule):
    """``8 * batches`` fixed float64 samples in batches of 8, unshuffled, targets from a fixed tanh teacher."""

    def __init__(self, n_in: int, n_out: int, batches: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(8 * batches, n_in, generator=g, dtype=torch.float64)
        self.y = torch.tanh(self.x @ torch.randn(n_in, n_out, generator=g, dtype=torch.float64))

    def train_dataloader(self):
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)


def _kp_distance(rule) -> list[float]:
    return [float((m.B.detach() - m.upper.adjoint()).norm()) for m in rule.maps]


@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_kp_feedback_converges_to_the_transposed_weight_at_the_rate_of_the_weight_decay(weight_decay):
    """Akrout et al. 2019, eqs. 16-17: with SGD, ``W - B^T`` shrinks by ``1 - lr * weight_decay`` at every step whatever the
    data, so ``B_1 -> W_2^T`` on the linear output layer; without weight decay the difference stays as it started."""
    torch.manual_seed(4)
    lr, steps = 0.2, 10 * 100
    rule = tp.KP(sizes=[6, 5, 6], activation="tanh", forward_optimizer=sgd(lr, weight_decay), lr_final_factor=1.0).double()
    start = _kp_distance(rule)[0]
    W_start = rule.forward_weights[1].detach().clone()
    quiet_trainer(max_epochs=10).fit(rule, datamodule=Batches(6, 6, batches=100))
    assert rule.batches_seen == steps
    assert not torch.allclose(rule.forward_weights[1], W_start, atol=1e-3)  # W moved: B followed it
    got = _kp_distance(rule)[0]
    assert got == pytest.approx(start * (1 - lr * weight_decay) ** steps, rel=1e-6)
    if weight_decay:
        W = rule.forward_weights[1].detach()
        assert float((rule.maps[0].B.detach() - W.T).norm() / W.norm()) < 1e-2
        assert start / W.norm() > 0.5  # it started far from W^T


def test_kp_on_a_convolution_keeps_the_kernel_shape_and_the_law():
    torch.manual_seed(5)
    lr, wd, steps = 0.05, 0.4, 12
    net = [Conv2d((1, 8, 8), out_channels=3, kernel_size=3), Conv2d((3, 6, 6), out_channels=2, kernel_size=3, pool=2),
           Dense(8, 3, activation="linear")]  # fmt: skip
    rule = tp.KP(network=net, forward_optimizer=sgd(lr, wd), lr_final_factor=1.0).double()
    assert [tuple(B.shape) for B in rule.feedback_parameters()] == [(2, 3, 3, 3), (8, 3)]
    start = _kp_distance(rule)
    x, y = torch.randn(10, 64, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    quiet_trainer(max_epochs=steps).fit(rule, datamodule=OneBatch(x, y))
    assert [tuple(B.shape) for B in rule.feedback_parameters()] == [(2, 3, 3, 3), (8, 3)]
    for got, s in zip(_kp_distance(rule), start):
        assert got == pytest.approx(s * (1 - lr * wd) ** steps, rel=1e-6)


def test_kp_mirrors_only_trained_layers_and_refuses_an_auxiliary_layer():
    rule = tp.KP(sizes=[4, 5, 5, 3], train_layers=[1, 3])
    assert [tuple(B.shape) for B in rule.feedback_parameters()] == [(5, 3)]  # B_2 ~ W_3; W_2 is not trained
    net = [Dense(4, 5), AuxiliaryDense(5, 3, aux_units=2, activation="linear")]
    with pytest.raises(ConfigError, match="^Kolen-Pollack feedback mirrors the update of layer 2's whole weight: it needs a Dense or "
                                          "Conv2d layer or a block there, got AuxiliaryDense$"):  # fmt: skip
        tp.KP(network=net)
