"""The training entry point: every config runs, names resolve, overrides apply, bad input is named."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

import tplightning as tp
from tplightning.config_files import CONFIG_DIR, resolve_config_args
from train import main

CONFIGS = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml") if p.parent == CONFIG_DIR)
QUIET = ["--trainer.enable_progress_bar", "false"]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_runs(config):
    out = main(["--config", config, "--trainer.fast_dev_run", "1", *QUIET])
    assert out["test_metrics"], "fit then test must produce test metrics"
    assert all(math.isfinite(v) for v in out["test_metrics"].values())


def test_configs_exist_for_the_thesis_rules():
    names = set(CONFIGS)
    for required in ("bp.yaml", "bp_fixed.yaml", "tp_ei.yaml", "rtp_ei.yaml", "rmtp_ei.yaml", "dtp.yaml", "tp_ai.yaml"):
        assert required in names


def test_bare_config_name_resolves_inside_configs():
    assert resolve_config_args(["--config", "bp.yaml"]) == ["--config", str(CONFIG_DIR / "bp.yaml")]
    assert resolve_config_args(["--config=trainer/debug.yaml"]) == ["--config", str(CONFIG_DIR / "trainer" / "debug.yaml")]
    existing = str(CONFIG_DIR / "dtp.yaml")
    assert resolve_config_args(["--config", existing, "--x", "1"]) == ["--config", existing, "--x", "1"]


def test_missing_config_lists_available():
    with pytest.raises(FileNotFoundError, match=r"'nope.yaml' not found.*available: .*bp\.yaml"):
        main(["--config", "nope.yaml"])


def test_unknown_model_key_is_named():
    with pytest.raises(argparse.ArgumentError, match="Option 'bogus' is not accepted"):
        main(["--config", "bp.yaml", "--model.init_args.bogus", "3"])


def test_unknown_trainer_key_is_named():
    with pytest.raises(argparse.ArgumentError, match="max_epochz"):
        main(["--config", "bp.yaml", "--trainer.max_epochz", "3"])


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        main(["--config", "bp.yaml", "--model.init_args.activation", "swish", "--trainer.fast_dev_run", "1"])


def test_sizes_that_do_not_fit_the_data():
    args = ["--config", "bp.yaml", "--trainer.callbacks", "[]", "--trainer.fast_dev_run", "1", *QUIET]
    with pytest.raises(ValueError, match=r"sizes\[0\]=5 does not match the data's input dimension 6"):
        main([*args, "--model.init_args.sizes", "[5, 6, 6]"])
    with pytest.raises(ValueError, match=r"sizes\[-1\]=3 does not match the data's output dimension 6"):
        main([*args, "--model.init_args.sizes", "[6, 6, 3]"])


def test_loss_must_fit_the_task():
    with pytest.raises(ValueError, match="loss='cross_entropy' does not fit the data's task 'regression'"):
        main(["--config", "bp.yaml", "--model.init_args.loss", "cross_entropy", "--trainer.fast_dev_run", "1", *QUIET])


def test_overrides_and_composition():
    out = main(
        ["--config", "dtp.yaml", "--config", "trainer/debug.yaml", "--model.init_args.target_stepsize", "0.05", *QUIET]
    )
    cli = out["cli"]
    assert isinstance(cli.model, tp.DTPAI)
    assert cli.model.target_stepsize == 0.05
    assert cli.trainer.max_epochs == 2  # from the fragment, which comes later
    assert cli.model.batches_seen == 2 * 10  # limit_train_batches of the fragment


def test_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "dtp.yaml", "--print_config"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "class_path: tplightning.DTPAI" in text and "target_stepsize: 0.1" in text


def test_train_py_is_the_cli_main():
    import train

    assert train.main is tp.cli.main
    assert Path(train.__file__).with_name("tplightning").joinpath("configs", "dtp.yaml").is_file()  # the packaged configs


def test_threads_default_to_one_for_small_dense_networks_and_follow_the_option():
    from tplightning.cli import default_threads
    from tplightning.layers import Conv2d, Dense

    assert default_threads(tp.BP(sizes=[784, 256, 256, 10])) == 1
    assert default_threads(tp.BP(sizes=[784, 2048, 10])) is None  # a 2048x784 weight has more than 2^20 entries
    cnn = [Conv2d([1, 8, 8], 2, kernel_size=3, padding=1, pool=2, activation="tanh"), Dense(32, 10, "linear")]
    assert default_threads(tp.BP(network=cnn)) is None
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        main(["--config", "bp.yaml", "--trainer.fast_dev_run", "1", "--test_on", "none", *QUIET])
        assert torch.get_num_threads() == 1
        main(["--config", "bp.yaml", "--trainer.fast_dev_run", "1", "--test_on", "none", "--threads", "2", *QUIET])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_negative_threads_are_named():
    with pytest.raises(ValueError, match=r"--threads must be >= 0 \(0: one per core\), got -1"):
        main(["--config", "bp.yaml", "--threads", "-1", "--trainer.fast_dev_run", "1", *QUIET])


def test_default_progress_bar_redraws_every_ten_batches():
    from tplightning.cli import build

    def bars(*extra):
        trainer = build(["--config", "dtp.yaml", "--trainer.fast_dev_run", "1", *extra]).trainer
        return [c.refresh_rate for c in trainer.callbacks if isinstance(c, tp._lightning.pl.callbacks.TQDMProgressBar)]

    assert bars() == [10]
    assert bars(*QUIET) == []
    assert bars("--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate", "3") == [3]  # a configured bar stays alone
