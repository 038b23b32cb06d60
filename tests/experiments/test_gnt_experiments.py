"""experiments.gnt_angles and experiments.null_space: tiny runs write their JSON and PNG and resume per rule; the full
runs are -m slow."""
from __future__ import annotations

import json
import os

import pytest
import torch

from experiments import gnt_angles, null_space

MNIST = os.path.join(os.environ.get("TPLIGHTNING_DATA", ""), "MNIST", "raw", "train-images-idx3-ubyte.gz")


@pytest.mark.skipif(not os.path.exists(MNIST), reason="needs the MNIST files under $TPLIGHTNING_DATA")
def test_gnt_angles_tiny_run_writes_and_resumes(tmp_path):
    argv = ["--rules", "DRL,DTP", "--epochs", "1", "--pretrain", "1", "--subset", "1200", "--limit-batches", "2", "--every", "1",
            "--max-samples", "8", "--sizes", "784,12,12,10", "--search", "1", "--out", str(tmp_path)]  # fmt: skip
    results = gnt_angles.main(argv)
    assert sorted(results) == ["DRL", "DTP"]
    assert results["DRL"]["max_epochs"] == 2 and results["DTP"]["max_epochs"] == 1  # one pre-training epoch for DRL only
    assert [e["forward_step"] for e in results["DRL"]["logs"]] == [0, 1]
    assert all(0 < a < 180 for e in results["DRL"]["logs"] for a in e["angles"]) and len(results["DRL"]["first"]) == 2
    assert len(results["DTP"]["search"]["dampings"]) == 2 and results["DTP"]["search"]["batches"] == 1
    assert (tmp_path / "gnt_angles.png").stat().st_size > 0
    stored = json.loads((tmp_path / "gnt_angles.json").read_text())
    stored["DTP"]["seconds"] = -1.0  # a finished rule is not run again
    (tmp_path / "gnt_angles.json").write_text(json.dumps(stored))
    assert gnt_angles.main(argv)["DTP"]["seconds"] == -1.0


def test_gnt_angles_protocol_conversions():
    rule = gnt_angles.build("DRL", [6, 5, 5, 3])
    assert rule.target_stepsize == pytest.approx(0.06858850589618244 / 128)  # their batch-mean loss
    opt = rule.forward_optimizer
    assert opt.keywords["lr"] == pytest.approx(2.968902530985572e-05 / 0.06858850589618244)  # normalize_lr
    fb = rule.feedback_optimizer.keywords  # their feedback loss averages over 256 units: eps and decay x 128
    assert fb["eps"] == pytest.approx(5.0844503288987736e-08 * 128) and fb["weight_decay"] == pytest.approx(5.384963778780523e-06 * 128)
    assert rule.feedback_first and rule.feedback_pretrain_epochs == 6 and rule.feedback_extra_epochs == 1
    assert gnt_angles.max_epochs(rule, 3) == 6 + 5  # P + (E - 1)(1 + K) + 1
    Q = rule.feedback_weights[0]  # Xavier normal (5 x 5): std sqrt(2 / 10)
    assert rule.net.layers[0].bias is not None and 0.1 < float(Q.std()) < 0.8
    assert rule.hparams["feedback_init"] == "xavier_normal" and rule.hparams["feedback_bias"] is True  # the library's options
    assert all(torch.equal(m.base.d, torch.zeros(5)) for m in rule.maps)  # feedback biases start at 0, as theirs
    ddtp = gnt_angles.build("DDTP-linear", [6, 5, 5, 3])
    assert ddtp.hparams["feedback_init"] == "xavier_normal" and not ddtp.hparams["feedback_bias"]


def test_null_space_tiny_run(tmp_path):
    results = null_space.main(["--pretrain", "1", "--epochs", "1", "--num-train", "12", "--every", "4", "--out", str(tmp_path)])
    assert sorted(results) == ["DDTP-linear", "DRL", "DTP"]
    for r in results.values():
        assert [e["forward_step"] for e in r["logs"]] == [0, 4, 8]
        assert all(0 <= s <= 1 for e in r["logs"] for s in e["shares"])
    assert (tmp_path / "null_space.png").stat().st_size > 0


def test_null_space_teacher_is_a_relu_network_of_the_papers_size():
    x, y = null_space.teacher_data(5, 0)
    assert tuple(x.shape) == (5, 6) and tuple(y.shape) == (5, 2)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    x2, y2 = null_space.teacher_data(5, 0, teacher=[6, 3, 2])
    gen = torch.Generator().manual_seed(0)
    xd = torch.rand(5, 6, generator=gen, dtype=torch.float64) * 2 - 1
    W1 = torch.randn(3, 6, generator=gen, dtype=torch.float64) * 3 * (2 / 9) ** 0.5
    W2 = torch.randn(2, 3, generator=gen, dtype=torch.float64) * 3 * (2 / 5) ** 0.5
    torch.testing.assert_close(y2, (torch.relu(xd @ W1.T) @ W2.T).float())


@pytest.mark.slow
def test_gnt_angles_full_protocol(tmp_path):
    results = gnt_angles.main(["--epochs", "1", "--out", str(tmp_path)])
    assert sorted(results) == sorted(gnt_angles.RULES)


@pytest.mark.slow
def test_null_space_full_protocol(tmp_path):
    results = null_space.main(["--out", str(tmp_path)])
    assert sorted(results) == ["DDTP-linear", "DRL", "DTP"]
    assert all(len(r["logs"]) == 200 and 0 <= min(r["mean"]) <= max(r["mean"]) <= 1 for r in results.values())  # 5 x 400 / 10
