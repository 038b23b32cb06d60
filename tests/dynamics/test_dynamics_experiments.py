"""The chapter-6 experiment commands run end to end on tiny settings and write their outputs."""
from __future__ import annotations

import json

from experiments.dynamics import signals, stability, training


def test_signals_command(tmp_path, one_thread):
    res = signals.main(["--out", str(tmp_path), "--nets", "1", "--depths", "2,3", "--batch", "8", "--depth", "3"])
    assert (tmp_path / "dyn_signals.png").exists()
    data = json.loads((tmp_path / "dyn_signals.json").read_text())
    for mu, fit in data["depth"]["fits"].items():
        if fit["no_equilibrium"] < fit["networks"]:
            assert abs(fit["r_fit"] / fit["r"] - 1) < 0.15, (mu, fit)
    assert res["approximate"][0.0]["recon"][0] < 1e-10  # exact inverses: no reconstruction error


def test_stability_command(tmp_path, one_thread):
    res = stability.main(["--out", str(tmp_path), "--cases", "40", "--nets", "4", "--widths", "2", "--depths", "2,3"])
    assert res["random_blocks"]["eigenvalue_counterexamples"] == 0
    assert (tmp_path / "dyn_stability.json").exists() and (tmp_path / "dyn_stability.png").exists()


def test_training_command(tmp_path, one_thread):
    res = training.main(["--out", str(tmp_path), "--rules", "SP-exact", "--seeds", "1", "--epochs", "1"])
    rows = {(s["arch"], s["rule"]): s for s in res["summary"]}
    row = rows[("6-6-6", "SP-exact")]
    assert row["diverged"] == 0 and row["test_mse"] < row["initial_test_mse"]
    assert row["cos_dtp_start"] > 0.9  # exact inverses at the start: DTP-AI's Q = W^dagger is exact too
    assert (tmp_path / "dyn_training.png").exists()
