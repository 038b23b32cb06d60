"""The MNIST table of the adaptive-steps experiment (issue 32, hypothesis (c)): each rule gets only the pieces that
apply to it, the time and epochs to an accuracy on hand-made runs, and a tiny run that records, resumes and draws its
figure; the full command under ``-m slow``."""
from __future__ import annotations

import json

import pytest

from benchmarks import common
from benchmarks import mnist as bench
from experiments import adaptive_steps as ex
from experiments.common import single_thread
from tplightning.data.mnist import find_files

from conftest import SHARED_DATA

needs_mnist = pytest.mark.skipif(not (SHARED_DATA.is_dir() and all(p is not None for p in find_files(SHARED_DATA).values())),
                                 reason=f"MNIST files not found under {SHARED_DATA}")  # fmt: skip


def test_each_rule_gets_sgd_and_only_its_applicable_pieces():
    v = ex.mnist_variants([0.01, 0.1], 0.25)
    assert list(v) == ["DTPAI AdamW", "DTPAI SGD 0.01", "DTPAI SGD 0.01+adaptive", "DTPAI SGD 0.1", "DTPAI SGD 0.1+adaptive",
                       "LeeDTP AdamW", "LeeDTP SGD 0.01", "LeeDTP SGD 0.01+adaptive", "LeeDTP SGD 0.1", "LeeDTP SGD 0.1+adaptive"]  # fmt: skip
    assert v["DTPAI AdamW"] == ("DTPAI", "mnist/dtp_ai.yaml", []) and v["LeeDTP AdamW"] == ("LeeDTP", "mnist/lee_dtp.yaml", [])
    _, _, sgd = v["LeeDTP SGD 0.1"]
    assert sgd[0] == "--model.init_args.forward_optimizer"
    assert json.loads(sgd[1]) == {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "weight_decay": 0.0}}
    _, _, dtp = v["DTPAI SGD 0.01+adaptive"]
    assert dtp[2] == "--model.init_args.adaptive" and json.loads(dtp[1])["init_args"]["lr"] == 0.01
    assert json.loads(dtp[3])["init_args"] == {"damping": {"class_path": "tplightning.adaptive.LayerDamping", "init_args": {}},
                                               "layer_step": {"class_path": "tplightning.adaptive.LayerStep", "init_args": {"fraction": 0.25}}}  # fmt: skip
    _, _, lee = v["LeeDTP SGD 0.01+adaptive"]  # LeeDTP's original-form maps take no damping
    assert json.loads(lee[3])["init_args"] == {"layer_step": {"class_path": "tplightning.adaptive.LayerStep", "init_args": {"fraction": 0.25}}}


def _run(variant, seed, accs, diverged=False, seconds_per_epoch=10.0, batches=430):
    points = [[batches * e, seconds_per_epoch * e, a] for e, a in enumerate(accs, start=1)]
    return {"rule": variant, "config": "mnist/dtp_ai.yaml", "seed": seed, "epochs": 4, "machine": "here", "diverged": diverged,
            "error": "diverged" if diverged else None, "test_error": None if diverged else 100 * (1 - max(accs)),
            "best_epoch": None if diverged else 1 + accs.index(max(accs)), "val_acc": None if diverged else accs,
            "val_points": None if diverged else points, "batches_per_epoch": batches}  # fmt: skip


