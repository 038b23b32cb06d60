"""A bug keeps its traceback even where a user's error is near: raised while a config error was being handled, from an
optimizer given wrong parameters, from a checkpoint migration, or from a misused collective."""
from __future__ import annotations

import functools

import pytest
import torch

import tplightning as tp
from tplightning.checkpoints import check_fits
from tplightning.cli import report
from tplightning.errors import ConfigError, short_message
from tplightning.rules.base import build_optimizer


def test_an_error_raised_while_handling_a_config_error_is_a_bug():
    def fn(args):
        try:
            raise ConfigError("lr must be > 0")
        except ConfigError:
            raise TypeError("a bug in the handler")

    with pytest.raises(TypeError, match="a bug in the handler"):
        report(fn, [])


def test_a_config_error_raised_from_is_still_short():
    try:
        try:
            raise ConfigError("lr must be > 0", option="--model.init_args.forward_optimizer.init_args.lr")
        except ConfigError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as err:
        assert short_message(err).startswith("error: --model.init_args.forward_optimizer.init_args.lr: lr must be > 0")


def test_bad_optimizer_settings_are_short_but_bad_parameters_are_a_bug():
    with pytest.raises(ConfigError, match="forward_optimizer: Invalid learning rate: -1.0"):
        build_optimizer("forward_optimizer", functools.partial(torch.optim.SGD, lr=-1.0), [torch.zeros(2, requires_grad=True)])
    with pytest.raises(TypeError) as info:
        build_optimizer("forward_optimizer", functools.partial(torch.optim.SGD, lr=0.1), [None])
    assert not isinstance(info.value, ConfigError)


def test_a_bug_in_a_checkpoint_migration_keeps_its_traceback(tmp_path):
    class Broken(tp.BP):
        def on_load_checkpoint(self, checkpoint):
            raise KeyError("a bug of the migration")

    rule = Broken(sizes=[3, 3, 2], forward_optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    ckpt = {"state_dict": rule.state_dict()}
    with pytest.raises(KeyError, match="a bug of the migration"):
        check_fits(rule, tmp_path / "x.ckpt", ckpt)


def test_a_checkpoint_naming_missing_code_says_so(tmp_path, monkeypatch):
    (tmp_path / "gone_module.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_module

    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "thing": gone_module.Thing()}, path)
    monkeypatch.delitem(__import__("sys").modules, "gone_module")
    (tmp_path / "gone_module.py").unlink()
    with pytest.raises(ConfigError, match="names code this installation does not have .*gone_module"):
        tp.checkpoints.read(path)


def test_a_lost_peer_is_one_line(capsys):
    def misuse(args):
        raise torch.distributed.DistBackendError("Connection closed by peer [127.0.0.1]:1234")

    with pytest.raises(SystemExit) as info:
        report(misuse, [])
    assert info.value.code == 1 and "a peer process died" in capsys.readouterr().err
