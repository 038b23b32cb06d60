"""Data finds its own place (issue 12, point 8): a user cache with download on, never a download in tests."""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import yaml

from tplightning.cli import report
from tplightning.config_files import CONFIG_DIR
from tplightning.data import mnist
from tplightning.data.mnist import MNISTDataModule, default_data_dir, read_idx
from conftest import SHARED_DATA
from train import main

SHARED = SHARED_DATA
MNIST_CONFIGS = sorted((CONFIG_DIR / "mnist").glob("*.yaml")) + sorted((CONFIG_DIR / "cifar10").glob("*.yaml"))


@pytest.mark.parametrize("path", MNIST_CONFIGS, ids=lambda p: p.name)
def test_mnist_configs_use_the_cache_with_download_on(path):
    init = yaml.safe_load(path.read_text())["data"]["init_args"]
    assert init.get("data_dir") is None and init["download"] is True


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("TPLIGHTNING_DATA", str(tmp_path / "mine"))
    assert MNISTDataModule().data_dir == tmp_path / "mine"
    monkeypatch.delenv("TPLIGHTNING_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "tplightning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir() == Path.home().resolve() / ".cache" / "tplightning"


def test_missing_files_download_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TPLIGHTNING_DATA", str(tmp_path))
    asked = []

    def offline(url, dest):
        asked.append(dest)
        raise OSError("offline")

    monkeypatch.setattr(mnist, "download_file", offline)
    with pytest.raises(FileNotFoundError, match=r"^MNIST download failed: .*: OSError: offline\. MNIST files missing from .*point TPLIGHTNING_DATA"):
        MNISTDataModule().prepare_data()
    assert asked and all(d.parent == tmp_path / "MNIST" / "raw" for d in asked)
    monkeypatch.setenv("TPLIGHTNING_NO_DOWNLOAD", "1")
    asked.clear()
    with pytest.raises(FileNotFoundError, match=r"downloads are switched off by TPLIGHTNING_NO_DOWNLOAD=1"):
        MNISTDataModule().prepare_data()
    assert not asked


def test_truncated_file_names_itself_and_the_fix(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    bad = raw / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(bytes(range(256)) * 40)[:300])  # cut off mid-stream
    with pytest.raises(ValueError, match=rf"MNIST file {bad} is truncated or corrupt .*; delete {bad} and run again with download: true"):
        read_idx(bad, 1)
    if not SHARED.joinpath("MNIST", "raw").is_dir():
        return
    for p in SHARED.joinpath("MNIST", "raw").iterdir():  # the other three files intact
        if p.name.endswith(".gz") and not p.name.startswith("train-labels"):
            (raw / p.name).write_bytes(p.read_bytes())
    with pytest.raises(SystemExit) as info:
        report(main, ["--config", "mnist/bp.yaml", "--data.init_args.data_dir", str(tmp_path), "--trainer.fast_dev_run", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"MNIST file {bad} is truncated or corrupt" in err and len(err.strip().splitlines()) <= 10


@pytest.mark.skipif(not SHARED.joinpath("MNIST", "raw").is_dir(), reason=f"no MNIST under {SHARED}")
def test_mnist_config_trains_from_the_cache_without_downloading():
    # the conftest points TPLIGHTNING_DATA at the shared folder (torchvision's layout) and refuses downloads
    out = main(["--config", "mnist/bp.yaml", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert out["cli"].datamodule.data_dir == SHARED.resolve()
    assert 0.0 <= out["test_metrics"]["test/acc"] <= 1.0
