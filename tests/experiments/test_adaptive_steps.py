"""The adaptive-steps experiment (issue 32): a tiny run writes its records, JSON and figures and resumes; the summary's
"epochs to BP-SGD's final loss" on hand-made records; the full run under ``-m slow``."""
from __future__ import annotations

import json

import pytest

from benchmarks import common
from experiments import adaptive_steps as ex
from experiments.common import single_thread


def _record(variant, curve, seed=0, diverged=False):
    return {"table": "exact", "variant": variant, "seed": seed, "epochs": len(curve) - 1, "num_train": 8, "fraction": 0.1,
            "diverged": diverged, "error": None, "train_mse": curve, "test_mse": curve, "seconds": [float(k) for k in range(len(curve))],
            "args": []}  # fmt: skip


def test_summary_counts_the_epochs_to_bp_sgds_final_loss():
    records = [
        _record("BP-SGD", [9.0, 5.0, 3.0, 2.0, 1.0]), _record("BP-SGD", [9.0, 5.0, 3.0, 2.0, 3.0], seed=1),  # final mean 2.0
        _record("TP-EI+adaptive", [9.0, 2.5, 1.5, 1.0, 0.5]), _record("TP-EI+adaptive", [9.0, 1.5, 1.5, 1.0, 0.5], seed=1),
        _record("RMTP-EI+adaptive", [9.0, 8.0, 7.0, 6.0, 5.0]), _record("RMTP-EI+adaptive", [1.0], seed=1, diverged=True),
    ]  # fmt: skip
    s = ex.summarise(records)["exact"]
    assert s["bp_sgd_final_train_mse"] == 2.0
    assert s["variants"]["TP-EI+adaptive"]["epochs_to_bp_sgd"] == 1  # mean 2.0 at epoch 1
    assert s["variants"]["BP-SGD"]["epochs_to_bp_sgd"] == 3
    assert s["variants"]["RMTP-EI+adaptive"]["epochs_to_bp_sgd"] is None and s["variants"]["RMTP-EI+adaptive"]["diverged"] == 1
    assert ex.verdicts({"exact": s}) == {"a": True, "b": False}  # 1 <= 4 / 2; never reached
    more = [_record(v, [9.0, 8.0, 7.0, 6.0, 2.0], seed=k) for v in ("RMTP-EI+layer-step",) for k in (0, 1)]
    s = ex.summarise(records + more)["exact"]
    assert ex.verdicts({"exact": s}) == {"a": True, "b": True}  # either adaptive variant counts
    s = ex.summarise(records + more + [_record("BP-SGD", [9.0, 1.0, 1.0, 1.0, 1.0], seed=2)])["exact"]  # seed 2: BP-SGD only
    assert s["bp_sgd_final_train_mse"] == 2.0 and s["variants"]["BP-SGD"]["runs"] == 2


def test_a_tiny_run_writes_records_json_and_figures_and_resumes(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--tables", "exact", "--variants", "TP-EI,TP-EI+adaptive,BP-SGD,GN-LM", "--seeds", "1",
            "--epochs", "1", "--num-train", "8"]  # fmt: skip
    with single_thread():
        result = ex.main(argv)
    v = result["summary"]["exact"]["variants"]
    assert set(v) == {"TP-EI", "TP-EI+adaptive", "BP-SGD", "GN-LM"}
    assert all(len(e["train_mse"]) == 2 and len(e["seconds"]) == 2 for e in v.values())  # before training, after epoch 1
    assert json.loads((tmp_path / "adaptive_steps.json").read_text())["summary"]["exact"]["epochs"] == 1
    assert (tmp_path / "adaptive_steps_exact.png").stat().st_size > 1000
    records = common.read_records(tmp_path / ex.RECORDS, ex.RUN_KIND)
    assert len(records) == 4
    adaptive_args = next(r.record["args"] for r in records if r.record["variant"] == "TP-EI+adaptive")
    assert "--model.init_args.adaptive" in adaptive_args
    capsys.readouterr()
    with single_thread():
        ex.main(argv)  # every run is recorded: nothing runs again
    assert "seed 0:" not in capsys.readouterr().out
    assert len(common.read_records(tmp_path / ex.RECORDS, ex.RUN_KIND)) == 4


@pytest.mark.slow
def test_the_full_experiment(tmp_path):
    with single_thread():
        result = ex.main(["--out", str(tmp_path)])
    assert set(result["summary"]) == {"exact", "deep", "contracting"}
    assert set(result["verdicts"]) == {"a", "b"}
