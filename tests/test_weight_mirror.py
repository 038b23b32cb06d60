"""Weight mirrors (WM; Akrout et al. 2019, section 3): the mirror update of B checked against numpy written out by hand,
the paper's claim that B aligns with W^T on a linear layer, and the layers and arguments it refuses."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tplightning as tp
from tplightning._lightning import pl
from tplightning.blocks import Block
from tplightning.errors import ConfigError
from tplightning.layers import AuxiliaryDense, Conv2d, Dense
from tplightning.target_maps import WeightMirror


def _noise(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=g, dtype=torch.float64)


def _draws(seed, *shapes):
    """The standard normal draws ``_noise(seed)`` hands out, in order, as numpy arrays."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).numpy() for s in shapes]


def _conv_product(x, y, k, stride, pad):
    """sum_b sum_p y[b, o, p] x_pad[b, c, p * stride + u]: the kernel-shaped product of a convolution, by explicit loops."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((y.shape[1], x.shape[1], k, k))
    for o in range(y.shape[1]):
        for c in range(x.shape[1]):
            for u in range(k):
                for v in range(k):
                    for p in range(y.shape[2]):
                        for q in range(y.shape[3]):
                            out[o, c, u, v] += (y[:, o, p, q] * xp[:, c, p * stride + u, q * stride + v]).sum()
    return out


def _conv_np(x, W, stride, pad):
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = W.shape[-1]
    H, Wd = (xp.shape[2] - k) // stride + 1, (xp.shape[3] - k) // stride + 1
    y = np.zeros((x.shape[0], W.shape[0], H, Wd))
    for p in range(H):
        for q in range(Wd):
            patch = xp[:, :, p * stride:p * stride + k, q * stride:q * stride + k]
            y[:, :, p, q] = np.einsum("bcuv,ocuv->bo", patch, W)
    return y


def test_one_dense_mirror_step_equals_numpy():
    torch.manual_seed(3)
    upper = Dense(5, 3, activation="tanh", bias=True).double()  # bias and activation take no part in mirror mode
    g = WeightMirror().bind(1, Dense(4, 5).double(), upper)
    B0, W = g.B.numpy().copy(), upper.weight.detach().numpy()
    lr, sigma, decay, batch = 0.3, 0.7, 0.05, 8
    g.mirror_step(_noise(11), lr=lr, sigma=sigma, decay=decay, batch_size=batch)
    (z,) = _draws(11, (batch, 5))
    x = sigma * z
    y = x @ W.T  # y_b = W x_b
    expected = (1 - decay) * B0 + lr * sum(np.outer(x[b], y[b]) for b in range(batch)) / batch
    np.testing.assert_allclose(g.B.numpy(), expected, rtol=1e-12, atol=1e-14)


def test_one_conv_layer_mirror_step_equals_loops():
    """A convolutional layer with pooling: the mirror runs the convolution alone (stride 2, padding 1), B in the kernel's shape."""
    torch.manual_seed(4)
    upper = Conv2d((2, 6, 6), out_channels=3, kernel_size=3, stride=2, padding=1, pool=2, activation="relu").double()
    g = WeightMirror().bind(1, Dense(4, 72).double(), upper)
    B0, W = g.B.numpy().copy(), upper.weight.detach().numpy()
    lr, sigma, decay, batch = 0.02, 0.5, 0.1, 3
    g.mirror_step(_noise(5), lr=lr, sigma=sigma, decay=decay, batch_size=batch)
    (z,) = _draws(5, (batch, 2, 6, 6))
    x = sigma * z
    y = _conv_np(x, W, 2, 1)
    expected = (1 - decay) * B0 + lr * _conv_product(x, y, 3, 2, 1) / (batch * y.shape[2] * y.shape[3])  # mean over samples and positions
    np.testing.assert_allclose(g.B.numpy(), expected, rtol=1e-10, atol=1e-13)


