"""Layers (tplightning/layers.py) against torch's own modules and autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf

import tplightning as tp
from tplightning.layers import AuxiliaryDense, Conv2d, Dense, Network, build_layer, build_network


def _local_loss_grads(layer, h_prev, h_hat, forward):
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    loss = 0.5 * (forward(h_prev, *ref) - h_hat).pow(2).sum() / h_prev.shape[0]
    return dict(zip(params, torch.autograd.grad(loss, ref)))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["tanh", "leaky_relu", "linear"])
def test_dense_local_grads_are_autograd_of_the_local_loss(activation, bias):
    torch.manual_seed(0)
    layer = Dense(7, 5, activation, bias=bias)
    h_prev, h_hat = torch.randn(9, 7), torch.randn(9, 5)
    s = {"tanh": torch.tanh, "leaky_relu": lambda a: nnf.leaky_relu(a, 0.35), "linear": lambda a: a}[activation]
    expected = _local_loss_grads(layer, h_prev, h_hat, lambda h, W, b=None: s(nnf.linear(h, W, b)))
    a, h = layer.forward_pre(h_prev)
    got = layer.local_grads(h_prev, a, h, h_hat)
    for p, g in expected.items():
        torch.testing.assert_close(got[p], g)


@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1, pool=2), dict(kernel_size=5, stride=2, padding=2), dict(kernel_size=3, pool=3)])
def test_conv_layer_is_torch_conv_then_pool_and_its_grads_are_autograd(geometry):
    torch.manual_seed(0)
    layer = Conv2d([3, 11, 11], 4, activation="tanh", **geometry)
    x = torch.randn(6, 3 * 11 * 11)  # flat inputs are reshaped to input_shape
    pool = geometry.get("pool", 1)

    def reference(h, W, b):  # pool(s(conv)): max-pooling commutes with the monotone activation
        out = torch.tanh(nnf.conv2d(h.reshape(-1, 3, 11, 11), W, b, geometry.get("stride", 1), geometry.get("padding", 0)))
        return nnf.max_pool2d(out, pool) if pool > 1 else out

    a, h = layer.forward_pre(x)
    torch.testing.assert_close(h, reference(x, layer.weight, layer.bias))
    assert tuple(h.shape[1:]) == layer.out_shape
    h_hat = h + 0.1 * torch.randn_like(h)
    expected = _local_loss_grads(layer, x, h_hat, reference)
    for p, g in layer.local_grads(x, a, h, h_hat).items():
        torch.testing.assert_close(g, expected[p])


@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=5, stride=2, padding=2), dict(kernel_size=4, stride=3)])
def test_conv_transpose_is_the_adjoint_of_the_convolution(geometry):
    """``<conv(x, W), v> = <x, transpose(v, W)>``: the transposed convolution with ``W`` is ``W^T``, and it lands
    exactly on the input's shape (output padding chosen for any stride)."""
    torch.manual_seed(0)
    layer = Conv2d([2, 10, 9], 3, **geometry)
    x, v = torch.randn(4, 2, 10, 9), torch.randn(4, *layer.out_shape)
    back = layer.transpose(v, layer.weight)
    assert back.shape == x.shape
    torch.testing.assert_close((layer.linear_out(x) * v).sum(), (x * back).sum(), rtol=1e-5, atol=1e-4)


def test_pooled_conv_transpose_lands_on_the_input_shape():
    layer = Conv2d([1, 13, 13], 2, kernel_size=3, pool=2)  # 11x11 conv output, pooled to 5x5
    assert layer.transpose(torch.randn(3, *layer.out_shape), layer.weight).shape == (3, 1, 13, 13)


def test_auxiliary_dense_keeps_fixed_rows_and_reports_model_outputs():
    torch.manual_seed(0)
    layer = AuxiliaryDense(6, 3, aux_units=2, activation="linear")
    h = layer(torch.randn(4, 6))
    assert h.shape == (4, 5) and layer.model_output(h).shape == (4, 3)
    assert [n for n, _ in layer.named_parameters()] == ["weight"] and layer.aux_weight.shape == (2, 6)
    torch.manual_seed(0)
    assert torch.equal(layer.full_weight(), Dense(6, 5, "linear").weight)  # the same draw as a full-width layer


def test_network_checks_that_layers_fit_and_specs_rebuild_it():
    conv = Conv2d([1, 8, 8], 4, kernel_size=3, padding=1, pool=2)
    with pytest.raises(ValueError, match=r"layer 1 outputs 64 features \(4, 4, 4\) but layer 2 expects 65"):
        Network([conv, Dense(65, 3)])
    net = Network([conv, Dense(64, 3)])
    rebuilt = Network(net.spec)
    assert [type(m) for m in rebuilt.layers] == [Conv2d, Dense] and rebuilt.sizes == net.sizes == [64, 64, 3]
    with pytest.raises(ValueError, match="unknown layer class 'tplightning.layers.Pool'"):
        build_layer({"class_path": "tplightning.layers.Pool"})
    with pytest.raises(ValueError, match="give either sizes or network"):
        build_network(sizes=[64, 10], network=[conv, Dense(64, 3)])


@pytest.mark.parametrize("kw, match", [
    (dict(input_shape=[1, 8]), "input_shape must be"),
    (dict(input_shape=[1, 4, 4], out_channels=2, kernel_size=5), "do not fit input"),
    (dict(input_shape=[1, 8, 8], out_channels=0), "out_channels must be an integer >= 1"),
])  # fmt: skip
def test_conv_layer_rejects_bad_geometry(kw, match):
    with pytest.raises(ValueError, match=match):
        Conv2d(**{"out_channels": 2, **kw})


def test_mlp_is_a_network_of_dense_layers_with_the_old_random_stream():
    torch.manual_seed(0)
    mlp = tp.networks.MLP([5, 6, 4], activation="tanh")
    torch.manual_seed(0)
    W1, W2 = torch.randn(6, 5) * (1 / 5**0.5), torch.randn(4, 6) * (1 / 6**0.5)
    assert torch.equal(mlp.weights[0], W1) and torch.equal(mlp.weights[1], W2)
    assert mlp.biases is None and [a.name for a in mlp.activations] == ["tanh", "linear"]
