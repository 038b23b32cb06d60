"""Local adaptive steps and damping (tplightning.adaptive) and the global Gauss-Newton reference (issue 32).

Expectations are literal numbers or independent numpy computations from one layer's quantities."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import tplightning as tp
from conftest import quiet_trainer, tiny_data
from tplightning._lightning import pl
from tplightning.adaptive import Adaptive, LayerDamping, LayerStep, OutputStep, TrustRegion, parabola_step, secant_output_step
from tplightning.errors import ConfigError


def _sgd(lr):
    return functools.partial(torch.optim.SGD, lr=lr)


def _loader(x, y, batch):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _lrelu(a, slope=0.35):
    return np.where(a > 0, a, slope * a)


# ------------------------------------------------------------------------------------------- global reference
@pytest.mark.parametrize("bias", [False, True])
def test_gauss_newton_reaches_the_least_squares_optimum_in_one_step(bias):
    """Linear one-layer network, L2 loss (a quadratic problem), lambda = 0: one step lands on numpy's lstsq solution."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=g), torch.randn(12, 3, generator=g)
    torch.manual_seed(0)
    rule = tp.GaussNewton(sizes=[4, 3], activation="linear", bias=bias, forward_optimizer=_sgd(1.0), lr_final_factor=1.0)
    start = rule.net.layers[0].weight.detach().clone()
    quiet_trainer(max_steps=1).fit(rule, _loader(x, y, 12))
    X = x.double().numpy()
    if bias:
        X = np.hstack([X, np.ones((12, 1))])
    sol = np.linalg.lstsq(X, y.double().numpy(), rcond=None)[0]
    W = rule.net.layers[0].weight.detach().double().numpy()
    assert not np.allclose(start.numpy(), sol[:4].T, atol=1e-2)  # it had somewhere to go
    np.testing.assert_allclose(W, sol[:4].T, atol=1e-5)
    if bias:
        np.testing.assert_allclose(rule.net.layers[0].bias.detach().double().numpy(), sol[4], atol=1e-5)


def test_gauss_newton_with_damping_takes_the_levenberg_marquardt_step():
    """(J^T J / B + lambda I) delta = -J^T e / B for a linear layer: J^T J / B = kron(I, X^T X / B)."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
    torch.manual_seed(0)
    rule = tp.GaussNewton(sizes=[3, 2], activation="linear", damping=0.7, forward_optimizer=_sgd(1.0), lr_final_factor=1.0)
    W0 = rule.net.layers[0].weight.detach().double().numpy()
    quiet_trainer(max_steps=1).fit(rule, _loader(x, y, 5))
    X, Y = x.double().numpy(), y.double().numpy()
    E = X @ W0.T - Y  # (B, 2)
    # per output row k: (X^T X / B + lambda I) d_k = -X^T E_k / B
    expected = W0 + np.stack([np.linalg.solve(X.T @ X / 5 + 0.7 * np.eye(3), -X.T @ E[:, k] / 5) for k in range(2)])
    np.testing.assert_allclose(rule.net.layers[0].weight.detach().double().numpy(), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------- trust region
def test_trust_region_raises_lambda_after_a_bad_step_and_lowers_it_after_a_good_one():
    tr = TrustRegion()
    lam = torch.tensor(0.2, dtype=torch.float64)
    assert float(tr.update(lam, torch.tensor(-0.05), torch.tensor(0.1))) == pytest.approx(0.3)  # the loss rose
    assert float(tr.update(lam, torch.tensor(0.01), torch.tensor(0.1))) == pytest.approx(0.3)  # rho = 0.1 < 1/4
    assert float(tr.update(lam, torch.tensor(0.09), torch.tensor(0.1))) == pytest.approx(0.2 * 2 / 3)  # rho = 0.9
    assert float(tr.update(lam, torch.tensor(0.05), torch.tensor(0.1))) == pytest.approx(0.2)  # rho = 0.5: kept
    assert float(tr.update(lam, torch.tensor(0.05), torch.tensor(0.0))) == pytest.approx(0.2)  # no predicted decrease
    assert float(tr.update(torch.tensor(1e4), torch.tensor(-1.0), torch.tensor(1.0))) == 1e4  # the bound


def test_gauss_newton_trust_region_rejects_a_step_that_raises_the_loss():
    """Far from the optimum of a strongly nonlinear net, an undamped full step can raise the batch loss: then no step is
    taken and lambda grows; a step that lowers it is taken."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.randn(4, 2) * 5
    rule = tp.GaussNewton(sizes=[3, 3, 2], activation="tanh", damping=1.0, trust_region=TrustRegion(),
                          forward_optimizer=_sgd(1.0), lr_final_factor=1.0)  # fmt: skip
    before = rule.loss_from_output(rule(x), y)
    quiet_trainer(max_steps=1).fit(rule, _loader(x, y, 4))
    after = rule.loss_from_output(rule(x), y)
    assert float(after) <= float(before)
    assert float(rule.damping) in (pytest.approx(1.5), pytest.approx(1.0), pytest.approx(2 / 3))