def test_block_mirrors_each_weighted_submodule_with_its_own_input_shape():
    """conv -> ReLU -> max-pool -> flatten -> Linear: noise of each submodule's input shape through that submodule only,
    the conv first (module order), the Linear's B in W^T's shape."""
    torch.manual_seed(5)
    module = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=True), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    upper = Block(module.double(), input_shape=(1, 4, 4))
    g = WeightMirror().bind(1, Dense(3, 16).double(), upper)
    assert [tuple(B.shape) for B in g.feedback_tensors()] == [(2, 1, 3, 3), (8, 3)]
    B0 = [B.numpy().copy() for B in g.feedback_tensors()]
    Wc, Wl = module[0].weight.detach().numpy(), module[4].weight.detach().numpy()
    lr, sigma, decay, batch = 0.1, 0.4, 0.2, 5
    g.mirror_step(_noise(9), lr=lr, sigma=sigma, decay=decay, batch_size=batch)
    zc, zl = _draws(9, (batch, 1, 4, 4), (batch, 8))
    xc, xl = sigma * zc, sigma * zl
    expected_c = (1 - decay) * B0[0] + lr * _conv_product(xc, _conv_np(xc, Wc, 1, 1), 3, 1, 1) / (batch * 16)  # 4 x 4 positions
    expected_l = (1 - decay) * B0[1] + lr * (xl.T @ (xl @ Wl.T)) / batch
    np.testing.assert_allclose(g.feedback_tensors()[0].numpy(), expected_c, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g.feedback_tensors()[1].numpy(), expected_l, rtol=1e-10, atol=1e-13)


def _angle_deg(a, b):
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    return math.degrees(math.acos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)))


@pytest.mark.parametrize("decay", [None, 0.002])
def test_rule_feedback_aligns_with_the_transposed_weight_on_a_linear_layer(decay):
    """The paper's claim: after enough mirror steps B points along W^T (angle < 5 degrees) with a positive factor, which
    is eta_B sigma^2 / lambda (1 for the default decay). B starts random, at a wide angle."""
    torch.manual_seed(0)
    rule = tp.WM(sizes=[7, 5, 4], activation="linear", mirror_lr=0.05, mirror_noise_std=0.8, mirror_weight_decay=decay,
                 mirror_batch_size=32).double()
    W = rule.net.weights[1].detach().numpy()  # (4, 5), random, not the identity
    B = rule.feedback_weights[0]
    assert _angle_deg(B.numpy(), W.T) > 45
    rule.mirror(2000)
    Bn = B.numpy()
    assert _angle_deg(Bn, W.T) < 5
    factor = float((Bn * W.T).sum() / (W * W).sum())  # least-squares multiple of W^T
    expected = 1.0 if decay is None else 0.05 * 0.8**2 / decay
    assert factor > 0 and factor == pytest.approx(expected, rel=0.1)


