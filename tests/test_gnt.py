"""The GNT angle, the null-space share and the parameter-space Gauss-Newton angle (Meulemans et al. 2020) against an
independent float64 computation: per-sample Jacobians built by loops over the output units with autograd on a plain
torch copy of the network, ``torch.linalg.pinv`` / ``torch.linalg.svd``, the rule's update recomputed by autograd on the
local loss from the rule's targets."""
import math

import pytest
import torch

import tplightning as tp
from tplightning import diagnostics as D


def _rule(**kw):
    torch.manual_seed(3)
    rule = tp.DRL(sizes=[4, 6, 5, 3], activation="tanh", output_activation="linear", loss="cross_entropy", bias=True,
                  feedback_init="random", **kw)  # fmt: skip
    with torch.no_grad():  # non-zero biases and feedback weights away from any inverse
        for layer in rule.net.layers:
            layer.bias.normal_(0, 0.3)
    return rule


def _plain(rule):
    """Weights and biases of the rule as float64 leaves; output through tanh hidden layers and a linear output."""
    Ws = [layer.weight.detach().double().clone() for layer in rule.net.layers]
    bs = [layer.bias.detach().double().clone() for layer in rule.net.layers]
    return Ws, bs


def _up(Ws, bs, h, start):
    for k in range(start, len(Ws)):
        a = h @ Ws[k].T + bs[k]
        h = a if k == len(Ws) - 1 else torch.tanh(a)
    return h


def _angle(a, b):
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm()))))))


def _our_update(rule, x, y, i):
    """Autograd gradient of mean_b 1/2 ||tanh(W_i h_{i-1} + b_i) - h^_i||^2 with the rule's targets, float32."""
    hs, targets = rule.compute_targets(x, y)
    W = rule.net.layers[i - 1].weight.detach().clone().requires_grad_(True)
    out = torch.tanh(hs[i - 1] @ W.T + rule.net.layers[i - 1].bias.detach())
    loss = 0.5 * (out - targets[i - 1]).pow(2).sum() / x.shape[0]
    return torch.autograd.grad(loss, W)[0]


def _gnt_update(rule, x, y, i, lam):
    Ws, bs = _plain(rule)
    xd = x.double()
    hs, pre = [xd], []
    for k in range(len(Ws)):
        a = hs[-1] @ Ws[k].T + bs[k]
        pre.append(a)
        hs.append(a if k == len(Ws) - 1 else torch.tanh(a))
    o = hs[-1]
    e = torch.softmax(o, -1) - torch.nn.functional.one_hot(y, o.shape[1]).double()  # dl/do of the cross-entropy
    dW = torch.zeros_like(Ws[i - 1])
    B = x.shape[0]
    for b in range(B):
        h = hs[i][b].clone().requires_grad_(True)
        out = _up(Ws, bs, h.unsqueeze(0), i).squeeze(0)
        J = torch.stack([torch.autograd.grad(out[k], h, retain_graph=True)[0] for k in range(out.shape[0])])  # (n_L, n_i)
        if lam == 0:
            dh = torch.linalg.pinv(J) @ e[b]
        else:
            dh = J.T @ torch.linalg.inv(J @ J.T + lam * torch.eye(J.shape[0], dtype=J.dtype)) @ e[b]
        s = 1 - torch.tanh(pre[i - 1][b]) ** 2
        dW += torch.outer(s * dh, hs[i - 1][b])
    return 2 * dW / B


def test_gnt_angles_match_explicit_per_sample_jacobians():
    rule = _rule()
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    dampings = [0.7, 0.0]
    got = D.gnt_angles(rule, x, y, dampings)
    for i, lam in zip((1, 2), dampings):
        expected = _angle(_gnt_update(rule, x, y, i, lam), _our_update(rule, x, y, i))
        assert float(got[i]) == pytest.approx(expected, abs=1e-3)
    assert 1.0 < float(got[1]) < 179.0  # not a degenerate 0 / 180


