"""Checkpoints mean what they say (issue 12, points 1, 2, 6, 7).

1. ``last.ckpt`` is the end of the last finished epoch and resuming from it continues exactly;
2. a resumed run can change the optimizer hyper-parameters (``--reapply_optimizer_config``), is
   warned when a change would be ignored, and the divergence message's advice works;
6. ``predict_step`` takes ``(x, y)`` and ``x`` batches; the base class loads the recorded rule;
7. one run, one folder; ``validate``/``test`` of a checkpoint log next to it; integer
   ``limit_*_batches`` stay integers.
"""
from __future__ import annotations

import re

import shlex
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import tplightning as tp
from conftest import make_rule, quiet_trainer, tiny_data
from tplightning.__main__ import stock_cli
from tplightning.rules.base import DivergenceError
from train import main

QUIET = ["--trainer.enable_progress_bar", "false"]
LAST = Path("runs/dtp/version_0/checkpoints/last.ckpt")


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class StopAfterEpoch(tp._lightning.pl.Callback):
    """Ends a run (as an interruption would) after epoch ``epoch``."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_last_ckpt_is_the_last_epoch():
    # dtp.yaml's validation loss is best after epoch 0: Lightning's ModelCheckpoint left last.ckpt there
    out = main(["--config", "dtp.yaml", "--trainer.max_epochs", "3", "--test_on", "none", *QUIET])
    last = torch.load(LAST, weights_only=False)
    assert last["epoch"] == 2
    final = _state(out["cli"].model)
    assert last["state_dict"].keys() == final.keys()
    for k, v in final.items():
        torch.testing.assert_close(last["state_dict"][k], v, rtol=0, atol=0)
    best = [p.name for p in LAST.parent.iterdir() if p.name != "last.ckpt"]
    assert len(best) == 1 and best[0].startswith("epoch=0")  # the best checkpoint stays separate


def test_resume_from_last_ckpt_continues_exactly():
    run = ["--config", "dtp.yaml", "--trainer.max_epochs", "4", "--test_on", "none", *QUIET]
    main([*run, "--trainer.callbacks+=test_checkpoints.StopAfterEpoch"])  # interrupted after epoch 1 of 4
    assert torch.load(LAST, weights_only=False)["epoch"] == 1
    resumed = main([*run, "--ckpt_path", str(LAST)])
    straight = main(run)
    assert resumed["cli"].model.batches_seen == straight["cli"].model.batches_seen == 4 * 60
    for (k, a), b in zip(_state(resumed["cli"].model).items(), _state(straight["cli"].model).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_resume_override_is_warned_or_reapplied():
    main(["--config", "dtp.yaml", "--trainer.max_epochs", "1", "--test_on", "none", *QUIET])
    start = Path("start.ckpt")  # a copy outside the run folder: a resume from LAST would rewrite LAST itself
    shutil.copy(LAST, start)
    resume = ["--config", "dtp.yaml", "--trainer.max_epochs", "2", "--ckpt_path", str(start), "--test_on", "none", *QUIET]
    new_lr = ["--model.init_args.forward_optimizer.init_args.lr", "0.05"]
    with pytest.warns(UserWarning, match=r"forward_optimizer\.lr: config 0\.05, checkpoint 0\.1.*--reapply_optimizer_config true"):
        ignored = main([*resume, *new_lr])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*configured values\nare ignored|.*are ignored: ")  # nothing is ignored now
        applied = main([*resume, *new_lr, "--reapply_optimizer_config", "true"])
    plain = main(resume)
    opt = applied["cli"].trainer.optimizers[0]
    assert opt.param_groups[0]["initial_lr"] == 0.05
    # lr_final_factor 0.2 over max_epochs 2: the second (last) epoch runs at 0.2 of 0.05, and it stays there after it
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert ignored["cli"].trainer.optimizers[0].param_groups[0]["initial_lr"] == 0.1
    same = [torch.equal(a, b) for a, b in zip(_state(ignored["cli"].model).values(), _state(plain["cli"].model).values())]
    differ = [torch.equal(a, b) for a, b in zip(_state(applied["cli"].model).values(), _state(plain["cli"].model).values())]
    assert all(same) and not all(differ)


def test_divergence_advice_is_followed_and_the_run_finishes():
    args = ["--config", "dtp.yaml", "--trainer.max_epochs", "8", "--model.init_args.forward_optimizer.init_args.lr", "0.45", "--test_on", "none", *QUIET]
    with pytest.raises(DivergenceError, match=r"diverged at batch 72 \(epoch 1\)") as info:
        main(args)
    message = str(info.value)
    assert "--reapply_optimizer_config true" in message and f"--ckpt_path {LAST}" in message
    assert "No checkpoint was written after this step. To continue from the last good one" in message
    assert "resume from the last good one with --ckpt_path" not in message  # the library's hint, replaced by the command
    advice = shlex.split(re.split(r"python train\.py |tplightning-train ", message, maxsplit=1)[1])
    out = main(advice)
    model = out["cli"].model
    assert model.batches_seen == 8 * 60
    assert out["cli"].trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.045)
    assert all(torch.isfinite(v).all() for v in _state(model).values() if v.is_floating_point())


def test_divergence_before_any_checkpoint_says_so_once():
    args = ["--config", "dtp.yaml", "--model.init_args.forward_optimizer.init_args.lr", "5", "--test_on", "none", *QUIET]
    with pytest.raises(DivergenceError) as info:
        main(args)
    message = str(info.value)
    assert "non-finite tensors: none" in message
    assert message.endswith(". No checkpoint had been written yet: rerun with a smaller "
                            "learning rate (--model.init_args.forward_optimizer.init_args.lr) or target_stepsize.")  # fmt: skip
    assert message.count("checkpoint") == 1


def test_predict_takes_pairs_and_inputs():
    rule, dm = make_rule("DTPAI"), tiny_data()
    dm.setup("fit")
    x, y = dm.test_data.x[:8], dm.test_data.y[:8]
    loader_pairs = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    loader_x = torch.utils.data.DataLoader(x, batch_size=4)
    trainer = quiet_trainer()
    for loader in (loader_pairs, loader_x):
        out = torch.cat(trainer.predict(rule, loader))
        torch.testing.assert_close(out, rule(x))


def test_base_class_and_load_build_the_recorded_rule(tmp_path):
    rule, dm = make_rule("DTPAI"), tiny_data()
    trainer = quiet_trainer(enable_checkpointing=True, callbacks=[tp.Checkpoint(dirpath=tmp_path / "ckpt")])
    trainer.fit(rule, datamodule=dm)
    path = tmp_path / "ckpt" / "last.ckpt"
    for loaded in (tp.LearningRule.load_from_checkpoint(path), tp.load(path), tp.TargetPropRule.load_from_checkpoint(path)):
        assert type(loaded) is tp.DTPAI
        for (k, a), b in zip(_state(loaded).items(), _state(rule).values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    with pytest.raises(TypeError, match=r"holds a tplightning\.rules\.learned\.DTPAI, which is not a .*TPEI"):
        tp.TPEI.load_from_checkpoint(path)


def test_one_run_one_folder_and_eval_next_to_the_checkpoint():
    for _ in range(2):
        main(["--config", "dtp.yaml", "--trainer.max_epochs", "1", *QUIET])
    runs = Path("runs/dtp")
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    for v in runs.iterdir():
        names = {p.name for p in v.iterdir()}
        assert "metrics.csv" in names and any(n.startswith("events.out.tfevents") for n in names) and "checkpoints" in names
    saved = yaml.safe_load((runs / "version_1" / "config.yaml").read_text())
    assert [lg["init_args"]["version"] for lg in saved["trainer"]["logger"]] == [None, None]  # a rerun of it starts anew
    stock_cli(["test", "--config", "dtp.yaml", "--ckpt_path", str(LAST), *QUIET])
    stock_cli(["validate", "--config", "dtp.yaml", "--ckpt_path", str(LAST), *QUIET])
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    assert (runs / "version_0" / "test-last" / "metrics.csv").read_text().startswith("epoch,step,test/")
    assert (runs / "version_0" / "validate-last" / "metrics.csv").is_file()


def test_a_resumed_stock_fit_keeps_the_configured_values():
    # LightningCLI's fit overlays the checkpoint's hyper-parameters on the config; a resumed fit keeps the command's
    main(["--config", "dtp.yaml", "--trainer.max_epochs", "1", "--test_on", "none", *QUIET])
    cli = stock_cli(["fit", "--config", "dtp.yaml", "--trainer.max_epochs", "2", "--ckpt_path", str(LAST),
                     "--model.init_args.target_stepsize", "0.05", *QUIET])  # fmt: skip
    assert cli.model.target_stepsize == 0.05 and cli.trainer.current_epoch == 2


def test_integer_limit_batches_is_a_count():
    out = main(["--config", "dtp.yaml", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1", "--trainer.limit_train_batches=3", "--test_on", "none", *QUIET])
    trainer = out["cli"].trainer
    assert trainer.limit_val_batches == 1 and isinstance(trainer.limit_val_batches, int)
    assert trainer.num_val_batches == [1] and out["cli"].model.batches_seen == 3
