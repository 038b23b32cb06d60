"""Foundation: BP against a hand-written Alg. A.7, BPFixed, the schedule, data modules, InitNearTeacher."""
from __future__ import annotations

import functools

import pytest
import torch

from tplightning._lightning import pl  # the Lightning package the project's switch chose
import tplightning as tp
from conftest import make_rule, quiet_trainer, tiny_data
from tplightning.networks import MLP
from tplightning.rules.base import LinearDecay


def test_bp_step_equals_hand_written_backprop():
    """One BP step (batch B, SGD) equals Alg. A.7 written out: deltas propagated by W^T D."""
    pl.seed_everything(0)
    rule = make_rule("BP", sizes=(5, 4, 4, 3), activation="tanh", lr_final_factor=1.0)
    dm = tiny_data(sizes=(5, 4, 4, 3), num_train=8, batch_size=8, shuffle=False)
    dm.setup("fit")
    x, y = dm.train_data.x, dm.train_data.y
    Ws = [W.detach().clone() for W in rule.forward_weights]
    hs, pre = [x], []
    for i, W in enumerate(Ws):
        pre.append(hs[-1] @ W.T)
        hs.append(torch.tanh(pre[-1]) if i < 2 else pre[-1])
    delta = (hs[-1] - y) / x.shape[0]  # d(mean_b 1/2||h_L - y||^2)/da_L, linear output
    expected = [None] * 3
    for i in (2, 1, 0):
        expected[i] = Ws[i] - 0.01 * delta.T @ hs[i]
        if i:
            delta = (delta @ Ws[i]) * (1 - torch.tanh(pre[i - 1]) ** 2)
    quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(rule, datamodule=dm)
    for W, W_exp in zip(rule.forward_weights, expected):
        torch.testing.assert_close(W.detach(), W_exp)


def test_bp_fixed_changes_only_the_output_layer():
    rule, dm = make_rule("BPFixed"), tiny_data()
    before = [W.detach().clone() for W in rule.forward_weights]
    quiet_trainer(max_epochs=2).fit(rule, datamodule=dm)
    after = rule.forward_weights
    assert torch.equal(before[0], after[0])
    assert not torch.equal(before[1], after[1])
    with pytest.raises(ValueError, match=r"BPFixed always trains only the output layer; got train_layers=\[1\]"):
        tp.BPFixed(sizes=[6, 6, 6], train_layers=[1])


def test_train_layers_validation():
    with pytest.raises(ValueError, match=r"train_layers entry 4 is out of range for a network with 2 layers \(1\.\.2, or -2\.\.-1"):
        make_rule("BP", train_layers=[4])
    for bad in ([], "1"):
        with pytest.raises(ValueError, match=r"train_layers must list at least one layer index \(1\.\.2, or -1 for the output layer\)"):
            make_rule("DTPAI", train_layers=bad)
    for bad in (["1"], [2.0], [True]):
        with pytest.raises(ValueError, match=r"train_layers entries must be integers, got "):
            make_rule("BP", train_layers=bad)
    assert make_rule("BP", train_layers=[-1]).train_layers == [2]
    assert make_rule("BP", train_layers=iter([1, 2])).train_layers == [1, 2]  # any iterable of integers
    assert make_rule("BP", train_layers=torch.tensor([2, -2])).train_layers == [1, 2]


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({"sizes": 6}, r"sizes must be a list of layer sizes such as \[784, 256, 10\], got 6"),
        ({"sizes": "784,256,10"}, r"sizes must be a list of layer sizes such as \[784, 256, 10\], got '784,256,10'"),
        ({"init_std": -1.0}, r"init_std must be > 0 \(or None for 1/sqrt\(n_in\)\), got -1\.0"),
        ({"forward_optimizer": "sgd"}, r"forward_optimizer must build an optimizer from parameters, e\.g\. functools\.partial\(torch\.optim\.SGD, lr=0\.01\); got 'sgd'"),
    ],
)
def test_constructor_arguments_are_checked_where_given(kw, expected):
    with pytest.raises(ValueError, match=expected):
        tp.BP(**{"sizes": [6, 6, 6], **kw})