def test_parabola_and_secant_steps_literal():
    L = lambda t: 5.0 - 3.0 * t + 0.75 * t**2  # noqa: E731  minimum at t = 2
    t = parabola_step(torch.tensor(L(0.0)), torch.tensor(-3.0), torch.tensor(L(0.4)), torch.tensor(0.4), 10.0, 1e-6, 1e3)
    assert float(t) == pytest.approx(2.0)
    t = parabola_step(torch.tensor(L(0.0)), torch.tensor(-3.0), torch.tensor(L(0.4)), torch.tensor(0.4), 2.0, 1e-6, 1e3)
    assert float(t) == pytest.approx(0.8)  # growth bound
    t = parabola_step(torch.tensor(1.0), torch.tensor(0.5), torch.tensor(2.0), torch.tensor(0.4), 2.0, 1e-6, 1e3)
    assert float(t) == pytest.approx(1e-6)  # not a descent direction
    q = torch.tensor([[0.3, -0.1]])
    assert float(secant_output_step(q, 0.5 * q, torch.tensor(0.4), 10.0, 1e-3, 5.0)) == pytest.approx(2.0)
    assert float(secant_output_step(q, 0.5 * q, torch.tensor(0.4), 10.0, 1e-3, 1.0)) == pytest.approx(1.0)  # maximum
    assert float(secant_output_step(q, torch.zeros_like(q), torch.tensor(0.4), 2.0, 1e-3, 1.0)) == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------- local pieces in a rule
def _tpei(adaptive, sizes=(4, 5, 5, 5), lr=0.02):
    pl.seed_everything(3, verbose=False)
    return tp.TPEI(sizes=list(sizes), forward_optimizer=_sgd(lr), lr_final_factor=1.0, adaptive=adaptive)


def _batch(sizes=(4, 5, 5, 5), B=3):
    g = torch.Generator().manual_seed(7)
    return torch.randn(B, sizes[0], generator=g), torch.randn(B, sizes[-1], generator=g)


def _numpy_parabola_step(W, h_prev, h_hat, trial, growth=2.0):
    """eta for a leaky-ReLU dense layer without bias from its own quantities, by explicit numpy."""
    W, h_prev, h_hat = (np.asarray(v, dtype=np.float64) for v in (W, h_prev, h_hat))
    B = h_prev.shape[0]
    a = h_prev @ W.T
    h = _lrelu(a)
    d = np.where(a > 0, 1.0, 0.35)
    delta = d * (h - h_hat)
    dW = -(delta.T @ h_prev) / B

    def loss(t):
        return 0.5 * ((_lrelu(h_prev @ (W + t * dW).T) - h_hat) ** 2).sum() / B

    slope = ((h - h_hat) * d * (h_prev @ dW.T)).sum() / B
    c = 2 * (loss(trial) - loss(0.0) - slope * trial) / trial**2
    return min(-slope / c, growth * trial)


def test_layer_step_is_the_parabola_minimum_of_the_layers_own_loss():
    rule = _tpei(Adaptive(layer_step=LayerStep()))
    x, y = _batch()
    hs, targets = rule.compute_targets(x, y)
    W2 = rule.net.layers[1].weight.detach().clone()
    quiet_trainer(max_steps=1).fit(rule, _loader(x, y, 3))
    expected = _numpy_parabola_step(W2, hs[1], targets[1], trial=0.02)
    assert expected != pytest.approx(0.02)
    assert float(rule.adaptive_state["eta"][1]) == pytest.approx(expected, rel=1e-6)


