"""Resuming: ``--ckpt_path last`` and one folder per run (issue 28, item 3); checkpoints that bring their optimizers
back (issue 29, item 3); ``max_steps`` that counts batches and a resume after it that is exact (issue 29, item 4)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

import tplightning as tp
from conftest import RULES, make_rule, quiet_trainer, tiny_data
from tplightning._lightning import pl
from tplightning.errors import ConfigError
from train import main

QUIET = ["--trainer.enable_progress_bar", "false"]
RUNS = Path("runs/dtp")


def _last(version: int) -> Path:
    return RUNS / f"version_{version}" / "checkpoints" / "last.ckpt"


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_ckpt_path_last_without_a_run_is_a_short_error():
    with pytest.raises(ConfigError, match=r"^--ckpt_path last: no runs/dtp/version_\*/checkpoints/last\.ckpt to resume from"):
        main(["--config", "dtp.yaml", "--ckpt_path", "last", "--test_on", "none", *QUIET])
    assert not RUNS.exists() or list(RUNS.iterdir()) == []  # no run was started


def test_ckpt_path_last_takes_the_newest_run_and_continues_in_its_folder(capsys):
    run = ["--config", "dtp.yaml", "--test_on", "none", *QUIET]
    main([*run, "--trainer.max_epochs", "1"])
    main([*run, "--trainer.max_epochs", "1"])
    capsys.readouterr()
    out = main([*run, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert f"--ckpt_path last: resuming from {_last(1)}" in capsys.readouterr().err
    assert out["cli"].model.batches_seen == 2 * 60
    assert sorted(p.name for p in RUNS.iterdir()) == ["version_0", "version_1"]  # no new folder
    assert torch.load(_last(1), weights_only=False)["epoch"] == 1
    assert torch.load(_last(0), weights_only=False)["epoch"] == 0
    # version_0's last.ckpt made the newest: it is taken, and that run continues in version_0
    future = _last(1).stat().st_mtime + 100
    os.utime(_last(0), (future, future))
    main([*run, "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    assert f"resuming from {_last(0)}" in capsys.readouterr().err
    assert sorted(p.name for p in RUNS.iterdir()) == ["version_0", "version_1"]
    assert torch.load(_last(0), weights_only=False)["epoch"] == 2
    lines = (RUNS / "version_0" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,") and len(lines) > 2


def test_a_resume_from_a_run_folder_keeps_its_version():
    run = ["--config", "dtp.yaml", "--test_on", "none", *QUIET]
    main([*run, "--trainer.max_epochs", "1"])
    for epochs in (2, 3):  # resumed twice: one run, one folder
        main([*run, "--trainer.max_epochs", str(epochs), "--ckpt_path", str(_last(0))])
    assert sorted(p.name for p in RUNS.iterdir()) == ["version_0"]
    assert torch.load(_last(0), weights_only=False)["epoch"] == 2
    rows = (RUNS / "version_0" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,train/loss,train/loss_epoch,val/loss,val/mse"
    assert sorted({r.split(",")[0] for r in rows[1:]}) == ["0", "1", "2"]  # every epoch's rows, the first run's kept
    assert [r.split(",")[1] for r in rows[1:] if r.split(",")[3]] == ["59", "119", "179"]  # train/loss_epoch per epoch


class StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


ADAMW = functools.partial(torch.optim.AdamW, lr=0.003, weight_decay=0.05)


def _bp() -> tp.BP:
    torch.manual_seed(3)
    return tp.BP(sizes=[6, 6, 6], forward_optimizer=ADAMW)


def test_load_rebuilds_the_optimizer_and_the_fit_continues_exactly(tmp_path):
    folder = tmp_path / "ckpt"
    trainer = quiet_trainer(max_epochs=2, enable_checkpointing=True,
                            callbacks=[tp.Checkpoint(dirpath=folder, save_top_k=0), StopAfterEpoch(0)])  # fmt: skip
    trainer.fit(_bp(), datamodule=tiny_data())
    last = folder / "last.ckpt"
    loaded = tp.load(last)
    assert loaded.forward_optimizer.func is torch.optim.AdamW
    assert loaded.forward_optimizer.keywords == {"lr": 0.003, "weight_decay": 0.05}
    (opt,) = loaded.build_optimizers()
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 0.003 and opt.defaults["weight_decay"] == 0.05
    resumed = tp.load(last)
    quiet_trainer(max_epochs=2).fit(resumed, datamodule=tiny_data(), ckpt_path=last)
    straight = _bp()
    quiet_trainer(max_epochs=2).fit(straight, datamodule=tiny_data())
    assert resumed.batches_seen == straight.batches_seen == 2 * 8
    _assert_same(resumed, straight)


def test_load_of_a_cli_run_brings_its_optimizers_back():
    main(["--config", "dtp.yaml", "--trainer.max_epochs", "1", "--test_on", "none", *QUIET])
    loaded = tp.load(_last(0))
    forward, feedback = loaded.build_optimizers()
    assert type(forward) is torch.optim.SGD and forward.defaults["lr"] == 0.1
    assert type(feedback) is torch.optim.SGD and feedback.defaults["lr"] == 0.01
    assert tp.load(_last(0), forward_optimizer=ADAMW).build_optimizers()[0].defaults["lr"] == 0.003  # an override wins


def test_max_steps_counts_batches():
    out = main(["--config", "dtp.yaml", "--trainer.max_steps", "30", "--test_on", "none", *QUIET])
    assert out["cli"].model.batches_seen == 30 and out["cli"].trainer.global_step == 30
    assert torch.load(_last(0), weights_only=False)["global_step"] == 30


def test_max_steps_counts_batches_for_every_rule():
    trained = {}
    for name in RULES:
        rule = make_rule(name)
        trainer = quiet_trainer(max_epochs=-1, max_steps=11)  # 8 batches per epoch: the stop falls in epoch 1
        trainer.fit(rule, datamodule=tiny_data())
        trained[name] = (rule.batches_seen, trainer.global_step)
    assert trained == {name: (11, 11) for name in RULES}


#: a feedback schedule with every kind of state: every 2nd batch, 3 updates decaying to 1 over an epoch, a stopping rule
#: (plateau) whose running mean and rests cross the checkpoint
SCHEDULE = ["--model.init_args.feedback_schedule", '{"class_path": "tplightning.FeedbackSchedule", "init_args": '
            '{"every": 2, "iterations": 3, "final_iterations": 1, "decay_epochs": 1, "plateau": 0.0, "rest": 1}}']


@pytest.mark.parametrize("end, schedule", [(30, []), (90, []), (90, SCHEDULE)], ids=["30", "90", "90-feedback-schedule"])
def test_a_resume_after_a_max_steps_stop_is_exact(end, schedule):
    """Within the stopped epoch, and across the next epoch's boundary; with a feedback schedule too."""
    run = ["--config", "dtp.yaml", "--test_on", "none", *QUIET, *schedule]
    main([*run, "--trainer.max_steps", "20"])
    assert torch.load(_last(0), weights_only=False)["global_step"] == 20
    resumed = main([*run, "--trainer.max_steps", str(end), "--ckpt_path", str(_last(0))])
    straight = main([*run, "--trainer.max_steps", str(end)])
    assert resumed["cli"].model.batches_seen == straight["cli"].model.batches_seen == end
    _assert_same(resumed["cli"].model, straight["cli"].model)
    if schedule:
        state = straight["cli"].model.schedule_state
        assert resumed["cli"].model.schedule_state == state and state["mean"] > 0  # the stopping rule measured
    lr = [o.param_groups[0]["lr"] for out in (resumed, straight) for o in out["cli"].trainer.optimizers[:1]]
    assert lr[0] == lr[1] == (0.1 if end == 30 else 0.1 * (1 - 0.8 / 59))  # 60 epochs down to 0.2: one step taken


