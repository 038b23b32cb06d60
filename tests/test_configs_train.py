"""Every shipped config trains (issue 12, points 9 and 10).

The student-teacher configs are the packaged ``tplightning/configs/*.yaml`` and chapter 6's ``dynamics/*.yaml``; the
MNIST ones ``mnist/*.yaml`` and ``dynamics/mnist_*.yaml``. (The CIFAR-10 configs need data this project's
machines cannot fetch; ``tests/data`` checks their loader on fake files.)

CI: one epoch of every config at three seeds (the three batch-size-1 configs and the MNIST configs,
on a 2000-image subset, at seed 0). ``-m slow``: every student-teacher config's full schedule at seeds 0-4,
one full MNIST epoch of every MNIST config, the full schedule of the MNIST dynamics configs at seeds 0-4,
the README's MNIST quick-start number at seeds 0-4, the thesis' ordering of the rules (section 5.2.2:
BP < DTP-AI < BP-fixed, difference targets no worse than plain ones) and of chapter 6's networks
(section 6.8). The 100-epoch MNIST schedules are the campaign's (``benchmarks.mnist``).

"Seed k" gives every random source of a run the seed k, as the student-teacher benchmark does:
``seed_everything``, the teacher and the inputs, the shuffling, the student's draw near its
teacher, the randomized rules' layer draws and the feedback noise.
"""
from __future__ import annotations

import json
import math
import statistics

import pytest
import yaml

import tplightning as tp
from tplightning.config_files import CONFIG_DIR
from train import main

DYNAMICS = sorted(f"dynamics/{p.name}" for p in (CONFIG_DIR / "dynamics").glob("*.yaml"))
# the student-teacher configs: the thesis' rules and chapter 6's dynamical networks
ROOT_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) + [c for c in DYNAMICS if "mnist" not in c]
MNIST_CONFIGS = sorted(f"mnist/{p.name}" for p in (CONFIG_DIR / "mnist").glob("*.yaml")) + [c for c in DYNAMICS if "mnist" in c]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--test_on", "final"]


def seed_args(config: str, seed: int) -> list[str]:
    cfg = yaml.safe_load((CONFIG_DIR / config).read_text())
    rule = getattr(tp, cfg["model"]["class_path"].rsplit(".", 1)[1])
    data = cfg["data"]["class_path"].rsplit(".", 1)[1]
    s = str(seed)
    args = ["--seed_everything", s, "--data.init_args.shuffle_seed", s]
    args += ["--data.init_args.teacher_seed", s] if data != "MNISTDataModule" else ["--data.init_args.split_seed", s]
    callbacks = [
        {**cb, "init_args": {**cb.get("init_args", {}), "seed": seed}}
        for cb in cfg["trainer"].get("callbacks", [])
        if cb["class_path"].rsplit(".", 1)[-1] == "InitNearTeacher"
    ]
    args += ["--trainer.callbacks", json.dumps(callbacks)]  # also drops the checkpoint callback
    if issubclass(rule, tp.TargetPropRule):
        args += ["--model.init_args.layer_seed", s]
    if issubclass(rule, (tp.LearnedInverseRule, tp.BRSF)):
        args += ["--model.init_args.feedback_seed", s]
    return args


def _run(config: str, seed: int, *extra: str) -> dict:
    out = main(["--config", config, *QUIET, *seed_args(config, seed), *extra])
    cli = out["cli"]
    assert cli.trainer.current_epoch == cli.trainer.max_epochs, f"{config} seed {seed} stopped early"
    assert out["test_metrics"] and all(math.isfinite(v) for v in out["test_metrics"].values())
    return out["test_metrics"]


# the exact-inverse configs of thesis 5.1.3 run batch size 1 (2000 batches an epoch): seed 0 here, all seeds in -m slow
BATCH_OF_ONE = [c for c in ROOT_CONFIGS if yaml.safe_load((CONFIG_DIR / c).read_text())["data"]["init_args"].get("batch_size") == 1]
ONE_EPOCH = [(c, s) for c in ROOT_CONFIGS for s in ((0,) if c in BATCH_OF_ONE else (0, 1, 2))]


