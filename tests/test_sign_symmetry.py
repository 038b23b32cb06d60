"""The feedback-alignment family beyond FA (issue 27, item 4): sign symmetry (uSF, frSF, brSF; Liao, Leibo & Poggio 2016)
and Kolen–Pollack feedback (KP; Akrout et al. 2019).

The references are independent of the library's maps: numpy forward passes and targets written out here, magnitudes
redrawn with plain ``torch.Generator``s, and the geometric law ``W - B^T <- (1 - eta lambda)(W - B^T)`` of KP computed from
the learning rate and the weight decay alone.
"""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

import tplightning as tp
from conftest import OneBatch, quiet_trainer, tiny_data
from tplightning._lightning import pl
from tplightning.errors import ConfigError
from tplightning.layers import AuxiliaryDense, Conv2d, Dense
from torch import nn
import torch.nn.functional as nnf


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


# ------------------------------------------------------------------------------------------------ blocks
def _step(h, h_next) -> tp.target_maps.Step:
    """The step a map bound at index 1 reads: ``hs = [h_0, h_1, h_2]`` (``h_0`` unused) and pre-activations (unused by blocks)."""
    return tp.target_maps.Step([torch.zeros(1), h, h_next], [h, h_next])


def test_fa_through_a_conv_tanh_maxpool_block_equals_the_hand_written_backward_with_b():
    """h^_i = h_i + J~^T v, J~^T written out: max-unpooling to the forward pass's argmax, tanh' at the true pre-activation,
    then the transposed convolution with B (not W)."""
    torch.manual_seed(6)
    lower = Conv2d((1, 6, 6), out_channels=2, kernel_size=3, padding=1)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    upper = tp.Block(nn.Sequential(conv, nn.Tanh(), nn.MaxPool2d(2)), input_shape=(2, 6, 6))
    g = tp.target_maps.FeedbackAlignment().bind(1, lower, upper)
    B = g.B_0
    assert B.shape == conv.weight.shape and not torch.allclose(B, conv.weight)
    h = torch.randn(4, 2, 6, 6)
    with torch.no_grad():
        a = nnf.conv2d(h, conv.weight, conv.bias, padding=1)
        t = torch.tanh(a)
        pooled, where = nnf.max_pool2d(t, 2, return_indices=True)
    v = torch.randn(4, 3, 3, 3)
    back = nnf.conv_transpose2d(nnf.max_unpool2d(v, where, 2, output_size=t.shape[2:]) * (1 - t**2), B, padding=1)
    got = g.target(pooled + v, _step(h, pooled))
    torch.testing.assert_close(got, h + back, rtol=1e-5, atol=1e-6)
    with_W = nnf.conv_transpose2d(nnf.max_unpool2d(v, where, 2, output_size=t.shape[2:]) * (1 - t**2), conv.weight.detach(), padding=1)
    assert (got - h - with_W).abs().max() > 1e-2  # B, not W, carried it back


def test_fa_and_usf_through_a_linear_tanh_block_equal_the_dense_layer_and_the_closed_form():
    torch.manual_seed(7)
    linear = nn.Linear(5, 4, bias=False)
    upper_block = tp.Block(nn.Sequential(linear, nn.Tanh()))
    upper_dense = Dense(5, 4, activation="tanh")
    with torch.no_grad():
        upper_dense.weight.copy_(linear.weight)
    lower = Dense(3, 5)
    h, v = torch.randn(6, 5), torch.randn(6, 4)
    t = torch.tanh(h @ linear.weight.detach().T)
    for map_class in (tp.target_maps.FeedbackAlignment, tp.target_maps.SignSymmetry):
        on_block, on_dense = map_class().bind(1, lower, upper_block), map_class().bind(1, lower, upper_dense)
        B = on_block.feedback_tensors()[0]  # (5, 4): W^T's shape
        if map_class is tp.target_maps.FeedbackAlignment:
            on_dense.B.copy_(B)
        else:  # uSF: c sign(W)^T, c = sqrt(2 / (5 + 4))
            np.testing.assert_allclose(np_(B), np.sqrt(2 / 9) * np.sign(np_(linear.weight)).T, rtol=1e-7)
        got = on_block.target(t + v, _step(h, t))
        torch.testing.assert_close(got, h + ((1 - t**2) * v) @ B.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, on_dense.target(t + v, tp.target_maps.Step([torch.zeros(1), h, t], [h, h @ linear.weight.detach().T])), rtol=1e-5, atol=1e-6)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 5, bias=False), nn.Tanh(), nn.Linear(5, 6, bias=False))