def test_linear_decay_schedule_reaches_one_fifth():
    decay = LinearDecay(epochs=5, final=0.2)
    assert [decay(e) for e in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    rule, dm = make_rule("BP"), tiny_data()
    seen = []

    class Spy(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(pl_module.optimizers().param_groups[0]["lr"])

    quiet_trainer(max_epochs=3, callbacks=[Spy()]).fit(rule, datamodule=dm)
    assert seen == pytest.approx([0.01, 0.006, 0.002])


def test_bad_rule_arguments():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        make_rule("BP", loss="hinge")
    with pytest.raises(ValueError, match=r"lr_final_factor must be in \(0, 1\], got 0"):
        make_rule("BP", lr_final_factor=0)
    with pytest.raises(ValueError, match=r"layer sizes must be positive integers, got \[6, 0, 6\]"):
        make_rule("BP", sizes=(6, 0, 6))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        make_rule("BP", activation="swish")
    # a leaky slope <= 0 cannot be inverted; layer 2 of a 3-layer net needs s_2^-1
    with pytest.raises(ValueError, match=r"layer 2 activation LeakyReLU\(negative_slope=0.0\) has no inverse"):
        make_rule("DTPAI", sizes=(6, 6, 6, 6), negative_slope=0.0)
    with pytest.raises(ValueError, match=r"negative_slope must be a finite number >= 0 \(0: a ReLU\), got -0.1"):
        make_rule("TPEI", sizes=(6, 6, 6, 6), negative_slope=-0.1)  # never a leaky ReLU, wherever it is
    make_rule("DTPAI", negative_slope=0.0)  # 6-6-6 with a linear output never inverts s_1


def test_mlp_returns_every_activation_and_pre_activation():
    net = MLP([3, 4, 2], activation="leaky_relu", negative_slope=0.1, bias=True)
    x = torch.randn(5, 3)
    hs, pre = net.forward_all(x)
    a1 = x @ net.weights[0].T + net.biases[0]
    torch.testing.assert_close(pre[0], a1)
    torch.testing.assert_close(hs[1], torch.where(a1 >= 0, a1, 0.1 * a1))
    torch.testing.assert_close(hs[2], hs[1] @ net.weights[1].T + net.biases[1])
    torch.testing.assert_close(net(x), hs[2])
    assert MLP([3, 4, 2]).biases is None  # no bias by default, as in the thesis


def test_orthogonal_init_gives_unit_singular_values_and_transpose_inverses():
    net = MLP([12, 8, 8, 10], init="orthogonal")  # wide-to-narrow, square and narrow-to-wide layers
    for W in net.weights:
        torch.testing.assert_close(torch.linalg.svdvals(W.double()), torch.ones(min(W.shape), dtype=torch.float64), atol=1e-5, rtol=0)
    learned = make_rule("DTPAI", sizes=(6, 6, 6, 6), init="orthogonal")  # Q_i = W_{i+1}^dagger = W_{i+1}^T
    for i in learned.feedback_layers:
        torch.testing.assert_close(learned.Q(i), learned.net.weights[i].T, atol=1e-5, rtol=0)
    exact = make_rule("TPEI", sizes=(6, 6, 6, 6), init="orthogonal")  # kept: sigma_min sigma_max = 1 > tau_init
    torch.testing.assert_close(exact.inverse(2), exact.net.weights[1].T, atol=1e-5, rtol=0)
    torch.manual_seed(3)
    a = MLP([5, 5], init="orthogonal").weights[0]
    torch.manual_seed(3)
    torch.testing.assert_close(MLP([5, 5], init="orthogonal").weights[0], a)  # seeded
    with pytest.raises(ValueError, match="init must be one of 'gaussian', 'orthogonal', 'xavier_normal', got 'xavier'"):
        MLP([3, 3], init="xavier")
    with pytest.raises(ValueError, match=r"init_std=0.5 applies to Gaussian weights only"):
        make_rule("BP", init="orthogonal", init_std=0.5)


def test_student_teacher_data():
    dm = tp.StudentTeacherDataModule(sizes=[6, 6, 4], num_train=100, num_val=20, num_test=30, batch_size=10)
    dm.setup("fit")
    assert (dm.input_dim, dm.output_dim, dm.task) == (6, 4, "regression")
    assert [len(d) for d in (dm.train_data, dm.val_data, dm.test_data)] == [100, 20, 30]
    W1, W2 = dm.teacher_weights
    h = dm.train_data.x @ W1.T
    torch.testing.assert_close(dm.train_data.y, torch.where(h >= 0, h, 0.35 * h) @ W2.T)  # labels are the teacher's
    again = tp.StudentTeacherDataModule(sizes=[6, 6, 4], num_train=100, num_val=20, num_test=30)
    again.setup("fit")
    assert torch.equal(again.train_data.x, dm.train_data.x)
    other = tp.StudentTeacherDataModule(sizes=[6, 6, 4], teacher_seed=1)
    assert not torch.equal(other.teacher_weights[0], W1)
    with pytest.raises(ValueError, match="num_val must be >= 1, got 0"):
        tp.StudentTeacherDataModule(num_val=0)


def test_epoch_order_depends_only_on_seed_and_epoch():
    dm = tiny_data()
    dm.setup("fit")
    order = lambda epoch: torch.cat([x for x, _ in _epoch(dm, epoch)])  # noqa: E731
    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))


def _epoch(dm, epoch):
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_default_student_differs_from_its_teacher():
    """Seeds of the same integer must not make the student (or its perturbation) the teacher."""
    pl.seed_everything(0)
    rule, dm = make_rule("BP", init_std=1.0), tiny_data(teacher_seed=0)
    for W, W_t in zip(rule.forward_weights, dm.teacher_weights):
        assert (W - W_t).norm() > 1.0


