"""A user's error prints a few exact lines and exits 2; a bug keeps its traceback.

User errors are told by their type (:mod:`tplightning.errors`): the parser's argument errors, ``ConfigError`` (the
option checks of constructors, data modules and the CLI), Lightning's ``MisconfigurationException`` and a missing
config or checkpoint file. Each short case checks the printed text of ``train.py``'s entry (through
:func:`tplightning.cli.report`): the option it is about, the value where one was given, at most ten lines, exit
status 2. Any other exception, in a constructor or inside ``training_step``, propagates with its traceback.
"""
from __future__ import annotations

import argparse
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tplightning as tp
from tplightning.__main__ import stock_cli
from tplightning.cli import report
from tplightning.errors import ConfigError
from train import main

from conftest import REPO
BASE = ["--config", "dtp.yaml", "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"]
HINT = "(add --traceback for the full traceback; --help lists the options, --model.help CLASS a class's)"
#: a case whose check is raised by a rule, layer or activation: short once those checks raise ConfigError; until then
#: the check's plain ValueError/TypeError propagates (a traceback, which this marker accepts and nothing else)


class TypeErrorInStep(tp.DTPAI):
    """A rule with a bug in ``training_step``."""

    def training_step(self, batch, batch_idx):
        return batch[0] + None  # TypeError: unsupported operand type(s) for +: 'Tensor' and 'NoneType'


