"""FW-DTP and CCL (issue 31) against independent plain-torch computations of the papers' losses, with autograd."""
from __future__ import annotations

import functools

import pytest
import torch

import tplightning as tp
from conftest import quiet_trainer, tiny_data
from tplightning.errors import ConfigError

SGD1 = functools.partial(torch.optim.SGD, lr=1.0)


def _batch(sizes, classes=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, sizes[0], generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 2, 1, 1]) if classes else torch.randn(7, sizes[-1], generator=g, dtype=torch.float64)
    return x, y


# ------------------------------------------------------------------------------- FW-DTP
def test_fwdtp_forward_gradients_match_autograd_of_the_difference_target_losses():
    """Shibuya et al.: h^_L = h_L - eta dCE/dh_L, h^_i = h_i + tanh(B_i h^_{i+1}) - tanh(B_i h_{i+1}); each W_i descends
    mean_b 1/2 ||tanh(W_i h_{i-1}) - h^_i||^2 with h_{i-1} and h^_i held fixed. Computed here with plain torch."""
    sizes, eta = [5, 6, 4, 3], 0.3
    rule = tp.FWDTP(sizes=sizes, activation="tanh", loss="cross_entropy", target_stepsize=eta, feedback_scale=1.7).double()
    x, y = _batch(sizes)
    Ws = [W.detach().clone() for W in rule.forward_weights]
    Bs = [B.detach().clone() for B in rule.feedback_weights]
    assert tuple(Bs[0].shape) == (6, 4) and tuple(Bs[1].shape) == (4, 3)
    # plain torch
    h = [x]
    for k, W in enumerate(Ws):
        a = h[-1] @ W.T
        h.append(a if k == len(Ws) - 1 else torch.tanh(a))
    onehot = torch.nn.functional.one_hot(y, 3).double()
    t = [None] * 4
    t[3] = h[3] - eta * (torch.softmax(h[3], 1) - onehot)
    for i in (2, 1):
        t[i] = h[i] + torch.tanh(t[i + 1] @ Bs[i - 1].T) - torch.tanh(h[i + 1] @ Bs[i - 1].T)
    expected = []
    for i, W in enumerate(Ws, start=1):
        Wg = W.clone().requires_grad_(True)
        a = h[i - 1] @ Wg.T
        out = a if i == 3 else torch.tanh(a)
        expected.append(torch.autograd.grad(0.5 * (out - t[i]).pow(2).sum(1).mean(), Wg)[0])
    # the rule
    hs, pre = rule.forward_pass(x)
    targets = rule.targets_from(hs, pre, y)
    grads = rule.forward_grads([1, 2, 3], hs, pre, targets)
    for W, g in zip(rule.forward_weights, expected):
        torch.testing.assert_close(grads[W], g)


