"""Configuration errors print a few exact lines and exit 2 (issue 12, point 3).

Each case checks the printed text of ``train.py``'s entry (:func:`tplightning.cli.run`, here
through :func:`tplightning.cli.report`): the option path, the value given, what is expected, a close
match for a misspelt name, at most ten lines, exit status 2; ``--traceback`` gives the exception.
"""
from __future__ import annotations

import argparse
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tplightning.__main__ import stock_cli
from tplightning.cli import report
from train import main

from conftest import REPO
BASE = ["--config", "dtp.yaml", "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"]


def _printed(capsys, fn, args) -> str:
    with pytest.raises(SystemExit) as info:
        report(fn, list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 10, err
    assert "Traceback" not in err and "Namespace(" not in err and "NestedArg" not in err
    return err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--model.init_args.nonexistent", "1"], r"error: --model\.init_args\.nonexistent: tplightning\.DTPAI has no argument 'nonexistent'.*\n  given: 1"),
        (["--model.init_args.target_stepsiz", "0.2"], r"did you mean --model\.init_args\.target_stepsize\?\n  given: 0\.2"),
        (["--model", "tplightning.DTPIA"], r"error: --model: tplightning\.DTPIA does not exist; did you mean tplightning\.DTPAI\?"),
        (["--model.init_args.target_stepsize", "0"], r"error: --model\.init_args\.target_stepsize: target_stepsize must be > 0, got 0\.0\n  given: 0"),
        (["--data.init_args.batch_size", "0"], r"error: --data\.init_args\.batch_size: batch sizes must be >= 1, got batch_size=0"),
        (["--model.init_args.target_stepsize", "abc"], r"error: --model\.init_args\.target_stepsize: expected a float\n  given: abc"),
        (["--model.init_args.forward_optimizer.init_args.lr", "fast"], r"error: --model\.init_args\.forward_optimizer\.init_args\.lr: expected a float\n  given: fast"),
        (["--seed_everything", "abc"], r"error: --seed_everything: expected an integer seed, or true or false\n  given: abc"),
        (["--model.init_args.sizes", "abc"], r"error: --model\.init_args\.sizes: expected a list\n  given: abc"),
        (["--trainer.max_epochs", "1.5"], r"error: --trainer\.max_epochs: expected an integer\n  given: 1\.5"),
        (["--model.init_args.output_activation", "softmaxx"], r"error: --model\.init_args\.output_activation: unknown activation 'softmaxx'; expected one of .*\n  given: softmaxx"),
        (["--data.init_args.teacher_activation", "swish"], r"error: --data\.init_args\.teacher_activation: unknown activation 'swish'.*\n  given: swish"),
        (["--trainer.max_epochz", "3"], r"error: unknown option --trainer\.max_epochz \(value '3'\)\n  did you mean --trainer\.max_epochs\?"),
        (["--model.init_args.forward_optimizer.init_args.lrr", "3"], r"torch\.optim\.SGD has no argument 'lrr'; did you mean --model\.init_args\.forward_optimizer\.init_args\.lr\?"),
        (
            ["--model.init_args.activation", "relu", "--model.init_args.sizes", "[6,6,6,6]", "--data.init_args.sizes", "[6,6,6,6]"],
            r"error: --model\.init_args\.activation: layer 2 activation ReLU\(\) has no inverse.*\n  given: relu",
        ),
    ],
)
def test_config_errors_are_short_and_exact(capsys, extra, expected):
    err = _printed(capsys, main, [*BASE, *extra])
    assert re.search(expected, err), err
    assert err.endswith("--traceback for the full traceback; --help lists the options, --model.help CLASS a class's)")


def test_lightning_misconfiguration_is_short(capsys):
    # the configs name a checkpoint callback; turning checkpoints off beside it is Lightning's MisconfigurationException
    err = _printed(capsys, main, [*BASE, "--trainer.enable_checkpointing", "false"])
    assert re.search(r"^error: .*enable_checkpointing=False.*ModelCheckpoint", err), err


def test_stock_cli_errors_are_short_too(capsys):
    err = _printed(capsys, stock_cli, ["fit", *BASE, "--model.init_args.nonexistent", "1"])
    assert err.startswith("error: --model.init_args.nonexistent: tplightning.DTPAI has no argument 'nonexistent'")


def test_yaml_error_names_the_file(capsys, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("trainer:\n  max_epochs: [1\n  foo: 2\n")
    err = _printed(capsys, main, ["--config", "dtp.yaml", "--config", str(bad)])
    assert err.startswith(f"error: config file {bad} is not valid YAML: ") and "at line 3, column 6" in err


def test_traceback_switch_raises_the_original_error():
    with pytest.raises(argparse.ArgumentError, match="Option 'nonexistent' is not accepted"):
        report(main, [*BASE, "--model.init_args.nonexistent", "1", "--traceback"])


def test_train_py_exits_2_with_a_short_message(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "train.py"), "--config", "dtp.yaml", "--model", "tplightning.DTPIA"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) <= 10, proc.stderr
    assert "did you mean tplightning.DTPAI?" in proc.stderr