@pytest.mark.parametrize("name", ["FA", "DFA", "USF", "FRSF", "KP"])
def test_a_converted_linear_tanh_model_trains_as_the_dense_network(name):
    """Same forward weights and feedback weights: two epochs of the rule on blocks and on Dense layers agree to 1e-6."""
    cls = getattr(tp, name)
    torch.manual_seed(8)
    kw = {"activation": "tanh", "forward_optimizer": sgd(0.05, 0.01 if name == "KP" else 0.0)}
    on_blocks = cls(network=_mlp(), **kw)
    dense = cls(sizes=[6, 5, 5, 6], **kw)
    with torch.no_grad():
        for W, w in zip(dense.forward_weights, on_blocks.forward_weights):
            W.copy_(w)
        for m, m_blocks in zip(dense.maps, on_blocks.maps):
            for name_, t in m_blocks.named_buffers():
                getattr(m, name_.replace("_0", "")).copy_(t)
            for name_, t in m_blocks.named_parameters():
                getattr(m, name_.replace("_0", "")).copy_(t)
    for rule in (on_blocks, dense):
        quiet_trainer(max_epochs=2).fit(rule, datamodule=tiny_data(sizes=(6, 5, 5, 6)))
    for W, w in zip(dense.forward_weights, on_blocks.forward_weights):
        torch.testing.assert_close(w, W, rtol=1e-5, atol=1e-6)
    for B, b in zip(dense.feedback_weights, on_blocks.feedback_weights):
        torch.testing.assert_close(b, B, rtol=1e-5, atol=1e-6)
    assert not torch.equal(on_blocks.forward_weights[0], _mlp()[0].weight)


def _cnn() -> nn.Sequential:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(27, 3))  # fmt: skip


def test_kp_on_a_converted_cnn_mirrors_every_weighted_submodule():
    torch.manual_seed(9)
    lr, wd, steps = 0.05, 0.4, 10
    rule = tp.KP(network=_cnn(), forward_optimizer=sgd(lr, wd), lr_final_factor=1.0).double()
    assert [tuple(B.shape) for B in rule.feedback_parameters()] == [(3, 2, 3, 3), (27, 3)]
    owners = [rule.net.layers[1].module[0], rule.net.layers[2].module[0]]  # block 2: Conv2d(2, 3); block 3: Linear

    def gaps():
        return [float((B.detach() - transposed(m)).norm()) for B, m in zip(rule.feedback_parameters(), owners)]

    def transposed(m):
        return m.weight.detach().T if isinstance(m, nn.Linear) else m.weight.detach()

    start = gaps()
    x, y = torch.randn(10, 64, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    quiet_trainer(max_epochs=steps).fit(rule, datamodule=OneBatch(x, y))
    for got, s in zip(gaps(), start):
        assert got == pytest.approx(s * (1 - lr * wd) ** steps, rel=1e-6)


def test_dfa_on_a_converted_cnn_sends_the_output_error_to_each_block():
    torch.manual_seed(10)
    rule = tp.DFA(network=_cnn(), forward_optimizer=sgd(0.05))
    assert [tuple(B.shape) for B in rule.feedback_weights] == [(2 * 64, 3), (27, 3)]
    x, y = torch.randn(5, 64), torch.randn(5, 3)
    hs, targets = rule.compute_targets(x, y)
    e = targets[-1] - hs[-1]  # h^_L - h_L (a linear output block: D_s_L = I)
    for i, B in enumerate(rule.feedback_weights, start=1):
        torch.testing.assert_close(targets[i - 1], hs[i] + (e @ B.T).reshape(hs[i].shape))
    quiet_trainer(max_epochs=2).fit(rule, datamodule=OneBatch(x, y))
    assert all(torch.isfinite(W).all() for W in rule.forward_weights)


def test_brsf_on_blocks_redraws_every_submodules_magnitudes():
    torch.manual_seed(11)
    rule = tp.BRSF(network=_cnn(), forward_optimizer=sgd(0.05), feedback_seed=3)
    before = [R.clone() for m in rule.maps for R in m.magnitudes()]
    rule.redraw_feedback()
    g = torch.Generator().manual_seed(3)
    bounds = [(6 / ((3 + 2) * 9)) ** 0.5, (6 / 30) ** 0.5]
    expected = [b * torch.rand(shape, generator=g) for b, shape in zip(bounds, [(3, 2, 3, 3), (27, 3)])]
    got = [R for m in rule.maps for R in m.magnitudes()]
    assert all(torch.equal(r, e) for r, e in zip(got, expected)) and not torch.equal(got[0], before[0])
    conv = rule.net.layers[1].module[0]
    assert torch.equal(rule.feedback_weights[0], got[0] * torch.sign(conv.weight.detach()))


def test_blocks_the_family_cannot_serve_are_refused_naming_them():
    with pytest.raises(ConfigError, match=r"^BDFA's second phase .* cannot serve layer 2 \(block \(Linear\(.*\) -> Tanh\)\): use FA, DFA"):
        tp.BDFA(network=[Dense(6, 5, activation="tanh"), tp.Block(nn.Sequential(nn.Linear(5, 5), nn.Tanh())), Dense(5, 6, activation="linear")])
    with pytest.raises(ConfigError, match=r"^FeedbackAlignment cannot serve block \(ConvTranspose2d.* -> Tanh\): its module 0 \(ConvTranspose2d\)"):
        tp.FA(network=[Conv2d((1, 4, 4), 2, kernel_size=3), tp.Block(nn.Sequential(nn.ConvTranspose2d(2, 1, 3), nn.Tanh()), input_shape=(2, 2, 2)),
                       Dense(16, 3, activation="linear")])  # fmt: skip
    with pytest.raises(ConfigError, match=r"^DFA sends the output layer's pre-activation error .* ends with Tanh\(\)"):
        tp.DFA(network=nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6), nn.Tanh()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["BRSF", "KP", "WM"])