def test_a_layers_adapted_step_does_not_change_when_another_layer_changes():
    """Locality (section 4.2.3): layer 2's eta depends on its weights, input, activation and target only."""
    rule = _tpei(Adaptive(layer_step=LayerStep()))
    x, y = _batch()
    hs, pre = rule.net.forward_all(x)
    targets = rule.compute_targets(x, y)[1]
    layer = rule.net.layers[1]
    delta = layer.delta(pre[1], hs[2], targets[1], rule.scaling)
    dW = -(delta.T @ hs[1]) / 3
    trial = torch.tensor(5.0, dtype=torch.float64)  # large: the parabola's minimum lies inside the growth bound
    eta = rule.layer_step_size(layer, hs[1], pre[1], hs[2], targets[1], dW, None, trial)
    assert 1e-3 < float(eta) < 10.0
    with torch.no_grad():
        rule.net.layers[0].weight.mul_(3.0).add_(0.5)
        rule.net.layers[2].weight.mul_(-0.2)
    rule.refresh_inverses()
    assert float(rule.layer_step_size(layer, hs[1], pre[1], hs[2], targets[1], dW, None, trial)) == float(eta)
    with torch.no_grad():
        layer.weight.mul_(1.5)  # its own weights do change it
    assert float(rule.layer_step_size(layer, hs[1], pre[1], hs[2], targets[1], dW, None, trial)) != pytest.approx(float(eta))


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_damped_exact_inverse_target_is_the_layers_levenberg_marquardt_step(lam):
    """h^_i = h_i + (W^T W + lambda I)^{-1} W^T (s^{-1}(h^_{i+1}) - a_{i+1}), W = W_{i+1} (eq. 4.72 for one layer)."""
    rule = _tpei(Adaptive(damping=LayerDamping(initial=lam)))
    plain = _tpei(None)
    x, y = _batch()
    hs, targets = rule.compute_targets(x, y)
    _, plain_targets = plain.compute_targets(x, y)
    W = rule.net.layers[2].weight.detach().double().numpy()
    a3 = (hs[2] @ rule.net.layers[2].weight.detach().T).double().numpy()
    t3 = targets[2].double().numpy()
    # the output layer is linear: s^{-1} is the identity
    expected = hs[2].double().numpy() + (t3 - a3) @ np.linalg.solve(W.T @ W + lam * np.eye(5), W.T).T
    np.testing.assert_allclose(targets[1].double().numpy(), expected, atol=2e-5)
    if lam == 0:
        torch.testing.assert_close(targets[1], plain_targets[1], atol=2e-5, rtol=0)  # TP-EI's target
    else:
        assert not torch.allclose(targets[1], plain_targets[1], atol=1e-3)


def test_learned_maps_take_the_damping_as_their_regularised_inverse():
    """Theorem 4.7: weight decay lambda sigma^2 on Q makes W^T (W W^T + lambda I)^{-1} the feedback training's fixed point."""
    pl.seed_everything(0, verbose=False)
    rule = tp.DTPAI(sizes=[6, 6, 6], forward_optimizer=_sgd(0.01), feedback_noise_std=0.5,
                    adaptive=Adaptive(damping=LayerDamping(initial=0.2)))  # fmt: skip
    quiet_trainer(max_steps=1).fit(rule, datamodule=tiny_data())
    lam = float(rule.adaptive_state["lambda"][0])
    assert rule.maps[0].base.weight_decay == pytest.approx(0.2 * 0.25)  # set from lambda before the step
    assert lam in (pytest.approx(0.3), pytest.approx(0.2), pytest.approx(0.2 * 2 / 3))


def test_adaptive_training_lowers_the_loss_and_moves_every_state():
    pl.seed_everything(0, verbose=False)
    rule = tp.TPEI(sizes=[6, 6, 6], forward_optimizer=_sgd(0.01), adaptive=Adaptive(LayerDamping(), LayerStep(0.5), OutputStep()))
    data = tiny_data(batch_size=1, num_train=64)
    data.setup("fit")
    before = float(torch.nn.functional.mse_loss(rule(data.train_data.x), data.train_data.y))
    quiet_trainer(max_epochs=2).fit(rule, datamodule=data)
    after = float(torch.nn.functional.mse_loss(rule(data.train_data.x), data.train_data.y))
    assert after < 0.9 * before
    state = rule.adaptive_state
    assert float(state["eta_hat"]) != 0.1 and bool(torch.isfinite(state["eta"]).all()) and float(state["lambda"][0]) != 0.01


