"""``trainer/debug.yaml`` runs write into a run folder of their own, never into the current folder, and
``--test_on best`` tests the run's own best checkpoint (issue 29, finding 7)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tplightning.cli import report
from train import main

DEBUG = ["--config", "dtp.yaml", "--config", "trainer/debug.yaml", "--test_on", "best"]


def test_debug_runs_keep_out_of_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stale = tmp_path / "checkpoints" / "epoch=1-step=40.ckpt"  # what an earlier debug run left behind before
    stale.parent.mkdir()
    stale.write_bytes(b"stale")
    tested = []
    for run in range(2):
        trainer = main(DEBUG)["cli"].trainer
        folder = tmp_path / "runs" / "debug" / f"version_{run}"
        assert Path(trainer.log_dir).resolve() == folder
        assert (folder / "config.yaml").is_file() and (folder / "metrics.csv").is_file()
        assert Path(trainer.ckpt_path).resolve().parent == folder / "checkpoints"  # the tested weights: this run's best
        assert Path(trainer.ckpt_path) == Path(trainer.checkpoint_callback.best_model_path)
        tested.append(trainer.ckpt_path)
    assert tested[0] != tested[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "runs"] and stale.read_bytes() == b"stale"
    assert not (tmp_path / "config.yaml").exists()


def test_without_a_logger_debug_runs_write_under_runs_debug(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = main([*DEBUG, "--trainer.logger", "false"])["cli"].trainer
    assert Path(trainer.ckpt_path).resolve().parent == tmp_path / "runs" / "debug" / "checkpoints"
    assert (tmp_path / "runs" / "debug" / "config.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_best_without_a_checkpoint_of_its_own_is_a_short_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        report(main, [*DEBUG, "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[:2] == [
        "error: --test_on: this run wrote no best checkpoint of its own (no checkpoint callback with a monitor, or no "
        "validation); use --test_on final",
        "  given: best",
    ]