class ValueErrorInInit(tp.DTPAI):
    """A rule whose constructor has a bug (a plain ValueError, not a check of an option)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        int("six")


class FileNotFoundInStep(tp.DTPAI):
    """A rule whose ``training_step`` reads a file that is not there (a bug, though a missing file while the run is
    being built is the user's)."""

    def training_step(self, batch, batch_idx):
        return Path("/nonexistent/tplightning/weights.pt").read_bytes()


class CheckedDTP(tp.DTPAI):
    """A rule with an option of its own, checked by its constructor."""

    def __init__(self, *args, warmup: int = 0, **kwargs):
        if warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {warmup}")
        super().__init__(*args, **kwargs)


def _printed(capsys, fn, args) -> str:
    with pytest.raises(SystemExit) as info:
        report(fn, list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 10, err
    assert "Traceback" not in err and "Namespace(" not in err and "NestedArg" not in err
    return err


def _train_py(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    env.pop("TPLIGHTNING_TRACEBACK", None)
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_type_error_in_training_step_keeps_its_traceback(tmp_path):
    proc = _train_py(*BASE, "--model", "test_errors.TypeErrorInStep", cwd=tmp_path)
    assert proc.returncode not in (0, 2), proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert "TypeError: unsupported operand type(s) for +: 'Tensor' and 'NoneType'" in proc.stderr
    assert "in training_step" in proc.stderr and "return batch[0] + None" in proc.stderr
    assert "\nerror: " not in "\n" + proc.stderr


def test_a_bug_raises_through_report_in_training_and_in_building():
    with pytest.raises(TypeError, match="unsupported operand"):
        report(main, [*BASE, "--model", "test_errors.TypeErrorInStep"])
    with pytest.raises(ValueError, match="invalid literal for int") as info:  # a plain ValueError of a constructor
        report(main, [*BASE, "--model", "test_errors.ValueErrorInInit"])
    assert not any(isinstance(e, ConfigError) for e in (info.value, info.value.__context__))
    with pytest.raises(FileNotFoundError, match="/nonexistent/tplightning/weights.pt"):
        report(main, [*BASE, "--model", "test_errors.FileNotFoundInStep"])


def test_a_divergence_prints_its_message_and_exits_1(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        report(main, ["--config", "dtp.yaml", "--model.init_args.forward_optimizer.init_args.lr", "5", "--test_on", "none",
                      "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert err.endswith("No checkpoint had been written yet: rerun with a smaller learning rate "
                        "(--model.init_args.forward_optimizer.init_args.lr) or target_stepsize."), err  # fmt: skip


def test_a_config_error_of_train_py_is_short_with_exit_2(tmp_path):
    proc = _train_py("--config", "dtp.yaml", "--model.init_args.target_stepsiz", "0.2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert lines == [
        "error: --model.init_args.target_stepsiz: tplightning.DTPAI has no argument 'target_stepsiz'",
        "  did you mean --model.init_args.target_stepsize?",
        "  given: 0.2",
        HINT,
    ], proc.stderr


def test_a_constructors_config_error_names_the_option(capsys):
    err = _printed(capsys, main, [*BASE, "--model", "test_errors.CheckedDTP", "--model.init_args.warmup", "-3"])
    assert err.splitlines()[:2] == ["error: --model.init_args.warmup: warmup must be >= 0, got -3", "  given: -3"], err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--model.init_args.nonexistent", "1"], r"^error: --model\.init_args\.nonexistent: tplightning\.DTPAI has no argument 'nonexistent'\n  given: 1\n"),
        (["--model", "tplightning.DTPIA"], r"^error: --model: module 'tplightning' has no attribute 'DTPIA'\n  did you mean tplightning\.DTPAI\?\n"),
        (["--data.init_args.batch_size", "0"], r"^error: --data\.init_args\.batch_size: batch sizes must be >= 1, got batch_size=0, eval_batch_size=1000\n  given: 0\n"),
        (["--model.init_args.target_stepsize", "abc"], r"^error: --model\.init_args\.target_stepsize: Expected a <class 'float'>\. Got value: abc\n"),
        (["--model.init_args.forward_optimizer.init_args.lr", "fast"], r"^error: --model\.init_args\.forward_optimizer\.init_args\.lr: Expected a <class 'float'>\. Got value: fast\n"),
        (["--seed_everything", "abc"], r"^error: --seed_everything: Expected a <class 'bool'>\. Got value: abc\n"),
        (["--model.init_args.sizes", "abc"], r"^error: --model\.init_args\.sizes: Expected a <class 'collections\.abc\.Sequence'>\. Got value: abc\n"),
        (["--trainer.max_epochs", "1.5"], r"^error: --trainer\.max_epochs: Expected a <class 'int'>\. Got value: 1\.5\n"),
        (["--trainer.max_epochz", "3"], r"^error: unrecognized arguments: --trainer\.max_epochz 3\n  did you mean --trainer\.max_epochs\?\n"),
        (["--model.init_args.forward_optimizer.init_args.lrr", "3"], r"^error: --model\.init_args\.forward_optimizer: Option 'lrr' is not accepted\n"),
        (["--test_on", "bst"], r"^error: --test_on: Expected a typing\.Literal\['final', 'best', 'none'\]\. Got value: bst\n"),
        (["--threads", "-1"], r"^error: --threads: --threads must be >= 0 \(0: one per core\), got -1\n"),
        (["--trainer.callbacks+=tplightning.InitNearTeacher", "--trainer.callbacks.distance", "-1"],
         r"^error: --trainer\.callbacks \(InitNearTeacher\): distance must be >= 0, got -1\.0\n"),
        (["--ckpt_path", "nowhere.ckpt"], r"^error: checkpoint nowhere\.ckpt not found\n"),
        pytest.param(["--model.init_args.target_stepsize", "-1"], r"^error: --model\.init_args\.target_stepsize: target_stepsize must be > 0, got -1\.0\n  given: -1\.0\n"),
        pytest.param(["--model.init_args.output_activation", "softmaxx"], r"^error: --model\.init_args\.output_activation: unknown activation 'softmaxx'; expected one of .*\n  given: softmaxx\n"),
        pytest.param(["--data.init_args.teacher_activation", "swish"], r"^error: --data\.init_args\.teacher_activation: unknown activation 'swish'.*\n  given: swish\n"),
        pytest.param(["--model.init_args.activation", "relu", "--model.init_args.sizes", "[6,6,6,6]", "--data.init_args.sizes", "[6,6,6,6]"],
                     r"^error: --model\.init_args\.activation: layer 2 activation ReLU\(\) has no inverse.*\n  given: relu\n"),
    ],
)
def test_config_errors_are_short_and_name_the_option(capsys, extra, expected):
    err = _printed(capsys, main, [*BASE, *extra])
    assert re.search(expected, err + "\n"), err
    assert err.endswith(HINT)


def test_a_missing_config_is_short(capsys):
    err = _printed(capsys, main, ["--config", "nope.yaml"])
    assert re.search(r"^error: config file 'nope\.yaml' not found \(neither as a path nor in .*\); (did you mean [\w/]+\.yaml\? )?available: .*dtp\.yaml", err), err


def test_lightning_misconfiguration_is_short(capsys):
    # the configs name a checkpoint callback; turning checkpoints off beside it is Lightning's MisconfigurationException
    err = _printed(capsys, main, [*BASE, "--trainer.enable_checkpointing", "false"])
    assert re.search(r"^error: .*enable_checkpointing=False.*ModelCheckpoint", err), err


def test_stock_cli_errors_are_short_too(capsys):
    err = _printed(capsys, stock_cli, ["fit", *BASE, "--model.init_args.nonexistent", "1"])
    assert err.startswith("error: --model.init_args.nonexistent: tplightning.DTPAI has no argument 'nonexistent'"), err
    err = _printed(capsys, stock_cli, ["fit", *BASE, "--trainer.max_epochz", "1"])
    assert "  did you mean --trainer.max_epochs?" in err.splitlines(), err


def test_yaml_error_names_the_file(capsys, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("trainer:\n  max_epochs: [1\n  foo: 2\n")
    err = _printed(capsys, main, ["--config", "dtp.yaml", "--config", str(bad)])
    assert err.startswith(f"error: config file {bad} is not valid YAML: ") and "at line 3, column 6" in err


def test_traceback_switch_raises_the_original_error(monkeypatch):
    with pytest.raises(argparse.ArgumentError, match="Option 'nonexistent' is not accepted"):
        report(main, [*BASE, "--model.init_args.nonexistent", "1", "--traceback"])
    monkeypatch.setenv("TPLIGHTNING_TRACEBACK", "1")
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        report(main, [*BASE, "--data.init_args.batch_size", "0"])


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
        ("max_epochs: 3\n", r"^error: Option 'max_epochs' is not accepted\n  a config has the top-level key 'max_epochs'; did you mean max_epochs: under trainer:\?\n"),
        ("model: 3\n", r"^error: --model: Not a valid subclass of LearningRule\. Got value: 3\n"),
    ],
)
def test_a_config_key_in_the_wrong_place_is_named(capsys, tmp_path, content, expected):
    path = tmp_path / "extra.yaml"
    path.write_text(content)
    err = _printed(capsys, main, ["--config", "dtp.yaml", "--config", str(path)])
    assert re.search(expected, err + "\n"), err


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
