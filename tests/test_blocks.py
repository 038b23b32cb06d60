"""Blocks (issue 27, items 1-2): any nn.Module as a target-propagation layer. Expectations come from plain torch
(autograd on a copy of the module, hand-written batch norm), literal shapes, or the module's own forward pass."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tplightning as tp
from tplightning.blocks import AutoFeedback, Block, convert
from tplightning.errors import ConfigError
from tplightning.target_maps import OriginalInverse, Step

from conftest import quiet_trainer

SGD = functools.partial(torch.optim.SGD, lr=0.05)


def identity_below(shape) -> Block:
    """A stand-in layer ``f_i`` whose output space is ``shape`` (linear trailing activation)."""
    return Block(nn.Identity(), input_shape=shape)


# ------------------------------------------------------------------------------------------------ the local gradient
def test_local_grads_are_autograd_of_the_local_loss_on_a_plain_copy():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ELU(), nn.AvgPool2d(2))
    block = Block(module, input_shape=(2, 6, 6))
    plain = copy.deepcopy(module)
    x, h_hat = torch.randn(5, 2, 6, 6), torch.randn(5, 3, 3, 3)
    with torch.no_grad():
        a, h = block.forward_pre(x)
    grads = block.local_grads(x, a, h, h_hat)
    loss = 0.5 * (plain(x) - h_hat).pow(2).sum() / 5
    expected = torch.autograd.grad(loss, list(plain.parameters()))
    assert len(grads) == 4  # conv weight and bias, batch-norm scale and shift
    for (p, g), e in zip(grads.items(), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_local_grads_replay_the_forward_pass_dropout_mask():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5))
    block, plain = Block(module), copy.deepcopy(module)
    x, h_hat = torch.randn(4, 6), torch.randn(4, 8)
    torch.manual_seed(7)
    with torch.no_grad():
        a, h = block.forward_pre(x)
    torch.randn(100)  # the generator moves on before the update (other layers, noise)
    grads = block.local_grads(x, a, h, h_hat)
    torch.manual_seed(7)
    out = plain(x)  # the same mask: the same generator state
    assert torch.equal(out, h) and bool((h == 0).any())
    expected = torch.autograd.grad(0.5 * (out - h_hat).pow(2).sum() / 4, list(plain.parameters()))
    for g, e in zip(grads.values(), expected):
        torch.testing.assert_close(g, e)


def test_vjp_with_other_weights_is_the_transposed_jacobian_of_that_module():
    torch.manual_seed(0)
    block = Block(nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh()))
    B = torch.randn(4, 3)
    h, v = torch.randn(2, 3), torch.randn(2, 4)
    got = block.vjp(h, v, weights={"0.weight": B})
    expected = (v * (1 - torch.tanh(h @ B.T) ** 2)) @ B  # J^T v of tanh(B h), by hand
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------------------------ automatic feedback
FEEDBACK_CASES = {
    "linear": (nn.Sequential(nn.Linear(6, 4), nn.Tanh()), (6,), (4,), ["Linear"]),
    "conv_stride1_pad": (nn.Conv2d(2, 3, 3, padding=1), (2, 7, 7), (3, 7, 7), ["ConvTranspose2d"]),
    "conv_stride2_pad": (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 8, 8), (3, 4, 4), ["ConvTranspose2d"]),
    "conv_stride2_odd": (nn.Conv2d(2, 3, 4, stride=2, padding=1), (2, 9, 9), (3, 4, 4), ["ConvTranspose2d"]),
    "conv_maxpool": (nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.Tanh(), nn.MaxPool2d(2)), (1, 10, 10), (4, 5, 5),
                     ["Upsample", "ConvTranspose2d"]),
    "conv_bn_relu_avgpool": (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2)),
                             (2, 7, 7), (4, 3, 3), ["Upsample", "ConvTranspose2d"]),
}


@pytest.mark.parametrize("case", list(FEEDBACK_CASES))
def test_auto_feedback_maps_the_output_shape_back_to_the_input_shape(case):
    module, in_shape, out_shape, kinds = FEEDBACK_CASES[case]
    block = Block(module, input_shape=in_shape)
    G = block.make_feedback()
    assert block.out_shape == out_shape
    assert [type(m).__name__ for m in G] == kinds
    assert tuple(G(torch.zeros(3, *out_shape)).shape) == (3, *in_shape)
    assert all(not m.bias for m in G if isinstance(m, (nn.Linear, nn.ConvTranspose2d)))


@pytest.mark.parametrize("case", list(FEEDBACK_CASES))
def test_auto_feedback_reconstruction_loss_decreases(case):
    """Alg. A.9's loss ``mean_b 1/2 ||G(f(h)) - h||^2`` (computed here by hand) falls under the map's own gradients, which
    equal autograd of that loss."""
    torch.manual_seed(0)
    module, in_shape, _, _ = FEEDBACK_CASES[case]
    block = Block(module, input_shape=in_shape)
    g = OriginalInverse(noise_std=0.0, init="random").bind(1, identity_below(in_shape), block)
    G = g.feedback_module
    h = torch.randn(16, *in_shape)
    with torch.no_grad():
        h_next = block(h)

    def loss() -> torch.Tensor:
        return 0.5 * (G(h_next) - h).pow(2).sum() / 16

    first = loss()
    expected = torch.autograd.grad(first, list(G.parameters()))
    losses, opt = [first.item()], torch.optim.Adam(G.parameters(), lr=0.02)  # Adam: one step size for every case's scale
    for step in range(20):
        with torch.no_grad():
            grads = g.feedback_grads(Step([h, h, h_next], [h, h_next]), noise=None)
        if step == 0:
            for (p, got), e in zip(grads.items(), expected):
                torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-6)
        for p, grad in grads.items():
            p.grad = grad
        opt.step()
        losses.append(loss().item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_pinv_init_sets_the_pseudo_inverse_and_the_adjoint():
    torch.manual_seed(0)
    dense = Block(nn.Sequential(nn.Linear(5, 3), nn.Tanh()))
    G = dense.make_feedback()
    dense.init_feedback(G)
    torch.testing.assert_close(G[0].weight, torch.linalg.pinv(dense.module[0].weight.detach()), rtol=1e-4, atol=1e-5)
    conv = Block(nn.Conv2d(2, 3, 3), input_shape=(2, 5, 5))
    Gc = conv.make_feedback()
    conv.init_feedback(Gc)
    assert torch.equal(Gc[0].weight, conv.module.weight.detach())


def test_a_given_feedback_module_is_used_and_checked():
    fb = nn.Sequential(nn.Linear(4, 6))
    block = Block(nn.Sequential(nn.Linear(6, 4), nn.Tanh()), feedback=fb)
    assert block.make_feedback() is fb and not isinstance(fb, AutoFeedback)
    with pytest.raises(ConfigError, match=r"feedback module of block .* maps its output shape \(4,\) to \(5,\), expected the block's input shape \(6,\)"):
        Block(nn.Linear(6, 4), feedback=nn.Linear(4, 5))


def test_a_module_without_an_automatic_feedback_asks_for_one():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)

        def forward(self, x):
            return x + torch.tanh(self.body(x))

    block = Block(Residual(), input_shape=(4,))
    with pytest.raises(ConfigError, match=r"module Residual \(Residual\) has no automatic feedback module.*give the block a feedback= module"):
        block.make_feedback()


# ------------------------------------------------------------------------------------------------ batch norm
def test_batch_norm_statistics_move_once_per_batch_and_eval_uses_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    conv0 = copy.deepcopy(model[0])
    rule = tp.LDRL(network=convert(model, input_shape=(1, 4, 4)), loss="cross_entropy", forward_optimizer=SGD,
                   feedback_optimizer=SGD, feedback_iterations=3)  # fmt: skip
    x, y = torch.randn(24, 1, 4, 4), torch.randint(0, 3, (24,))
    quiet_trainer(max_steps=3).fit(rule, DataLoader(TensorDataset(x, y), batch_size=8))
    bn = model[1]
    assert int(bn.num_batches_tracked) == 3
    # the statistics the first batch left (momentum 0.1), through the convolution as it was then
    # after three batches: the running mean is 0.1 * sum_k 0.9^(3-k) mean_k over batches whose convolution moved,
    # so check the first batch alone on a fresh rule
    torch.manual_seed(0)
    model1 = nn.Sequential(copy.deepcopy(conv0), nn.BatchNorm2d(2), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    rule1 = tp.LDRL(network=convert(model1, input_shape=(1, 4, 4)), loss="cross_entropy", forward_optimizer=SGD,
                    feedback_optimizer=SGD, feedback_iterations=3)  # fmt: skip
    quiet_trainer(max_steps=1).fit(rule1, DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8))
    with torch.no_grad():
        c = conv0(x[:8])
        mean, var = c.mean((0, 2, 3)), c.var((0, 2, 3), unbiased=True)
    bn1 = model1[1]
    assert int(bn1.num_batches_tracked) == 1
    torch.testing.assert_close(bn1.running_mean, 0.1 * mean)
    torch.testing.assert_close(bn1.running_var, 0.9 + 0.1 * var)
    rule1.eval()
    with torch.no_grad():
        c = model1[0](x[:4])
        z = (c - bn1.running_mean[:, None, None]) / torch.sqrt(bn1.running_var[:, None, None] + bn1.eps)
        z = z * bn1.weight[:, None, None] + bn1.bias[:, None, None]
        expected = model1[5](torch.nn.functional.avg_pool2d(torch.relu(z), 2).flatten(1))
        assert torch.allclose(rule1(x[:4]), expected, atol=1e-6)
        assert int(bn1.num_batches_tracked) == 1  # evaluation leaves them


# ------------------------------------------------------------------------------------------------ refusals
def test_what_a_block_does_not_have_is_refused_naming_it():
    block = Block(nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
    for method, args in (("linear_out", (torch.zeros(1, 3),)), ("pre_output", (torch.zeros(1, 3),)), ("feedback_shape", ()),
                         ("adjoint", ()), ("derivative", (torch.zeros(1, 3),))):  # fmt: skip
        with pytest.raises(ConfigError, match=r"block \(Linear\(in_features=3, out_features=3, bias=True\) -> Tanh\) has no"):
            getattr(block, method)(*args)


@pytest.mark.parametrize("rule, match", [
    (tp.TPEI, r"layer 2 is a block \(Linear\(in_features=5, out_features=5, bias=True\) -> Tanh\): an exact inverse of it is not available"),
    (tp.DTPAI, r"layer 2 is a block \(Linear\(in_features=5, out_features=5, bias=True\) -> Tanh\): ThesisInverse's g_1\(h\) = M s\^-1\(h\) needs"),
    (tp.MTP, r"modified rules \(D\^-1\) need dense layers, got layer 1, a block \(Linear"),
])
def test_rules_that_need_matrices_refuse_a_block_naming_it(rule, match):
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh())
    with pytest.raises(ConfigError, match=match):
        rule(network=convert(model))


def test_ddtp_pinv_init_on_a_conv_block_names_it():
    """``pinv`` multiplies the weight matrices of the layers above a hidden layer; a convolution block has none."""
    model = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3), nn.Tanh(),
                          nn.Flatten(), nn.Linear(8, 2))  # fmt: skip
    with pytest.raises(ConfigError, match=r"block \(Conv2d\(2, 2, kernel_size=\(3, 3\), stride=\(1, 1\)\) -> Tanh -> Flatten\) is not one Linear"):
        tp.DDTPLinear(network=convert(model), feedback_optimizer=SGD)
    assert tp.DDTPLinear(network=convert(model), feedback_optimizer=SGD, feedback_init="random").num_layers == 3
