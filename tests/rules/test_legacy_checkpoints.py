"""Checkpoints written by tplightning 0.1 (the flag-based rules, before target maps were pieces) still load and resume.

``tests/data/legacy`` holds, per rule, a checkpoint after one epoch on tiny student-teacher data and the weights the
0.1 code reached when it resumed that checkpoint for a second epoch (made by running the 0.1 tree). Resuming with
today's code must reach the same weights: the keys are renamed (``net.weights.k``, ``feedback.k``, ``W_inv_i``,
``running_mean_j``) and AO-SDTP's full-width output matrix is split into trained rows and fixed auxiliary rows.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tplightning._lightning import pl  # the Lightning package the project's switch chose
import tplightning as tp
from conftest import FIXTURES, quiet_trainer

DATA = FIXTURES / "legacy"
SGD = functools.partial(torch.optim.SGD, lr=0.01)
RULES = {
    "DTPAI": (tp.DTPAI, {}), "TPEI": (tp.TPEI, {}), "AOSDTP": (tp.AOSDTP, {"aux_units": 2}),
    "MTP": (tp.MTP, {"forward_optimizer": functools.partial(torch.optim.SGD, lr=0.0005)}), "LeeDTP": (tp.LeeDTP, {}), "RDTPAI": (tp.RDTPAI, {}),
}  # fmt: skip


def _rule(name):
    cls, extra = RULES[name]
    kw = {"sizes": [6, 6, 6, 6], "forward_optimizer": SGD, **extra}
    if issubclass(cls, tp.LearnedInverseRule):
        kw["feedback_optimizer"] = SGD
    return cls(**kw)


@pytest.mark.parametrize("name", list(RULES))
def test_a_legacy_checkpoint_resumes_to_the_weights_the_old_code_reached(name):
    ref = torch.load(DATA / f"{name}.after2.pt")
    pl.seed_everything(0)
    rule = _rule(name)
    dm = tp.StudentTeacherDataModule(sizes=[6, 6, 6, 6], num_train=64, num_val=32, num_test=32, batch_size=8)
    quiet_trainer(max_epochs=2).fit(rule, datamodule=dm, ckpt_path=str(DATA / f"{name}.ckpt.pt"))
    for got, want in zip([layer.full_weight() for layer in rule.net.layers], ref["forward"]):  # AOSDTP: with its fixed rows
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(getattr(rule, "feedback_weights", []), ref.get("feedback", [])):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(rule(ref["x"]), ref["output"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["DTPAI", "TPEI", "AOSDTP", "MTP"])
def test_load_from_checkpoint_rebuilds_a_legacy_rule(name):
    cls = RULES[name][0]
    ckpt = torch.load(DATA / f"{name}.ckpt.pt", weights_only=False)
    rule = cls.load_from_checkpoint(DATA / f"{name}.ckpt.pt")
    W_last = ckpt["state_dict"][f"net.weights.{rule.num_layers - 1}"]
    torch.testing.assert_close(rule.forward_weights[-1], W_last[: rule.output_dim])
    if name == "AOSDTP":
        torch.testing.assert_close(rule.net.layers[-1].aux_weight, W_last[rule.output_dim :])
    if name == "TPEI":
        torch.testing.assert_close(rule.inverse(2), ckpt["state_dict"]["W_inv_2"])


def test_train_py_resumes_a_legacy_checkpoint(tmp_path, monkeypatch):
    # the CLI's check of a checkpoint against the configured rule goes through the same migrations as the load
    from train import main

    monkeypatch.chdir(tmp_path)
    out = main(["--config", "dtp.yaml", "--model.init_args.sizes", "[6,6,6,6]", "--data.init_args.sizes", "[6,6,6,6]",
                "--ckpt_path", str(DATA / "DTPAI.ckpt.pt"), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
                "--trainer.limit_val_batches", "1", "--test_on", "none", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert out["cli"].trainer.current_epoch == 2


def test_a_legacy_checkpoint_without_its_class_names_what_to_do():
    with pytest.raises(ValueError, match=r"records no tplightning rule class; load it with the rule's own class, e\.g\. tplightning\.DTPAI\.load_from_checkpoint"):
        tp.load(DATA / "DTPAI.ckpt.pt")