def test_summary_counts_epochs_and_seconds_to_an_accuracy_over_seeds():
    runs = [
        _run("A", 0, [0.96, 0.975, 0.981, 0.982]), _run("A", 1, [0.97, 0.98, 0.98, 0.99], seconds_per_epoch=20.0),
        _run("A", 2, [0.9, 0.95, 0.96, 0.97]),
        _run("B", 0, [0.99, 0.99, 0.99, 0.99]), _run("B", 1, [], diverged=True), _run("B", 2, [0.95, 0.96, 0.96, 0.96]),
        _run("A", 3, [0.99, 0.99, 0.99, 0.99]),  # seed 3: A only, not counted
    ]  # fmt: skip
    s = ex.summarise_mnist(runs)
    a, b = s["A"], s["B"]
    assert a["seeds"] == [0, 1, 2] and b["seeds"] == [0, 1, 2] and b["diverged"] == 1 and b["runs"] == 3
    t = a["thresholds"][0.98]
    assert t["per_seed"] == {0: (3, 30.0), 1: (2, 40.0), 2: None} and t["reached"] == 2
    assert t["epochs"] == 3 and t["seconds"] == 40.0  # medians of (3, 2, never) and (30, 40, never)
    assert a["thresholds"][0.95]["per_seed"] == {0: (1, 10.0), 1: (1, 20.0), 2: (2, 20.0)}
    assert b["thresholds"][0.98]["seconds"] == float("inf")  # one of three seeds reaches it: the median is never
    assert b["thresholds"][0.95]["per_seed"] == {0: (1, 10.0), 1: None, 2: (1, 10.0)} and b["thresholds"][0.95]["epochs"] == 1
    assert a["train_seconds_per_epoch"] == [10.0, 20.0, 10.0]
    assert [round(e, 6) for e in a["test_errors"]] == [1.8, 1.0, 3.0]
    block = ex.mnist_block(s, "python -m experiments.adaptive_steps --tables mnist", None)
    assert "| A | 1.93 ± 1.01 | 94.33 ± 3.79 | 98.07 ± 1.01 | 10 s · 1 ep (3/3) | 20 s · 1 ep (3/3) | 20 s · 2 ep (3/3) | 40 s · 3 ep (2/3) | 13.3 ± 5.8 |" in block
    assert "| B | 2.50 ± 2.12 (1/3 diverged) |" in block and "not reached (1/3)" in block
    assert "A: seed 0 30 s/3 ep, seed 1 40 s/2 ep, seed 2 –;" in block and "Machine: here." in block


@needs_mnist
def test_a_tiny_mnist_run_records_resumes_and_draws(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the runs' log and checkpoint folders
    argv = ["--out", str(tmp_path / "out"), "--tables", "mnist", "--variants", "DTPAI SGD 0.01+adaptive,LeeDTP SGD 0.01+adaptive",
            "--seeds", "1", "--epochs", "1", "--num-train", "200", "--num-val", "100"]  # fmt: skip
    with single_thread():
        result = ex.main(argv)
    s = result["mnist"]
    assert list(s) == ["DTPAI SGD 0.01+adaptive", "LeeDTP SGD 0.01+adaptive"]
    assert all(len(e["val_acc"]) == 1 and len(e["test_errors"]) == 1 and e["epochs"] == 1 for e in s.values())
    records = common.read_records(tmp_path / "out" / ex.MNIST_RECORDS, bench.RUN_KIND)
    assert len(records) == 2 and all("1 torch thread" in r.record["machine"] for r in records)
    adaptive = next(r.record for r in records if r.record["rule"] == "LeeDTP SGD 0.01+adaptive")
    assert "--model.init_args.adaptive" in adaptive["overrides"] and "200" in adaptive["overrides"] and len(adaptive["val_points"]) == 1
    assert json.loads((tmp_path / "out" / "adaptive_steps_mnist.json").read_text())["runs"] == 2
    assert (tmp_path / "out" / "adaptive_steps_mnist.png").stat().st_size > 1000
    assert not (tmp_path / "out" / "adaptive_steps.json").exists()  # the student-teacher tables were not asked for
    capsys.readouterr()
    with single_thread():
        ex.main(argv)  # every run is recorded: nothing runs again
    assert "seed 0:" not in capsys.readouterr().out
    assert len(common.read_records(tmp_path / "out" / ex.MNIST_RECORDS, bench.RUN_KIND)) == 2


@pytest.mark.slow
@needs_mnist
def test_the_full_mnist_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with single_thread():
        result = ex.main(["--out", str(tmp_path), "--tables", "mnist", "--seeds", "3"])
    assert len(result["mnist"]) == 6 and all(e["epochs"] == 20 and len(e["seeds"]) == 3 for e in result["mnist"].values())
