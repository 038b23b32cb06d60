"""The chapter-6 LightningModules: configs run, one step is the discrete weight dynamics, bad input is named."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import tplightning as tp
from tplightning.config_files import CONFIG_DIR
from train import main

from conftest import SHARED_DATA, quiet_trainer, tiny_data

DYN_CONFIGS = sorted(str(p.relative_to(CONFIG_DIR)) for p in (CONFIG_DIR / "dynamics").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]


def test_dynamics_configs_exist():
    assert {"dynamics/single_phase_exact.yaml", "dynamics/single_phase_learned.yaml", "dynamics/two_phase.yaml", "dynamics/multiplexing.yaml"} <= set(DYN_CONFIGS)


@pytest.mark.parametrize("config", [c for c in DYN_CONFIGS if "mnist" not in c])
def test_every_dynamics_config_runs(config, one_thread):
    cb = '[{"class_path": "tplightning.InitNearTeacher", "init_args": {"distance": 8.0, "seed": 0}}]'
    out = main(["--config", config, "--trainer.fast_dev_run", "2", "--trainer.callbacks", cb, *QUIET])
    assert out["test_metrics"] and all(math.isfinite(v) for v in out["test_metrics"].values())


SGD = functools.partial(torch.optim.SGD, lr=0.05)
CASES = {
    "exact": (tp.DynamicalTP, {"inverses": "exact"}),
    "learned": (tp.DynamicalTP, {"inverses": "learned", "feedback_optimizer": SGD}),
    "two_phase": (tp.TwoPhaseDTP, {"feedback_optimizer": SGD}),
    "multiplexing": (tp.MultiplexingDTP, {"feedback_optimizer": SGD}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_step_is_the_discrete_weight_dynamics(name, one_thread):
    cls, kw = CASES[name]
    rule = cls(sizes=[6, 6, 6], forward_optimizer=SGD, lr_final_factor=1.0, **kw)
    data = tiny_data(batch_size=8, shuffle=False)
    data.setup("fit")
    x, y = data.train_data.x[:8], data.train_data.y[:8]
    w0 = [W.detach().clone() for W in rule.net.weights]
    q0 = [Q.detach().clone() for Q in (rule.feedback or [])]
    gw, gq = rule.weight_updates(x, y)
    quiet_trainer(max_steps=1, limit_train_batches=1, limit_val_batches=0).fit(rule, datamodule=data)
    for W, W0, G in zip(rule.net.weights, w0, gw):
        torch.testing.assert_close(W.detach(), W0 - 0.05 * G)
        assert float(G.abs().max()) > 0
    for Q, Q0, G in zip(rule.feedback or [], q0, gq):
        torch.testing.assert_close(Q.detach(), Q0 - 0.05 * G)


def test_depth_compensation_is_the_layer_specific_rate_of_eq_6_19():
    data = tiny_data()
    data.setup("fit")
    x, y = data.train_data.x[:8], data.train_data.y[:8]
    mu = 0.2
    plain = tp.TwoPhaseDTP(sizes=[6, 6, 6, 6], mu=mu)
    comp = tp.TwoPhaseDTP(sizes=[6, 6, 6, 6], mu=mu, depth_compensation=True)
    comp.load_state_dict(plain.state_dict())
    r = mu / (1 - mu)
    for i, (a, b) in enumerate(zip(plain.weight_updates(x, y)[0], comp.weight_updates(x, y)[0]), start=1):
        torch.testing.assert_close(b, a / r ** (4 - i))


def test_module_errors_are_named():
    with pytest.raises(ValueError, match=r"mu must lie in \(0, 1\).*got 1.2"):
        tp.DynamicalTP(sizes=[6, 6, 6], mu=1.2)
    with pytest.raises(ValueError, match=r"exact inverses \(eq. 6.4\) need square W_2, got shape \(4, 6\)"):
        tp.DynamicalTP(sizes=[6, 6, 4])
    with pytest.raises(ValueError, match="no biases"):
        tp.TwoPhaseDTP(sizes=[6, 6, 6], bias=True)
    with pytest.raises(ValueError, match="inverses must be 'exact' or 'learned', got 'approx'"):
        tp.DynamicalTP(sizes=[6, 6, 6], inverses="approx")
    with pytest.raises(ValueError, match="target_stepsize must be > 0, got 0"):
        tp.MultiplexingDTP(sizes=[6, 6, 6], target_stepsize=0)
    with pytest.raises(ValueError, match="feedback_init must be 'pinv' or 'random', got 'zeros'"):
        tp.MultiplexingDTP(sizes=[6, 6, 6], feedback_init="zeros")
    with pytest.raises(ValueError, match="feedback_init must be 'pinv' or 'random', got 'zeros'"):
        tp.DynamicalTP(sizes=[6, 6, 6], feedback_init="zeros")  # checked with exact inverses too, where Q is unused
    with pytest.raises(ValueError, match="feedback_weight_decay must be >= 0, got -0.1"):
        tp.TwoPhaseDTP(sizes=[6, 6, 6], feedback_weight_decay=-0.1)


def test_learned_modules_accept_a_narrowing_network():
    rule = tp.TwoPhaseDTP(sizes=[6, 5, 4])
    x, y = torch.randn(3, 6), torch.randn(3, 4)
    gw, gq = rule.weight_updates(x, y)
    assert [tuple(G.shape) for G in gw] == [(5, 6), (4, 5)] and [tuple(G.shape) for G in gq] == [(5, 4)]
    rule = tp.MultiplexingDTP(sizes=[6, 5, 4])
    assert [tuple(G.shape) for G in rule.weight_updates(x, y)[0]] == [(5, 6), (4, 5)]


MNIST_DIR = SHARED_DATA


@pytest.mark.skipif(not (MNIST_DIR / "MNIST" / "raw").is_dir(), reason=f"MNIST files not found under {MNIST_DIR}")
@pytest.mark.parametrize("config", [c for c in DYN_CONFIGS if "mnist" in c])
def test_mnist_dynamics_configs_run(config, one_thread):
    args = ["--config", config, "--trainer.fast_dev_run", "1", "--trainer.callbacks", "[]", "--data.init_args.data_dir", str(MNIST_DIR), *QUIET]
    out = main(args)
    assert 0 <= out["test_metrics"]["test/acc"] <= 1


def test_cli_short_name_resolves(one_thread):
    out = main(["--model", "TwoPhaseDTP", "--data", "StudentTeacherDataModule", "--trainer.fast_dev_run", "1", *QUIET])
    assert type(out["cli"].model).__name__ == "TwoPhaseDTP"
