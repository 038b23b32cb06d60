"""Bring your own network: rules on a stack of layers (a small CNN), its errors, checkpoints, resume, DDP and config."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tplightning._lightning import pl  # the Lightning package the project's switch chose
import tplightning as tp
from conftest import SHARED_DATA, fit_ddp_replicas, quiet_trainer, weights_of
from tplightning.data.base import TensorData, TensorDataModule
from tplightning.layers import Conv2d, Dense

SGD = functools.partial(torch.optim.SGD, lr=0.05)
ADAM = functools.partial(torch.optim.Adam, lr=0.01)
CNN_RULES = ["BP", "DTPAI", "OriginalDTP", "LeeDTP"]
DATA = SHARED_DATA


def cnn(activation="tanh"):
    return [
        Conv2d([1, 8, 8], 4, kernel_size=3, padding=1, pool=2, activation=activation),
        Conv2d([4, 4, 4], 6, kernel_size=3, stride=2, padding=1, activation=activation),
        Dense(24, 12, activation, bias=True),
        Dense(12, 3, "linear", bias=True),
    ]


class Images(TensorDataModule):
    """Noisy 8x8 one-channel images whose class (3) is the quadrant that is lit: a task for convolutions."""

    task, input_dim, output_dim = "classification", 64, 3

    def __init__(self, n=96, batch_size=16):
        super().__init__(batch_size=batch_size, eval_batch_size=n)
        self.n = n

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 3, (self.n,), generator=g)
        x = 0.3 * torch.randn(self.n, 1, 8, 8, generator=g)
        for k, (r, c) in enumerate([(0, 0), (0, 4), (4, 2)]):
            x[y == k, :, r : r + 4, c : c + 4] += 1.0
        x = x.flatten(1)
        self.train_data = self.val_data = self.test_data = TensorData(x, y)


def rule_on_cnn(name, **kw):
    cls = getattr(tp, name)
    args = {"network": cnn("leaky_relu" if name == "DTPAI" else "tanh"), "loss": "cross_entropy", "forward_optimizer": SGD, **kw}
    if issubclass(cls, tp.LearnedInverseRule):
        args.setdefault("feedback_optimizer", SGD)
    return cls(**args)


def _train_loss(rule, dm):
    dm.setup()
    with torch.no_grad():
        return float(rule.loss_from_output(rule.net.forward_all(dm.train_data.x)[0][-1], dm.train_data.y))


@pytest.mark.parametrize("name", CNN_RULES)
def test_rules_train_a_small_cnn(name):
    pl.seed_everything(0)
    rule, dm = rule_on_cnn(name, forward_optimizer=ADAM), Images()
    before = _train_loss(rule, dm)
    quiet_trainer(max_epochs=10).fit(rule, datamodule=dm)
    after = _train_loss(rule, dm)
    assert after < 0.5 * before, f"{name}: training loss {before:.3f} -> {after:.3f}"
    if name != "BP":  # the convolutions learn from their targets too
        assert not torch.equal(rule.net.layers[0].weight, rule_on_cnn(name).net.layers[0].weight)


@pytest.mark.parametrize("name", ["TPEI", "DTPEI", "RMTPEI"])
def test_exact_inverses_of_a_convolution_fail_at_construction(name):
    layers = [Dense(64, 64, "leaky_relu"), Conv2d([1, 8, 8], 1, kernel_size=3, padding=1), Dense(64, 3, "linear")]
    with pytest.raises(ValueError, match=r"layer 2 is a Conv2d .*an exact inverse of it is not available|modified rules \(D\^-1\) need dense layers"):
        getattr(tp, name)(network=layers, forward_optimizer=SGD)


@pytest.mark.parametrize("name, match", [("MTP", "need dense layers, got Conv2d"), ("AOSDTP", "AOSDTP builds its auxiliary")])
def test_rules_that_need_dense_layers_say_so(name, match):
    with pytest.raises(ValueError, match=match):
        rule_on_cnn(name)


def test_thesis_form_on_tanh_refuses_nothing_but_relu_has_no_inverse():
    with pytest.raises(ValueError, match="layer 2 activation ReLU.*has no inverse"):
        tp.DTPAI(network=[Conv2d([1, 8, 8], 2, pool=2), Conv2d([2, 3, 3], 2, activation="relu"), Dense(2, 3, "linear")],
                 forward_optimizer=SGD, feedback_optimizer=SGD)


@pytest.mark.parametrize("name", ["LeeDTP", "DTPAI"])
def test_resume_of_a_cnn_rule_continues_identically(name, tmp_path):
    class StopAfter(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            trainer.should_stop = trainer.current_epoch == 0

    def fit(epochs, callbacks=(), ckpt_path=None, seed=0, **kw):
        pl.seed_everything(seed)
        rule = rule_on_cnn(name)
        quiet_trainer(max_epochs=epochs, callbacks=list(callbacks), **kw).fit(rule, datamodule=Images(), ckpt_path=ckpt_path)
        return rule

    straight = fit(3)
    fit(3, [pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True), StopAfter()], enable_checkpointing=True)
    spec = torch.load(tmp_path / "last.ckpt", weights_only=False)["hyper_parameters"]["network"]
    assert spec[0]["class_path"] == "tplightning.layers.Conv2d" and spec[0]["init_args"]["input_shape"] == [1, 8, 8]
    resumed = fit(3, ckpt_path=str(tmp_path / "last.ckpt"), seed=99)
    for a, b in zip(weights_of(resumed), weights_of(straight)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    loaded = getattr(tp, name).load_from_checkpoint(tmp_path / "last.ckpt")  # the layers rebuilt from the spec
    assert [type(m) for m in loaded.net.layers] == [Conv2d, Conv2d, Dense, Dense]


def test_divergence_in_a_cnn_names_the_layer():
    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 2:
                with torch.no_grad():
                    module.net.layers[1].weight[0, 0, 0, 0] = float("nan")

    with pytest.raises(tp.DivergenceError, match=r"diverged at batch 2 \(epoch 0\).*first non-finite activation in layer 2"):
        quiet_trainer(max_epochs=1, callbacks=[Poison()]).fit(rule_on_cnn("LeeDTP"), datamodule=Images())


@pytest.mark.slow  # the fast suite proves identical replicas once, in tests/rules/test_ddp.py
def test_ddp_replicas_of_a_cnn_rule_stay_identical(tmp_path):
    pl.seed_everything(0)
    r0, r1 = fit_ddp_replicas(rule_on_cnn("LeeDTP"), Images(), tmp_path, max_epochs=1)
    for a, b in zip(r0, r1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(), reason=f"MNIST files not found under {DATA}")
@pytest.mark.parametrize("config", ["mnist/cnn_bp.yaml", "mnist/cnn_lee_dtp.yaml"])
def test_cnn_configs_train_on_mnist(config):
    from tplightning.cli import main

    out = main(["--config", config, "--data.init_args.data_dir", str(DATA), "--data.init_args.num_train", "512",
                "--data.init_args.num_val", "256", "--trainer.max_epochs", "1", "--trainer.limit_test_batches", "1",
                "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    rule = out["cli"].model
    assert [type(m).__name__ for m in rule.net.layers] == ["Conv2d", "Conv2d", "Dense", "Dense"]
    assert out["test_metrics"]["test/acc"] > 0.5  # 4 batches of training already beat chance (0.1) by far


def test_diagnostics_say_they_need_dense_layers():
    from tplightning.diagnostics import diagnostics

    rule = rule_on_cnn("LeeDTP")
    with pytest.raises(ValueError, match=r"need dense layers; layers 1 \(Conv2d\), 2 \(Conv2d\) are not"):
        diagnostics(rule, torch.randn(4, 64), torch.randint(0, 3, (4,)))
