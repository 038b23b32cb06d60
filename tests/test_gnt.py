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


def test_damping_search_picks_the_smallest_mean_angle_per_layer():
    rule = _rule()
    batches = [(torch.randn(4, 4), torch.randint(0, 3, (4,))) for _ in range(2)]
    grid = [0.0, 0.05, 3.0]
    lams, table = D.damping_search(rule, batches, grid)
    for c, i in enumerate((1, 2)):
        means = [sum(_angle(_gnt_update(rule, x, y, i, lam), _our_update(rule, x, y, i)) for x, y in batches) / 2 for lam in grid]
        assert [float(v) for v in table[:, c]] == pytest.approx(means, abs=1e-3)
        assert lams[c] == grid[means.index(min(means))]
    assert len({round(float(v), 6) for v in table[:, 0]}) == 3  # the grid values give different angles


# ----------------------------------------------------------------------------------------------- the papers' protocol
from conftest import make_rule, quiet_trainer, tiny_data  # noqa: E402
from tplightning._lightning import pl  # noqa: E402


def test_trains_forward_schedule_literal():
    rule = make_rule("DRL", feedback_pretrain_epochs=1, feedback_extra_epochs=2)
    assert [rule.trains_forward(e) for e in range(8)] == [False, True, False, False, True, False, False, True]
    assert [make_rule("DRL").trains_forward(e) for e in range(3)] == [True, True, True]
    with pytest.raises(ValueError, match="feedback_extra_epochs must be >= 0, got -1"):
        make_rule("DRL", feedback_extra_epochs=-1)


def _fit(max_epochs, ckpt_path=None, save_dir=None, **kw):
    pl.seed_everything(0)
    rule, dm = make_rule("DRL", sizes=(6, 6, 6, 6), activation="tanh", **kw), tiny_data(sizes=(6, 6, 6, 6))
    weights = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            weights.append((trainer.current_epoch, [W.detach().clone() for W in module.net.weights],
                            [Q.detach().clone() for Q in module.feedback_weights]))  # fmt: skip

    callbacks = [Record()]
    if save_dir:  # a checkpoint at every epoch's end
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=save_dir, filename="{epoch}", save_top_k=-1))
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=callbacks, limit_val_batches=0, enable_checkpointing=bool(save_dir))
    trainer.fit(rule, datamodule=dm, ckpt_path=ckpt_path)
    return rule, weights


def test_feedback_only_epochs_keep_the_forward_weights_and_resume_exactly(tmp_path):
    kw = {"feedback_pretrain_epochs": 1, "feedback_extra_epochs": 1}
    pl.seed_everything(0)
    W0 = [W.detach().clone() for W in make_rule("DRL", sizes=(6, 6, 6, 6), activation="tanh", **kw).net.weights]
    rule, hist = _fit(5, save_dir=tmp_path, **kw)
    forward = [e for e, Ws, _ in hist if any(not torch.equal(a, b) for a, b in zip(Ws, W0 if e == 0 else hist[e - 1][1]))]
    assert forward == [1, 3]  # epochs 0 (pre-training), 2 and 4 (extra feedback epochs) leave W as it was
    assert all(not torch.equal(a, b) for a, b in zip(hist[2][2], hist[1][2]))  # Q learns in a feedback-only epoch
    resumed, _ = _fit(5, ckpt_path=tmp_path / "epoch=2.ckpt", **kw)  # after the feedback-only epoch 2
    for a, b in zip(list(resumed.net.weights) + resumed.feedback_weights, list(rule.net.weights) + rule.feedback_weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_feedback_first_trains_q_on_the_weights_before_the_forward_step():
    x, y = torch.randn(8, 6), torch.randn(8, 6)

    def step(**kw):
        torch.manual_seed(1)
        return make_rule("DRL", sizes=(6, 6, 6, 6), activation="tanh", feedback_init="random", **kw)

    first, after, only = step(feedback_first=True), step(), step(feedback_only=True)
    for rule in (first, after, only):
        opts = rule.build_optimizers()
        rule.optimizer_list = lambda opts=opts: opts
        rule.step_optimizer = lambda opt: opt.step()
        rule.training_step((x, y), 0)
    for a, b in zip(first.net.weights, after.net.weights):  # same targets (from Q before its step): same forward step
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(first.feedback_weights, only.feedback_weights):  # Q stepped on the forward weights before the step
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(first.feedback_weights, after.feedback_weights))


def test_xavier_normal_init_std():
    from tplightning.layers import Dense

    torch.manual_seed(0)
    W = Dense(600, 200, init="xavier_normal").weight.detach()
    assert float(W.std()) == pytest.approx(math.sqrt(2 / 800), rel=0.02)
    assert float(W.mean()) == pytest.approx(0.0, abs=0.002)


def test_callback_skips_the_new_measures_in_feedback_only_epochs():
    pl.seed_everything(0)
    rule, dm = make_rule("DRL", sizes=(6, 6, 6), feedback_pretrain_epochs=1), tiny_data()
    diag = D.TargetPropDiagnostics(every_n_steps=4, max_samples=8, gnt_damping=0.1)
    quiet_trainer(max_epochs=2, callbacks=[diag], limit_val_batches=0).fit(rule, datamodule=dm)
    assert [(h["epoch"], "diag/gnt_angle_1" in h) for h in diag.history] == [(0, False), (0, False), (1, True), (1, True)]