# ------------------------------------------------------------------------------------------- options, checkpoints
def test_bad_combinations_are_short_errors():
    with pytest.raises(ConfigError, match="adaptive output_step needs loss='mse'"):
        tp.DTPAI(sizes=[4, 5, 3], loss="cross_entropy", adaptive=Adaptive(output_step=OutputStep()))
    with pytest.raises(ConfigError, match="adaptive damping needs exact inverses or thesis-form learned maps"):
        tp.LeeDTP(sizes=[4, 5, 5, 3], adaptive=Adaptive(damping=LayerDamping()))
    with pytest.raises(ConfigError, match="do not support batch_norm"):
        tp.DTPAI(sizes=[4, 5, 3], batch_norm=True, adaptive=Adaptive(layer_step=LayerStep()))
    with pytest.raises(ConfigError, match="LayerStep needs 0 < fraction <= 1"):
        LayerStep(fraction=0.0)
    with pytest.raises(ConfigError, match="GaussNewton needs loss='mse'"):
        tp.GaussNewton(sizes=[4, 3], loss="cross_entropy")
    rule = tp.DTPAI(sizes=[4, 5, 3], forward_optimizer=functools.partial(torch.optim.Adam, lr=0.01), adaptive=Adaptive(layer_step=LayerStep()))
    with pytest.raises(ConfigError, match="adaptive layer_step replaces the learning rate of plain SGD"):
        rule.build_optimizers()


class _Stop(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.should_stop = True


def _make(kind):
    pl.seed_everything(0, verbose=False)
    pieces = Adaptive(LayerDamping(), LayerStep(0.5), OutputStep())
    if kind == "TPEI":
        return tp.TPEI(sizes=[6, 6, 6], forward_optimizer=_sgd(0.01), adaptive=pieces)
    if kind == "DTPAI":
        return tp.DTPAI(sizes=[6, 6, 6], forward_optimizer=_sgd(0.01), adaptive=pieces)
    return tp.GaussNewton(sizes=[6, 6, 6], forward_optimizer=_sgd(0.5), damping=0.1, trust_region=TrustRegion())


@pytest.mark.parametrize("kind", ["TPEI", "DTPAI", "GaussNewton"])
def test_resume_with_the_adaptive_state_is_exact(tmp_path, kind):
    """Two epochs straight == one epoch, a checkpoint, and one more from it."""
    straight = _make(kind)
    quiet_trainer(max_epochs=2).fit(straight, datamodule=tiny_data())
    first = _make(kind)
    quiet_trainer(max_epochs=2, enable_checkpointing=True,
                  callbacks=[tp.Checkpoint(dirpath=tmp_path, save_top_k=0), _Stop()]).fit(first, datamodule=tiny_data())  # fmt: skip
    resumed = _make(kind)
    quiet_trainer(max_epochs=2).fit(resumed, datamodule=tiny_data(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.batches_seen == straight.batches_seen == 16
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)
    if kind == "GaussNewton":
        assert float(resumed.damping) == float(straight.damping) != 0.1
    else:
        for k, v in straight.adaptive_state.items():
            torch.testing.assert_close(resumed.adaptive_state[k], v, rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------------------------- DDP
class _SaveAdaptiveState(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.adaptive_state, self.folder / f"adaptive{trainer.global_rank}.pt")


@pytest.mark.slow  # a 2-process spawn: about 35 s on the shared 2-core machine
def test_ddp_replicas_take_the_same_adaptive_decisions(tmp_path):
    """Two gloo processes, DTP-AI with every piece: the per-rank decisions come from replica-averaged scalars, so the
    weights (through per-layer learning rates) and the adaptive state end identical on both ranks."""
    from conftest import fit_ddp_replicas

    pl.seed_everything(0, verbose=False)
    rule = tp.DTPAI(sizes=[6, 6, 6, 6], forward_optimizer=_sgd(0.01), adaptive=Adaptive(LayerDamping(), LayerStep(), OutputStep()))
    rank0, rank1 = fit_ddp_replicas(rule, tiny_data(sizes=(6, 6, 6, 6)), tmp_path, callbacks=[_SaveAdaptiveState(tmp_path)], max_epochs=1)
    s0, s1 = (torch.load(tmp_path / f"adaptive{r}.pt") for r in (0, 1))
    for k in s0:
        torch.testing.assert_close(s0[k], s1[k], rtol=0, atol=0, msg=k)
    for a, b in zip(rank0, rank1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert bool(torch.isfinite(s0["eta"]).all())  # the layer steps were taken