@pytest.mark.parametrize("config, seed", ONE_EPOCH)
def test_one_epoch_of_every_config(config, seed, one_thread):
    _run(config, seed, "--trainer.max_epochs", "1")


MNIST_SMALL = ["--data.init_args.subset", "2000", "--data.init_args.num_train", "1500", "--data.init_args.num_val", "500",
               "--trainer.limit_test_batches", "1", "--trainer.max_epochs", "1"]  # fmt: skip


def _need_mnist() -> None:
    pytest.importorskip("tplightning.data.mnist")
    from tplightning.data.mnist import default_data_dir, find_files

    if None in find_files(default_data_dir()).values():
        pytest.skip(f"MNIST not in the data cache {default_data_dir()}")


@pytest.mark.parametrize("config", MNIST_CONFIGS)
def test_one_small_epoch_of_every_mnist_config(config, one_thread, seed=0):
    _need_mnist()
    _run(config, seed, *MNIST_SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("config", ROOT_CONFIGS)
def test_full_schedule_of_every_config(config, seed, one_thread):
    _run(config, seed)


@pytest.mark.slow
@pytest.mark.parametrize("config", MNIST_CONFIGS)
def test_one_full_mnist_epoch(config, one_thread):
    _need_mnist()
    metrics = _run(config, 0, "--trainer.max_epochs", "1")
    assert metrics["test/acc"] > 0.8  # one epoch of any rule on MNIST


@pytest.mark.slow
def test_thesis_ordering_of_the_rules(one_thread):
    """Thesis 5.2.2 (figs. 5.14-5.15): BP best, DTP-AI close behind, both far better than BP-fixed;
    difference targets (DTP-AI) no worse than plain ones (TP-AI). Medians over seeds 0-4."""
    mse = {c: statistics.median(_run(c, s)["test/mse"] for s in range(5)) for c in ("bp.yaml", "dtp.yaml", "tp_ai.yaml", "bp_fixed.yaml")}
    assert mse["bp.yaml"] < mse["dtp.yaml"] < mse["bp_fixed.yaml"], mse
    assert mse["dtp.yaml"] <= mse["tp_ai.yaml"], mse


@pytest.mark.slow
def test_mnist_quick_start_reads_what_the_readme_says(one_thread):
    """README, quick start: one epoch of ``mnist/bp.yaml`` tests at 95.3-96.0 % over seeds 0-4 here (kept to 94.5-96.5 %
    so that other CPUs' kernels pass)."""
    _need_mnist()
    acc = [_run("mnist/bp.yaml", s, "--trainer.max_epochs", "1")["test/acc"] for s in range(5)]
    print("mnist/bp.yaml, one epoch, test/acc at seeds 0-4:", [round(a, 4) for a in acc])
    assert all(0.945 <= a <= 0.965 for a in acc), acc


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("config", [c for c in MNIST_CONFIGS if c.startswith("dynamics/")])
def test_full_schedule_of_the_mnist_dynamics_configs(config, seed, one_thread):
    _need_mnist()
    assert _run(config, seed)["test/acc"] > 0.8


@pytest.mark.slow
def test_chapter_6_ordering_of_the_dynamical_networks(one_thread):
    """Section 6.8: with learned (imperfect) inverses the single-phase network fails, the two-phase network does not;
    the shipped single-phase learned config trains at a rate where it does not blow up, so the failure must show as a
    worse test MSE than both the two-phase network and the single phase on exact inverses. Medians over seeds 0-4."""
    configs = ("dynamics/single_phase_learned.yaml", "dynamics/two_phase.yaml", "dynamics/single_phase_exact.yaml")
    mse = {c: statistics.median(_run(c, s)["test/mse"] for s in range(5)) for c in configs}
    assert mse[configs[0]] > 2 * max(mse[configs[1]], mse[configs[2]]), mse