def _dtpai(max_steps: int, folder, ckpt=None, callback=tp.Checkpoint):
    pl.seed_everything(0, verbose=False)
    rule = tp.DTPAI(sizes=[6, 6, 6], forward_optimizer=functools.partial(torch.optim.SGD, lr=0.05), lr_final_factor=0.2)
    data = tp.StudentTeacherDataModule(sizes=[6, 6, 6], num_train=256, num_val=32, num_test=32, batch_size=32)
    trainer = quiet_trainer(max_epochs=3, max_steps=max_steps, enable_checkpointing=True, num_sanity_val_steps=0,
                            callbacks=[callback(dirpath=folder, save_last=True)])  # fmt: skip
    trainer.fit(rule, datamodule=data, ckpt_path=ckpt)
    return rule, trainer


@pytest.mark.parametrize("callback", [tp.Checkpoint, pl.callbacks.ModelCheckpoint], ids=["Checkpoint", "ModelCheckpoint"])
def test_a_max_steps_stop_resumed_to_the_max_epochs_end_trains_every_epoch(tmp_path, callback):
    # 8 batches per epoch, 3 epochs; the stop after 12 batches cuts epoch 1 in half
    _dtpai(12, tmp_path / "cut", callback=callback)
    resumed, trainer = _dtpai(-1, tmp_path / "resumed", ckpt=tmp_path / "cut" / "last.ckpt", callback=callback)
    straight, _ = _dtpai(-1, tmp_path / "straight", callback=callback)
    assert resumed.batches_seen == straight.batches_seen == 24 and trainer.current_epoch == 3
    lr = [t.optimizers[0].param_groups[0]["lr"] for t in (trainer, straight.trainer)]
    assert lr == [pytest.approx(0.01, rel=1e-12)] * 2  # 0.05 * 0.2 after the 2 steps of a 3-epoch schedule
    _assert_same(resumed, straight)


def test_a_resume_within_the_cut_epoch_is_exact_with_a_plain_model_checkpoint(tmp_path):
    _dtpai(12, tmp_path / "cut", callback=pl.callbacks.ModelCheckpoint)
    ckpt = tmp_path / "cut" / "last.ckpt"
    resumed, _ = _dtpai(14, tmp_path / "resumed", ckpt=ckpt, callback=pl.callbacks.ModelCheckpoint)
    straight, _ = _dtpai(14, tmp_path / "straight", callback=pl.callbacks.ModelCheckpoint)
    assert resumed.batches_seen == straight.batches_seen == 14
    _assert_same(resumed, straight)


def test_an_optimizer_that_cannot_be_recorded_is_named_on_load(tmp_path):
    rule = tp.BP(sizes=[6, 6, 6], forward_optimizer=lambda params: torch.optim.SGD(params, lr=0.2))
    trainer = quiet_trainer(enable_checkpointing=True, callbacks=[tp.Checkpoint(dirpath=tmp_path, save_top_k=0)])
    trainer.fit(rule, datamodule=tiny_data())
    with pytest.warns(UserWarning, match=r"forward_optimizer was not an optimizer class or a partial of one, so it was "
                                         r"not recorded; the loaded rule has its default forward_optimizer"):
        loaded = tp.load(tmp_path / "last.ckpt")
    assert loaded.forward_optimizer is torch.optim.SGD
