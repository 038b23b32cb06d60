"""scripts/mnist_signals.py runs a short DTP-AI proxy and reports the per-layer signal angles."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO, SHARED_DATA
from tplightning.data.mnist import find_files

needs_mnist = pytest.mark.skipif(
    not (SHARED_DATA.is_dir() and all(p is not None for p in find_files(SHARED_DATA).values())), reason="no MNIST"
)


@needs_mnist
def test_mnist_signals_reports_every_layer(one_thread, capsys):
    spec = importlib.util.spec_from_file_location("mnist_signals", REPO / "scripts" / "mnist_signals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["mnist/dtp_ai.yaml", "--epochs", "1", "--subset", "600", "--every", "5", "--",
                       "--data.init_args.data_dir", str(SHARED_DATA), "--model.init_args.negative_slope", "0.35"])  # fmt: skip
    assert len(out["val_acc"]) == 1
    for i in range(1, 6):
        assert -1 <= out["start"][f"diag/cos_bp_{i}"] <= 1 and out["last"][f"diag/q_pinv_error_{i}"] >= 0
    # at the thesis' slope 0.35 the signal of layer 1 is far from the gradient, that of layer 5 is not (issue 14)
    assert out["start"]["diag/cos_bp_1"] < 0.4 < 0.95 < out["start"]["diag/cos_bp_5"]
    assert "cos_bp" in capsys.readouterr().out
