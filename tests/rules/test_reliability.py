"""Divergence stops with a message and keeps the last good checkpoint; seeds reproduce; resume is exact."""
from __future__ import annotations

import pytest
import torch

from tplightning._lightning import pl  # the Lightning package the project's switch chose
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