def test_gnt_weight_updates_match_explicit_computation_in_float64():
    rule = _rule()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    net = D._network64(rule, "test")
    e = rule.loss.error(net(x.double()), y)
    got = D.gnt_weight_updates(net, x, e, {1: 2.5, 2: 0.0})
    for i, lam in ((1, 2.5), (2, 0.0)):
        torch.testing.assert_close(got[i], _gnt_update(rule, x, y, i, lam), rtol=1e-9, atol=1e-12)
    # distinct dampings give distinct updates (the per-layer value is used)
    assert not torch.allclose(D.gnt_weight_updates(net, x, e, {1: 0.0})[1], got[1])


def _weight_jacobian(rule, x, i):
    """dO/dvec(W_i) of the batch's flattened outputs, row by row with autograd."""
    Ws, bs = _plain(rule)
    W = Ws[i - 1].clone().requires_grad_(True)
    Ws = Ws[: i - 1] + [W] + Ws[i:]
    O = _up(Ws, bs, x.double(), 0).reshape(-1)
    return torch.stack([torch.autograd.grad(O[r], W, retain_graph=True)[0].reshape(-1) for r in range(O.shape[0])])


def test_null_space_share_matches_svd_complement():
    rule = _rule()
    x, y = torch.randn(2, 4), torch.randint(0, 3, (2,))
    got = D.null_space_shares(rule, x, y)
    for i in (1, 2):
        J = _weight_jacobian(rule, x, i)
        u = _our_update(rule, x, y, i).double().reshape(-1)
        _, S, Vh = torch.linalg.svd(J, full_matrices=True)
        r = int((S > 1e-10 * S[0]).sum())
        null = Vh[r:]  # rows spanning the null space (the authors' construction)
        expected = float((null @ u).norm() / u.norm())
        assert float(got[i]) == pytest.approx(expected, abs=1e-8)
        assert 0.05 < expected < 0.9999


def test_gauss_newton_angles_match_pinv_of_the_full_jacobian():
    rule = _rule()
    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    got = D.gauss_newton_angles(rule, x, y)
    Js = [_weight_jacobian(rule, x, i) for i in (1, 2, 3)]
    Ws, bs = _plain(rule)
    o = _up(Ws, bs, x.double(), 0)
    e = (torch.softmax(o, -1) - torch.nn.functional.one_hot(y, 3).double()).reshape(-1)
    step = torch.linalg.pinv(torch.cat(Js, 1)) @ e
    blocks = step.split([j.shape[1] for j in Js])
    ours = [_our_update(rule, x, y, i) for i in (1, 2)]
    for i in (1, 2):
        assert float(got[i]) == pytest.approx(_angle(blocks[i - 1], ours[i - 1]), abs=1e-3)
    all_expected = _angle(torch.cat(blocks[:2]), torch.cat([u.reshape(-1) for u in ours]))
    assert float(got[0]) == pytest.approx(all_expected, abs=1e-3)


def test_callback_logs_gnt_only_in_forward_batches_and_before_the_update():
    rule = _rule()
    diag = D.TargetPropDiagnostics(every_n_steps=1, max_samples=8, signals=False, gnt_damping=[1.0, 0.1], null_space=True,
                                   gauss_newton=True)  # fmt: skip
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    expected = D.gnt_angles(rule, x, y, [1.0, 0.1])
    values = diag.before_update(rule, x, y)
    assert sorted(values) == ["diag/gn_angle_1", "diag/gn_angle_2", "diag/gn_angle_all", "diag/gnt_angle_1", "diag/gnt_angle_2",
                              "diag/null_share_1", "diag/null_share_2"]  # fmt: skip
    assert float(values["diag/gnt_angle_2"]) == float(expected[2])


def test_bad_damping_is_refused():
    with pytest.raises(ValueError, match="gnt_damping and gn_damping must be >= 0"):
        D.TargetPropDiagnostics(gnt_damping=[1.0, -1.0])
    with pytest.raises(ValueError, match="one value per hidden layer"):
        D.gnt_angles(_rule(), torch.randn(2, 4), torch.tensor([0, 1]), [1.0])