def test_python_m_tplightning_exits_2_with_a_short_message(capsys, monkeypatch):
    import runpy

    monkeypatch.setattr(sys, "argv", ["tplightning", "fit", "--config", "dtp.yaml", "--model", "tplightning.DTPIA"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("tplightning", run_name="__main__")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) <= 10 and "did you mean tplightning.DTPAI?" in err


# ----------------------------------------------------------------------------- files: checkpoints and configs
@pytest.fixture(scope="module")
def dtp_checkpoint(tmp_path_factory) -> Path:
    """A real ``last.ckpt`` of ``dtp.yaml`` (DTP-AI, 6-6-6), two batches of training."""
    folder = tmp_path_factory.mktemp("ckpt")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        main(["--config", "dtp.yaml", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
              "--trainer.limit_val_batches", "1", "--test_on", "none", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    finally:
        os.chdir(cwd)
    return folder / "runs" / "dtp" / "version_0" / "checkpoints" / "last.ckpt"


def _bad_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    text = tmp_path / "notes.ckpt"
    text.write_text("hello\n")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:3000])
    plain = tmp_path / "plain.ckpt"
    import torch

    torch.save({"a": torch.zeros(2)}, plain)
    return {"text": text, "truncated": truncated, "plain": plain, "folder": good.parent}


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("text", r"checkpoint .*notes\.ckpt cannot be read: not a PyTorch checkpoint, or truncated or corrupt"),
        ("truncated", r"checkpoint .*truncated\.ckpt cannot be read: .*zip archive"),
        ("plain", r"checkpoint .*plain\.ckpt is not a Lightning checkpoint \(it holds no state_dict\)"),
        ("folder", r"checkpoint .*checkpoints is a folder; give a \.ckpt file in it \(.*last\.ckpt\)"),
    ],
)
def test_a_bad_checkpoint_file_is_named(capsys, tmp_path, dtp_checkpoint, kind, expected):
    bad = _bad_files(tmp_path, dtp_checkpoint)[kind]
    for fn, args in ((main, ["--config", "dtp.yaml"]), (stock_cli, ["test", "--config", "dtp.yaml"])):
        err = _printed(capsys, fn, [*args, "--ckpt_path", str(bad)])
        assert re.search("^error: " + expected, err), err
    import tplightning as tp

    with pytest.raises(ValueError, match=expected):
        tp.load(bad)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--config", "bp.yaml"], r"was written by tplightning\.rules\.learned\.DTPAI, but the model is tplightning\.rules\.backprop\.BP; use the config of the run that wrote it"),
        (["--config", "dtp.yaml", "--model.init_args.sizes", "[6,8,6]", "--data.init_args.sizes", "[6,8,6]"],
         r"does not fit the configured DTPAI: net\.layers\.0\.weight is \[6, 6\] there and \[8, 6\] here \(the config differs from the run that wrote it\)"),
        (["--config", "dtp.yaml", "--model.init_args.batch_norm", "true"],
         r"does not fit the configured DTPAI: it lacks normalization\.running_mean_0, normalization\.running_var_0 and 2 more \(the config"),
    ],
)
def test_a_checkpoint_of_another_rule_or_network_is_refused(capsys, dtp_checkpoint, extra, expected):
    err = _printed(capsys, main, [*extra, "--trainer.max_epochs", "2", "--ckpt_path", str(dtp_checkpoint)])
    assert re.search(expected, err), err


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", r"holds nothing; a config is a mapping of options"),
        ("- a\n- b\n", r"holds a list; a config is a mapping of options"),
        (b"\x80\x81binary", r"is not a text file \(a YAML config was expected\)"),
        (None, r"is a folder; give a YAML file"),
    ],
)
def test_a_config_that_is_no_mapping_is_named(capsys, tmp_path, content, expected):
    path = tmp_path / "extra.yaml"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    err = _printed(capsys, main, ["--config", "dtp.yaml", "--config", str(path)])
    assert re.search(f"^error: config file {re.escape(str(path))} " + expected, err), err


def test_python_m_tplightning_asks_for_the_subcommand_first(capsys):
    err = _printed(capsys, stock_cli, ["--config", "dtp.yaml", "--trainer.max_epochs", "1"])
    assert err.startswith("error: python -m tplightning needs a subcommand (fit, validate, test, predict) before the options")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("max_epochs: 3\n", r"has a top-level key 'max_epochs', which is no option; did you mean max_epochs: under trainer:\?"),
        ("model: 3\n", r"^error: --model: expected a class path \(such as tplightning\.DTPAI\) or a mapping with class_path: and init_args:\n  given: 3"),
    ],
)
def test_a_config_key_in_the_wrong_place_is_named(capsys, tmp_path, content, expected):
    path = tmp_path / "extra.yaml"
    path.write_text(content)
    err = _printed(capsys, main, ["--config", "dtp.yaml", "--config", str(path)])
    assert re.search(expected, err), err


@pytest.mark.parametrize("base", ["tplightning.LearningRule", "tplightning.TargetPropRule"])
def test_a_base_class_is_no_rule(capsys, base):
    err = _printed(capsys, main, [*BASE, "--model", base])
    name = base.rsplit(".", 1)[1]
    assert err.startswith(f"error: --model: {name} is a base of the rules, not a rule; choose a rule such as tplightning.DTPAI"), err


@pytest.mark.parametrize("which", ["forward", "feedback"])
def test_a_negative_learning_rate_names_its_optimizer(capsys, which):
    err = _printed(capsys, main, [*BASE, f"--model.init_args.{which}_optimizer.init_args.lr", "-0.1"])
    assert err.startswith(f"error: {which}_optimizer: Invalid learning rate: -0.1"), err


def test_lightnings_own_checkpoint_names_are_left_to_lightning(tmp_path, monkeypatch):
    # "last" is resolved by Lightning from the checkpoint callback's folder, not a file the CLI could check
    monkeypatch.chdir(tmp_path)
    run = ["--config", "dtp.yaml", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--test_on", "none",
           "--trainer.enable_progress_bar", "false"]  # fmt: skip
    main([*run, "--trainer.max_epochs", "1"])
    out = main([*run, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert out["cli"].trainer.current_epoch == 2