def test_ddp_replicas_stay_identical(name, tmp_path):
    """brSF's magnitudes and WM's mirror noise come from one seed on every rank and KP's B take the all-reduced gradient:
    replicas agree."""
    from conftest import fit_ddp_replicas, make_rule, weights_of

    extra = {"forward_optimizer": sgd(0.01, 0.1)} if name == "KP" else {}
    rank0, rank1 = fit_ddp_replicas(make_rule(name, sizes=(6, 6, 6, 6), **extra), tiny_data(sizes=(6, 6, 6, 6)), tmp_path, max_epochs=2)
    for a, b in zip(rank0, rank1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    initial = weights_of(make_rule(name, sizes=(6, 6, 6, 6), **extra))
    assert any(not torch.equal(a, b) for a, b in zip(rank0, initial) if a.shape == b.shape)


def test_kp_started_at_the_transposed_weights_trains_a_relu_maxpool_cnn_exactly_as_backprop():
    """With B_k = W_k^T at the start, KP's shared update (and the shared weight decay) keeps B = W^T, and FA's target
    through each block with B in the backward pass is then backprop's gradient: KP and BP (autograd on the plain model)
    take the same steps, biases, momentum and weight decay included."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Unflatten(1, (1, 12, 12)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(24, 16), nn.ReLU(),
                          nn.Linear(16, 5)).double()  # fmt: skip
    opt = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-3)
    kp = tp.KP(network=copy.deepcopy(model), loss="cross_entropy", lr_final_factor=1.0, forward_optimizer=opt).double()
    bp = tp.BP(network=copy.deepcopy(model), loss="cross_entropy", lr_final_factor=1.0, forward_optimizer=opt).double()
    with torch.no_grad():
        for m in kp.maps:
            for k, (name, _, _) in enumerate(m._slots):
                W = m.upper.module.get_submodule(name).weight
                m.slot_feedback(k).copy_(W.T if W.dim() == 2 else W)
    x, y = torch.randn(64, 144, dtype=torch.float64), torch.randint(0, 5, (64,))

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)

    for rule in (kp, bp):
        quiet_trainer(max_epochs=5).fit(rule, datamodule=Data())
    for a, b, start in zip(kp.net.parameters(), bp.net.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(a, start)


@pytest.mark.parametrize("name", ["FA", "BRSF", "KP"])
def test_a_converted_model_under_the_family_round_trips_through_a_checkpoint(name, tmp_path):
    torch.manual_seed(13)
    rule = getattr(tp, name)(network=_cnn(), forward_optimizer=sgd(0.01, 0.01))
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(rule, datamodule=OneBatch(torch.randn(8, 64), torch.randn(8, 3)))
    trainer.save_checkpoint(tmp_path / "rule.ckpt")
    loaded = tp.load(tmp_path / "rule.ckpt")
    sa, sb = loaded.state_dict(), rule.state_dict()
    assert sa.keys() == sb.keys() and any(".B_0" in k or ".R_0" in k for k in sa)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded(x), rule(x))
