"""The wheel is the library: built from the checkout it holds every config and no lab code (benchmarks/, experiments/),
and a fresh venv holding only the wheel trains a config by its bare name from a folder outside the checkout.

The new venv gets its dependencies (torch, Lightning, ...) from this test's environment through a ``.pth`` file that
names this environment's site-packages folders. A path line of a ``.pth`` file only extends ``sys.path``: the ``.pth``
files inside the named folders (an editable install's finder, a path to a checkout) are not run, so the checkout
cannot be imported there; the test checks where ``tplightning`` came from.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

# build outputs and run folders of a working checkout stay out of the copy the wheel is built from
COPY_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs", "out",
                                     "lightning_logs", ".venv", "venv")  # fmt: skip
# what would let the new venv see the checkout or another config folder
ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV", "TPLIGHTNING_CONFIGS")


def _setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a clean copy of the checkout (building in place would write build/ into it, and a stale
    build/lib/ from an older layout would end up in the wheel)."""
    src = tmp_path_factory.mktemp("src") / "tplightning"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)]
    if _setuptools_major() >= 77:  # pyproject's build requirement is here: no download
        cmd.insert(4, "--no-build-isolation")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (found,) = out.glob("tplightning-*.whl")
    return found


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A venv with the wheel installed (no dependencies), borrowing this environment's site-packages."""
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=False, symlinks=os.name != "nt")
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = _clean_env()
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, env=env).stdout.strip()  # fmt: skip
    ours = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    Path(purelib, "test-environment.pth").write_text("".join(f"{p}\n" for p in ours if Path(p).is_dir()))
    return root


def _clean_env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in ENV_DROP}, "OMP_NUM_THREADS": "1"}


def test_wheel_holds_the_configs_and_no_lab_code(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.removeprefix("tplightning/configs/") for n in names if n.startswith("tplightning/configs/"))
    configs = REPO / "tplightning" / "configs"
    assert shipped == sorted(p.relative_to(configs).as_posix() for p in configs.rglob("*.yaml"))
    assert {"dtp.yaml", "mnist/bp.yaml", "dynamics/two_phase.yaml", "trainer/debug.yaml"} <= set(shipped)
    assert {n.split("/")[0] for n in names} == {"tplightning", wheel.name.split("-py")[0] + ".dist-info"}
    assert [n for n in names if "benchmarks" in n or "experiments" in n] == []


def test_fresh_venv_trains_a_config_by_bare_name_from_another_folder(fresh_venv, tmp_path):
    bindir = fresh_venv / ("Scripts" if os.name == "nt" else "bin")
    run = subprocess.run([str(bindir / "tplightning-train"), "--config", "dtp.yaml", "--trainer.max_epochs", "1", "--trainer.logger",
                          "false", "--trainer.enable_progress_bar", "false"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_clean_env())  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "test/mse" in run.stdout
    code = ("import sys, tplightning, tplightning.config_files as c; print(tplightning.__file__); print(c.CONFIG_DIR); "
            "print(*sys.path, sep='\\n')")  # fmt: skip
    where = subprocess.run([str(bindir / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env=_clean_env()).stdout.splitlines()  # fmt: skip
    venv_root = fresh_venv.resolve()
    assert Path(where[0]).resolve().is_relative_to(venv_root), where[0]
    assert Path(where[1]).resolve() == Path(where[0]).resolve().parent / "configs"
    assert not [p for p in where[2:] if p and Path(p).resolve() == REPO], "the checkout is importable in the new venv"