def test_fwdtp_feedback_weights_never_change_and_are_checkpointed(tmp_path):
    rule, dm = tp.FWDTP(sizes=[6, 6, 6], forward_optimizer=functools.partial(torch.optim.SGD, lr=0.01)), tiny_data()
    before = [B.clone() for B in rule.feedback_weights]
    assert rule.feedback_parameters() == [] and len(rule.build_optimizers()) == 1
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(rule, datamodule=dm)
    assert all(torch.equal(a, b) for a, b in zip(before, rule.feedback_weights))
    trainer.save_checkpoint(tmp_path / "r.ckpt")
    loaded = tp.FWDTP.load_from_checkpoint(tmp_path / "r.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.feedback_weights))


def test_fwdtp_scale_of_the_feedback_weights():
    torch.manual_seed(0)
    a = tp.FWDTP(sizes=[3, 400, 300, 2], feedback_scale=1.0)
    torch.manual_seed(0)
    b = tp.FWDTP(sizes=[3, 400, 300, 2], feedback_scale=3.0)
    torch.testing.assert_close(b.feedback_weights[0], 3.0 * a.feedback_weights[0])
    assert float(a.feedback_weights[0].std()) == pytest.approx(300**-0.5, rel=0.02)  # 1/sqrt(n_{i+1})
    with pytest.raises(ConfigError, match="feedback_scale must be > 0, got 0.0"):
        tp.FWDTP(sizes=[3, 4, 2], feedback_scale=0.0)


# ------------------------------------------------------------------------------- CCL
def _ccl_reference(Ws, Qs, x, y, pairing, scale):
    """Kao & Hariharan's dual networks and layer-wise losses in plain torch (the authors' C2Linear: forward and reverse
    detach their input): returns the autograd gradients of the total loss for every W and Q."""
    Ws = [W.clone().requires_grad_(True) for W in Ws]
    Qs = [Q.clone().requires_grad_(True) for Q in Qs]
    L = len(Ws)
    h = [x]
    for k, W in enumerate(Ws):
        a = h[-1].detach() @ W.T
        h.append(a if k == L - 1 else torch.tanh(a))
    n_out = Ws[-1].shape[0]
    onehot = torch.nn.functional.one_hot(y, n_out).double() if pairing == "similarity" else None
    c = [None] * (L + 1)
    c[L] = torch.eye(n_out, dtype=torch.float64) if pairing == "similarity" else (onehot if onehot is not None else y)
    if pairing == "mse" and y.dtype == torch.long:
        c[L] = torch.nn.functional.one_hot(y, n_out).double()
    for i in range(L - 1, 0, -1):
        c[i] = torch.tanh(c[i + 1].detach() @ Qs[i - 1].T)
    total = 0
    for i in range(1, L):
        if pairing == "similarity":
            C = h[i] @ c[i].T
            total = total + scale / h[i].shape[1] * ((C - onehot) ** 2).mean()
        else:
            total = total + scale * ((h[i] - c[i]) ** 2).mean()
    if y.dtype == torch.long:
        total = total + torch.nn.functional.cross_entropy(h[L], y)
    else:
        total = total + 0.5 * ((h[L] - y) ** 2).sum(1).mean()
    grads = torch.autograd.grad(total, Ws + Qs)
    return grads[:L], grads[L:]


@pytest.mark.parametrize("pairing, loss", [("similarity", "cross_entropy"), ("mse", "cross_entropy"), ("mse", "mse")])
def test_ccl_gradients_match_autograd_of_the_layer_wise_losses(pairing, loss):
    sizes, scale = [5, 6, 4, 3], 2.5
    rule = tp.CCL(sizes=sizes, activation="tanh", loss=loss, pairing=pairing, pairing_scale=scale, feedback_optimizer=SGD1).double()
    x, y = _batch(sizes, classes=loss == "cross_entropy", seed=1)
    gW, gQ = _ccl_reference([W.detach() for W in rule.forward_weights], [Q.detach() for Q in rule.feedback_weights], x, y, pairing, scale)
    hs, pre = rule.forward_pass(x)
    hidden, fb = rule.counter_current(hs, y)
    grads = rule.forward_grads([1, 2, 3], hs, pre, [*hidden, rule.output_target(hs[-1], y)])
    for W, g in zip(rule.forward_weights, gW):
        torch.testing.assert_close(grads[W], g)
    for Q, g in zip(rule.feedback_weights, gQ):
        torch.testing.assert_close(fb[Q], g)


def test_ccl_training_step_is_one_clipped_sgd_step_of_both_networks():
    """With SGD at lr 1 each network moves by minus its gradient, scaled to total norm ``grad_clip`` when longer."""
    sizes, clip = [5, 6, 4, 3], 0.05
    torch.manual_seed(3)
    rule = tp.CCL(sizes=sizes, activation="tanh", loss="cross_entropy", pairing="similarity", pairing_scale=128.0, grad_clip=clip,
                  forward_optimizer=SGD1, feedback_optimizer=SGD1, lr_final_factor=1.0).double()
    x, y = _batch(sizes, seed=2)
    Ws0, Qs0 = [W.detach().clone() for W in rule.forward_weights], [Q.detach().clone() for Q in rule.feedback_weights]
    gW, gQ = _ccl_reference(Ws0, Qs0, x, y, "similarity", 128.0)
    trainer = quiet_trainer(max_steps=1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    trainer.fit(rule, train_dataloaders=data)
    for before, after, grads in ((Ws0, rule.forward_weights, gW), (Qs0, rule.feedback_weights, gQ)):
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert float(norm) > clip  # the clipping is exercised
        for b, a, g in zip(before, after, grads):
            torch.testing.assert_close(a.detach(), b - g * clip / (norm + 1e-6))


def test_ccl_refuses_bad_settings():
    with pytest.raises(ConfigError, match="pairing 'similarity' pairs each sample with every class's code: it needs loss: cross_entropy, got 'mse'"):
        tp.CCL(sizes=[3, 4, 2], pairing="similarity")
    with pytest.raises(ConfigError, match="pairing must be 'mse' or 'similarity', got 'dot'"):
        tp.CCL(sizes=[3, 4, 2], pairing="dot")
    with pytest.raises(ConfigError, match="grad_clip must be > 0"):
        tp.CCL(sizes=[3, 4, 2], grad_clip=0.0)
    with pytest.raises(ConfigError, match="CCL has no batch-normalised form here"):
        tp.CCL(sizes=[3, 4, 2], batch_norm=True)


def test_pairing_losses_literal_values():
    h = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    onehot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # h codes^T = [[1, 2, 3], [0, 1, 1]]; minus onehot: [[0, 2, 3], [0, 1, 0]]; squares 0 4 9 0 1 0, mean 14/6, / n = 2
    assert float(tp.losses.class_similarity(h, codes, onehot, scale=3.0)) == pytest.approx(3.0 * 14 / 6 / 2)
    assert float(tp.losses.pairing_mse(h, torch.zeros(2, 2), scale=2.0)) == pytest.approx(2.0 * 6 / 4)


def test_fwdtp_on_blocks_keeps_each_mirror_module_fixed_and_trains_the_forward_weights():
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 5), nn.Tanh(), nn.Linear(5, 2))
    rule = tp.FWDTP(network=tp.convert(model, input_shape=(1, 4, 4)), feedback_scale=0.5)
    mirrors = [g.base.B for g in rule.maps]
    assert all(isinstance(m, nn.Module) for m in mirrors)
    fixed = [p.detach().clone() for m in mirrors for p in m.parameters()]
    forward = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)), torch.randn(32, 2, generator=torch.Generator().manual_seed(2))
    quiet_trainer(max_epochs=1).fit(rule, DataLoader(TensorDataset(x, y), batch_size=8))
    assert [torch.equal(a, b) for a, b in zip(fixed, (p for m in mirrors for p in m.parameters()))] == [True] * len(fixed)
    assert not any(torch.equal(a, b) for a, b in zip(forward, model.parameters()))
