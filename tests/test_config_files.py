"""Config lookup: a bare name resolves inside the package, a path is used as given, and the checkout's old form
``configs/NAME`` still finds the packaged ``NAME``."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import tplightning
from tplightning import config_files
from tplightning.config_files import CONFIG_DIR, available_configs, resolve_config_args
from tplightning.errors import ConfigError

PACKAGED = Path(tplightning.__file__).resolve().parent / "configs"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working folder outside the checkout, with nothing named configs/ in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_configs_are_package_data():
    if CONFIG_DIR != PACKAGED:
        pytest.skip("TPLIGHTNING_CONFIGS names another folder")
    names = available_configs()
    assert {"dtp.yaml", "bp.yaml", "mnist/bp.yaml", "dynamics/two_phase.yaml", "cifar10/bp.yaml", "trainer/ddp.yaml"} <= set(names)
    assert len(names) == len(list(PACKAGED.rglob("*.yaml"))) and names == sorted(names)


def test_bare_names_resolve_from_any_folder(elsewhere):
    assert resolve_config_args(["--config", "dtp.yaml", "--seed_everything", "3"]) == [
        "--config", str(CONFIG_DIR / "dtp.yaml"), "--seed_everything", "3"]  # fmt: skip
    assert resolve_config_args(["--config=mnist/bp.yaml"]) == ["--config", str(CONFIG_DIR / "mnist" / "bp.yaml")]


def test_the_checkout_form_configs_slash_name_still_resolves(elsewhere):
    assert resolve_config_args(["--config", "configs/dtp.yaml"]) == ["--config", str(CONFIG_DIR / "dtp.yaml")]
    assert resolve_config_args(["--config", "./configs/mnist/bp.yaml", "--config", "configs/trainer/debug.yaml"]) == [
        "--config", str(CONFIG_DIR / "mnist" / "bp.yaml"), "--config", str(CONFIG_DIR / "trainer" / "debug.yaml")]  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"'configs/nope.yaml' not found \(neither as a path nor in .*\); available: .*dtp\.yaml"):
        resolve_config_args(["--config", "configs/nope.yaml"])
    with pytest.raises(FileNotFoundError, match=r"'other/configs/dtp.yaml' not found"):  # only a leading configs/ is dropped
        resolve_config_args(["--config", "other/configs/dtp.yaml"])


def test_a_path_that_exists_wins_over_a_packaged_name(elsewhere):
    (elsewhere / "configs").mkdir()
    (elsewhere / "configs" / "dtp.yaml").write_text("seed_everything: 5\n")
    (elsewhere / "bp.yaml").write_text("seed_everything: 6\n")
    assert resolve_config_args(["--config", "configs/dtp.yaml", "--config", "bp.yaml"]) == [
        "--config", "configs/dtp.yaml", "--config", "bp.yaml"]  # fmt: skip


def test_bad_config_files_are_config_errors(elsewhere):
    (elsewhere / "list.yaml").write_text("- 1\n- 2\n")
    (elsewhere / "broken.yaml").write_text("model:\n  a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"^config file list.yaml holds a list; a config is a mapping"):
        resolve_config_args(["--config", "list.yaml"])
    with pytest.raises(ConfigError, match=r"^config file broken.yaml is not valid YAML: .* at line 3, column 1$"):
        resolve_config_args(["--config", "broken.yaml"])
    with pytest.raises(ConfigError, match=r"^config file configs is a folder"):
        (elsewhere / "configs").mkdir()
        resolve_config_args(["--config", "configs"])
    with pytest.raises(ConfigError, match=r"^--config needs a file name$"):
        resolve_config_args(["--x", "1", "--config"])


def test_the_environment_names_another_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "my_configs"
    folder.mkdir()
    (folder / "mine.yaml").write_text("seed_everything: 1\n")
    monkeypatch.setenv("TPLIGHTNING_CONFIGS", str(folder))
    try:
        moved = importlib.reload(config_files)
        assert moved.CONFIG_DIR == folder and moved.available_configs() == ["mine.yaml"]
        assert moved.resolve_config_args(["--config", "mine.yaml"]) == ["--config", str(folder / "mine.yaml")]
    finally:
        monkeypatch.delenv("TPLIGHTNING_CONFIGS")
        importlib.reload(config_files)