def test_init_near_teacher_places_student_at_distance():
    rule, dm = make_rule("TPEI"), tiny_data()
    cb = tp.InitNearTeacher(distance=8.0, seed=3)
    quiet_trainer(max_epochs=1, limit_train_batches=0, callbacks=[cb]).fit(rule, datamodule=dm)
    for W, W_t in zip(rule.forward_weights, dm.teacher_weights):
        assert float((W - W_t).norm()) == pytest.approx(8.0, rel=1e-5)
        # a positive multiple of the teacher would be the same function up to the output layer
        cos = (W * W_t).sum() / (W.norm() * W_t.norm())
        assert cos < 0.99
    W2 = rule.forward_weights[1]
    s = torch.linalg.svdvals(W2.detach().double())
    assert s[0] * s[-1] > rule.tau_init  # robustly invertible for the exact-inverse rule
    torch.testing.assert_close(W2 @ rule.inverse(2), torch.eye(6), atol=1e-5, rtol=0)


def test_toy_data_shares_output_weights():
    dm = tp.ToyDataModule(nonlinear=True)
    dm.setup("fit")
    assert (dm.input_dim, dm.output_dim) == (1, 2)
    assert torch.linalg.svdvals(dm.output_weights).min() >= 0.3
    rule = tp.TPEI(sizes=[1, 2, 2], negative_slope=0.1, train_layers=[1],
                   forward_optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    cb = tp.InitNearTeacher(distance=1.0, copy_layers=[2])
    before = None

    class Keep(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal before
            before = pl_module.forward_weights[1].detach().clone()

    quiet_trainer(max_epochs=2, callbacks=[cb, Keep()]).fit(rule, datamodule=dm)
    torch.testing.assert_close(before, dm.output_weights)
    torch.testing.assert_close(rule.forward_weights[1].detach(), dm.output_weights)  # W_2 never learns


def test_exact_rule_cheap_diagnostics_match_exact_values():
    rule = make_rule("TPEI", sizes=(8, 8, 8)).double()
    rule.refresh_inverses()
    true = torch.linalg.svdvals(rule.forward_weights[1].detach())[-1]
    assert rule.estimate_sigma_min(2) >= true * (1 - 1e-9)  # a power-iteration estimate never undershoots
    assert float(rule.estimate_sigma_min(2, iterations=500)) == pytest.approx(float(true), rel=1e-3)
    assert rule.probe_inverse_error(2) < 1e-12
    with torch.no_grad():
        rule.inverse(2)[0, 0] += 1e-3
    E = rule.forward_weights[1].detach() @ rule.inverse(2) - torch.eye(8, dtype=torch.float64)
    assert 1e-6 < float(rule.probe_inverse_error(2)) <= float(E.abs().sum(1).max()) + 1e-12


def test_batch_norm_is_in_the_core_for_exact_and_learned_modified_rules():
    """RMTP-EI with mini-batches (Woodbury) and MTP share Alg. A.1's normalisation and de-normalisation."""
    pl.seed_everything(0)
    rule = make_rule("RMTPEI", batch_norm=True)
    x, y = torch.randn(8, 6) * 3 + 1, torch.randn(8, 6)
    hs, pre = rule.forward_pass(x, update_state=False)
    mu, sigma = x.mean(0), (x.var(0, unbiased=False) + rule.bn_eps).sqrt()
    torch.testing.assert_close(rule.layer_input(1, hs), (x - mu) / sigma)
    targets = rule.targets_from(hs, pre, y)
    mu1, sigma1 = hs[1].mean(0), (hs[1].var(0, unbiased=False) + rule.bn_eps).sqrt()
    s2_inv = rule.net.activations[1].inverse(targets[1])
    torch.testing.assert_close(targets[0], sigma1 * (s2_inv @ rule.inverse(2).T) + mu1)  # de-normalised W^-1 s^-1
    quiet_trainer(max_epochs=1).fit(rule, datamodule=tiny_data())
    W2 = rule.forward_weights[1].detach()
    torch.testing.assert_close(W2 @ rule.inverse(2), torch.eye(6), atol=1e-4, rtol=0)  # Woodbury kept it exact
    assert not torch.equal(rule.normalization.running_mean_0, torch.zeros(6))
    with pytest.raises(ValueError, match="batch_norm normalises over the batch and needs batches of at least 2"):
        quiet_trainer(max_epochs=1).fit(make_rule("RMTPEI", batch_norm=True), datamodule=tiny_data(batch_size=1))
    assert make_rule("MTP").batch_norm and not make_rule("TPAI").batch_norm
    with pytest.raises(ValueError, match="modified rules divide by D_1; layer 1 activation ReLU"):
        make_rule("RMTPEI", activation="relu")