def test_rule_mirrors_after_each_batch_and_before_the_first():
    """WM.training_step: mirror_initial_steps before the first batch, mirror_steps after every forward update; FA's
    update in between uses the B of before the batch's mirror steps."""
    torch.manual_seed(1)
    kw = {"sizes": [4, 5, 3], "activation": "tanh", "forward_optimizer": lambda p: torch.optim.SGD(p, lr=0.0), "lr_final_factor": 1.0}
    rule = tp.WM(**kw, mirror_initial_steps=3, mirror_steps=2, mirror_lr=0.2, mirror_noise_std=0.5)
    twin = tp.WM(**kw, mirror_initial_steps=3, mirror_steps=2, mirror_lr=0.2, mirror_noise_std=0.5)
    twin.load_state_dict(rule.state_dict())
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(rule, DataLoader(TensorDataset(x, y), batch_size=6))
    twin.mirror(3 + 2)  # lr 0: the forward weights did not move, so the mirror steps are the whole change of B
    for a, b in zip(rule.feedback_weights, twin.feedback_weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Scale(nn.Module):
    """A parameterised module that is neither a weight matrix nor a normalisation."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.s


def test_refuses_the_layers_it_cannot_serve():
    with pytest.raises(ConfigError, match="weight mirror .* needs a Dense or Conv2d layer or a block there, got AuxiliaryDense"):
        WeightMirror().bind(1, Dense(3, 4), AuxiliaryDense(4, 2, aux_units=2))
    with pytest.raises(ConfigError, match=r"WeightMirror cannot serve block .*: its module 1 \(_Scale\) has weights"):
        WeightMirror().bind(1, Dense(2, 3), Block(nn.Sequential(nn.Linear(3, 4), _Scale()), input_shape=(3,)))
    with pytest.raises(ConfigError, match="WeightMirror cannot serve block .*: the block has no Linear or convolution"):
        WeightMirror().bind(1, Dense(2, 3), Block(nn.Sequential(nn.Tanh()), input_shape=(3,)))


@pytest.mark.parametrize("kw, message", [
    ({"mirror_lr": 0.0}, "mirror_lr must be a number > 0, got 0.0"),
    ({"mirror_noise_std": -1.0}, "mirror_noise_std must be a number > 0, got -1.0"),
    ({"mirror_weight_decay": 1.0}, r"mirror_weight_decay must be a number in \[0, 1\) or null"),
    ({"mirror_lr": 2.0}, r"mirror_weight_decay = mirror_lr \* mirror_noise_std\*\*2 = 2 must be < 1"),
    ({"mirror_batch_size": 0}, "mirror_batch_size must be an integer >= 1, got 0"),
    ({"mirror_steps": -1}, "mirror_steps must be an integer >= 0, got -1"),
])
def test_refuses_bad_arguments(kw, message):
    with pytest.raises(ConfigError, match=message):
        tp.WM(sizes=[3, 4, 2], **kw)


def test_conv_feedback_tends_to_the_kernel_itself():
    """Without padding every output position sees every kernel offset: the mean over positions is sigma^2 W, so with the
    default decay the kernel-shaped B tends to W (angle and scale), not to W times the number of positions."""
    torch.manual_seed(2)
    upper = Conv2d((2, 6, 6), out_channels=3, kernel_size=3, activation="tanh").double()
    g = WeightMirror().bind(1, Dense(4, 72).double(), upper)
    W = upper.weight.detach().numpy()
    noise = _noise(0)
    for _ in range(600):
        g.mirror_step(noise, lr=0.05, sigma=1.0, decay=0.05, batch_size=16)
    B = g.B.numpy()
    assert _angle_deg(B, W) < 5
    assert float((B * W).sum() / (W * W).sum()) == pytest.approx(1.0, rel=0.1)


class _StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _wm():
    torch.manual_seed(0)
    return tp.WM(sizes=[6, 5, 4, 6], activation="tanh", mirror_initial_steps=4, mirror_steps=2, mirror_lr=0.2, mirror_noise_std=0.7,
                 forward_optimizer=lambda p: torch.optim.SGD(p, lr=0.05))  # fmt: skip


def test_resume_continues_the_mirror_noise_exactly(tmp_path):
    """1 epoch, checkpoint, 2 more epochs equals 3 epochs straight: B, the forward weights and the noise generator's state
    (the initial mirror steps are not repeated on resume)."""
    from conftest import quiet_trainer, tiny_data

    folder = tmp_path / "ckpt"
    quiet_trainer(max_epochs=3, enable_checkpointing=True, callbacks=[tp.Checkpoint(dirpath=folder, save_top_k=0), _StopAfterEpoch(0)]).fit(
        _wm(), datamodule=tiny_data(sizes=(6, 5, 4, 6)))  # fmt: skip
    resumed = tp.load(folder / "last.ckpt")
    quiet_trainer(max_epochs=3).fit(resumed, datamodule=tiny_data(sizes=(6, 5, 4, 6)), ckpt_path=folder / "last.ckpt")
    straight = _wm()
    quiet_trainer(max_epochs=3).fit(straight, datamodule=tiny_data(sizes=(6, 5, 4, 6)))
    sa, sb = resumed.state_dict(), straight.state_dict()
    assert sa.keys() == sb.keys() and any(k.endswith(".B") for k in sa)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    assert torch.equal(resumed.feedback_generator().get_state(), straight.feedback_generator().get_state())
