"""Divergence stops with a message and keeps the last good checkpoint; seeds reproduce; resume is exact."""
from __future__ import annotations

import pytest
import torch

from tplightning._lightning import pl  # the Lightning package the project's switch chose
import tplightning as tp
from conftest import make_rule, quiet_trainer, tiny_data, weights_of
from tplightning.rules.base import DivergenceError


class PoisonAt(pl.Callback):
    """Writes NaN into W_1 before batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            with torch.no_grad():
                pl_module.forward_weights[0][0, 0] = float("nan")


class StopAfter(pl.Callback):
    """Stops a run (as an interruption would) at the end of epoch ``epoch``."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


@pytest.mark.parametrize("name, defer", [("BP", False), ("DTPAI", False), ("TPEI", False), ("BP", True), ("DTPAI", True)])
def test_divergence_stops_and_keeps_last_good_checkpoint(name, defer, tmp_path):
    # deferred: the flags stay on the device until the epoch's end (as on a GPU); the error still names the bad step.
    # Exact-inverse rules never defer (a NaN breaks their SVD first), see ExactInverseRule
    rule, dm = make_rule(name), tiny_data()
    rule.divergence.defer = defer
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(max_epochs=5, enable_checkpointing=True, callbacks=[ckpt, PoisonAt(epoch=2, batch=3)])
    with pytest.raises(DivergenceError, match=r"diverged at batch 19 \(epoch 2\).*first non-finite activation in layer 1"):
        trainer.fit(rule, datamodule=dm)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 1  # written at the end of the last good epoch, nothing after the bad step
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


def _fit(name, epochs, callbacks=(), ckpt_path=None, seed=0, **trainer_kw):
    pl.seed_everything(seed)
    rule, dm = make_rule(name, sizes=(6, 6, 6, 6)), tiny_data(sizes=(6, 6, 6, 6))
    trainer = quiet_trainer(max_epochs=epochs, callbacks=list(callbacks), **trainer_kw)
    trainer.fit(rule, datamodule=dm, ckpt_path=ckpt_path)
    return rule


@pytest.mark.parametrize("name", ["BP", "TPEI", "RTPEI", "DTPAI", "RTPAI", "OriginalDTP", "LeeDTP"])
def test_resume_continues_identically(name, tmp_path):
    straight = _fit(name, 4)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(name, 4, callbacks=[ckpt, StopAfter(1)], enable_checkpointing=True)  # first half, then "crash"
    resumed = _fit(name, 4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), seed=456)  # other global seeds on purpose
    assert resumed.batches_seen == straight.batches_seen == 4 * 8
    for a, b in zip(weights_of(resumed), weights_of(straight)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["BP", "RTPAI", "TPEI"])
def test_same_seed_same_result_other_seed_other_result(name):
    a, b, c = _fit(name, 2, seed=7), _fit(name, 2, seed=7), _fit(name, 2, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(weights_of(a), weights_of(b)))
    assert not all(torch.equal(x, y) for x, y in zip(weights_of(a), weights_of(c)))


class SetAfter(pl.Callback):
    """After the last training batch of epoch ``epoch``, sets the rule's tensor ``name`` (a parameter or a buffer) to
    ``fill(tensor)``: the step's loss stays finite, the next read of the flags must see it."""

    def __init__(self, epoch: int, name: str, fill):
        self.epoch, self.name, self.fill = epoch, name, fill

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == trainer.num_training_batches - 1:
            tensor = {**dict(pl_module.named_parameters()), **dict(pl_module.named_buffers())}[self.name]
            with torch.no_grad():
                tensor.copy_(self.fill(tensor))


def _set_inf(t):
    out = t.clone()
    out.view(-1)[0] = float("inf")
    return out


# issue 28, finding 5: a checkpoint was written with Q = inf (the check looked at the loss and activations only)
@pytest.mark.parametrize("name, tensor, defer", [
    ("DTPAI", "maps.0.inner.Q", False), ("DTPAI", "maps.0.inner.Q", True),  # a learned feedback weight
    ("TPEI", "maps.0.W_inv", False),  # a kept inverse (a buffer)
    ("RMTPEI", "normalization.running_var_1", False),  # batch-norm statistics (a buffer)
    ("BP", "net.layers.1.weight", True),  # a forward weight after the step's check
])  # fmt: skip
def test_no_checkpoint_of_a_non_finite_parameter_or_buffer(name, tensor, defer, tmp_path):
    rule, dm = make_rule(name, **({"batch_norm": True} if name == "RMTPEI" else {})), tiny_data()
    rule.divergence.defer = defer if not isinstance(rule, tp.ExactInverseRule) else False
    assert tensor in rule.state_dict()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(max_epochs=4, enable_checkpointing=True, callbacks=[ckpt, SetAfter(1, tensor, _set_inf)])
    with pytest.raises(DivergenceError, match=rf"diverged at batch 15 \(epoch 1\): non-finite tensors: {tensor}\."):
        trainer.fit(rule, datamodule=dm)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


# the weights near 1e18 of finding 5: finite, but no run recovers from them
def test_the_norm_guard_stops_exploding_weights_before_a_checkpoint(tmp_path):
    rule, dm = make_rule("DTPAI"), tiny_data()
    initial = float(rule.net.weights[0].detach().norm())
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(max_epochs=4, enable_checkpointing=True, callbacks=[ckpt, SetAfter(1, "net.layers.0.weight", lambda t: t * 2000)])
    with pytest.raises(DivergenceError) as info:
        trainer.fit(rule, datamodule=dm)
    norm = float(rule.net.weights[0].detach().norm())
    assert norm > 1000 * initial and torch.isfinite(rule.net.weights[0]).all()
    assert str(info.value).startswith(
        "training diverged at batch 15 (epoch 1): non-finite tensors: none, parameter norms beyond norm_guard 1000 x "
        f"max(initial norm, 1): net.layers.0.weight {norm:.3g} (initial {initial:.3g}).")  # fmt: skip
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["epoch"] == 0
    # within a guard of 2000 the same weights pass the epoch's end and are written
    rule, dm = make_rule("DTPAI", norm_guard=2000.0), tiny_data()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "wide", save_last=True)
    trainer = quiet_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[ckpt, SetAfter(0, "net.layers.0.weight", lambda t: t * 1500)])
    trainer.fit(rule, datamodule=dm)
    assert torch.load(tmp_path / "wide" / "last.ckpt", weights_only=False)["epoch"] == 0


def test_the_initial_norms_travel_with_the_checkpoint(tmp_path):
    rule, dm = make_rule("DTPAI"), tiny_data()
    before = {n: float(p.detach().norm()) for n, p in rule.named_parameters()}
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(rule, datamodule=dm)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["tplightning"]["initial_norms"]
    assert saved.keys() == before.keys() and all(saved[n] == pytest.approx(before[n], rel=1e-6) for n in before)
    assert any(float(p.detach().norm()) != pytest.approx(before[n], rel=1e-6) for n, p in rule.named_parameters())  # it trained
    resumed = make_rule("DTPAI")
    quiet_trainer(max_epochs=2).fit(resumed, datamodule=tiny_data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.divergence.initial_norms() == pytest.approx(saved, rel=0)  # the bound of the first run, not the resumed weights'
